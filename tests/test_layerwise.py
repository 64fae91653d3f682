"""LAMB and LARS: against their float64 NumPy references in every form params take (a
ParamBuffer, param groups, separate arrays, the functional form), against independent torch
transcriptions of the published algorithm (LAMB) and of timm's Lars, the per-tensor norms of
the fused pass, the guard, state dicts, bad input, the CUDA simulator and the PTX."""
import inspect
import math

import numpy as np
import pytest

import fastopt
from cases import LAST, N_DRAWS, hparams
from conftest import SIMULATOR, to_backend, to_host
from fastopt import layerwise
from fastopt.kernels import _dispatch, lamb, lars
from fastopt.layerwise import LAMB, LARS, Layers, lamb_passes

# odd sizes, an empty tensor, one all zero (params and grads: both ratios take their 1
# branch), one with zero gradients only
SHAPES = [(7, 5), (3,), (11, 13), (0,), (4, 3), (2, 3, 4), (9,)]
ZERO, ZERO_GRAD = 4, 6
STEPS = 4
MODES = ["buffer", "groups", "lists", "functional"]


RULES = {"lamb": (LAMB, lamb), "lars": (LARS, lars)}
# the draws every reference test runs: derived from the rules' declarations (tests/cases.py)
DRAWS = range(N_DRAWS)


def _other(rule, hp):
    """The second group of "groups" mode: half the lr, kept out of decay and adaptation."""
    out = dict(hp, lr=hp.get("lr", RULES[rule][0].rule.defaults["lr"]) / 2, weight_decay=0.0)
    if rule == "lamb":
        out["layer_adaptation"] = False
    else:
        out["always_adapt"] = False
    return out


def _data(seed, steps=STEPS, shapes=SHAPES, dtype=np.float64):
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(steps)]
    if len(shapes) > ZERO_GRAD:
        init[ZERO][...] = 0
        for g in grads:
            g[ZERO][...] = 0
            g[ZERO_GRAD][...] = 0
    return init, grads


def _reference(rule, hps, init, grads_per_step):
    """Each tensor stepped alone by the rule's NumPy reference; returns params, states, ratios."""
    module = RULES[rule][1]
    ref = getattr(module, f"{rule}_reference")
    params = [a.astype(np.float64) for a in init]
    states = [[np.zeros(a.shape) for _ in module.STATES] for a in init]
    ratios = []
    for t, grads in enumerate(grads_per_step, start=1):
        ratios = [ref([p], [g.astype(np.float64)], *[[s] for s in st], step=t, **hp)[0]
                  for p, g, st, hp in zip(params, grads, states, hps)]
    return params, states, np.array(ratios)


def _run(rule, hp, mode, init, grads_per_step):
    """Step the fastopt form; returns (params, state arrays per param, last ratios)."""
    cls, module = RULES[rule]
    if mode == "functional":
        fn = getattr(layerwise, f"{rule}_")
        params = [a.copy() for a in init]
        used = module.STATES if rule == "lamb" or hp.get("momentum") else ()
        states = [[np.zeros(a.shape, a.dtype) for a in init] for _ in used]
        for t, grads in enumerate(grads_per_step, start=1):
            ratios = fn(params, grads, *states, step=t, **hp)
        return params, [[s[i] for s in states] for i in range(len(params))], ratios
    if mode == "lists":
        params = [a.copy() for a in init]
        opt = cls(params, **hp)
    else:
        buf = fastopt.ParamBuffer([a.copy() for a in init])
        params = buf.params
        groups = buf if mode == "buffer" else [{"params": params[0::2]}, {"params": params[1::2], **_other(rule, hp)}]
        opt = cls(groups, **hp)
    for grads in grads_per_step:
        if mode == "lists":
            opt.step([g.copy() for g in grads])
        else:
            for view, g in zip(buf.grads, grads):
                view[...] = g
            opt.step()
    order = [next(i for i, q in enumerate(params) if q is p) for p in opt._params]  # group order -> param order
    ratios, states = np.empty(len(params)), [None] * len(params)
    ratios[order] = opt.trust_ratios
    for k, i in enumerate(order):
        views = opt.state_views(k)
        states[i] = [views[n] for n in module.STATES if n in views]
    assert opt.steps == len(grads_per_step)
    return params, states, ratios


def _hps(rule, hp, mode):
    return [_other(rule, hp) if mode == "groups" and i % 2 else hp for i in range(len(SHAPES))]


@pytest.mark.parametrize("chunk", [None, 16], ids=["one-chunk", "chunked-parallel"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("draw", DRAWS)
@pytest.mark.parametrize("rule", sorted(RULES))
def test_matches_reference(rule, draw, mode, chunk, monkeypatch):
    if chunk:  # many chunks per tensor, shared by threads
        monkeypatch.setattr(layerwise, "CHUNK", chunk)
        monkeypatch.setattr(_dispatch, "PARALLEL_THRESHOLD", 0)
    hp = hparams(rule, draw)
    if mode == "functional":  # it takes its own options: LAMB's layer_adaptation is a param group's
        hp = {k: v for k, v in hp.items() if k in inspect.signature(getattr(layerwise, f"{rule}_")).parameters}
    init, grads = _data(draw)
    params, states, ratios = _run(rule, hp, mode, init, grads)
    want_p, want_s, want_r = _reference(rule, _hps(rule, hp, mode), init, grads)
    np.testing.assert_allclose(ratios, want_r, rtol=1e-10)
    for i, (got, want) in enumerate(zip(params, want_p)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=f"param {i}")
        for got_s, want_s_ in zip(states[i], want_s[i]):
            np.testing.assert_allclose(got_s, want_s_, rtol=1e-10, atol=1e-12, err_msg=f"state of {i}")
    assert ratios[ZERO] == 1.0  # a zero tensor: ||p|| = 0
    if rule == "lars" and (hp.get("weight_decay") or hp.get("always_adapt")) and mode != "groups":
        assert ratios[ZERO_GRAD] == 1.0  # ||g|| = 0
    if rule == "lamb" and hp.get("layer_adaptation", True) and mode != "groups":
        assert np.all(ratios[[0, 2, 5]] != 1.0)  # the other tensors really are adapted


# -- independent transcriptions ---------------------------------------------------------

def _torch_lamb(init, grads_per_step, *, lr, betas, eps, weight_decay, debias, clamp):
    """You et al. (2020) Algorithm 2 in torch (float64), tensor by tensor; with
    debias=False, clamp=10 it is torch_optimizer.Lamb's step."""
    torch = pytest.importorskip("torch")
    xs = [torch.tensor(a) for a in init]
    ms = [torch.zeros_like(x) for x in xs]
    vs = [torch.zeros_like(x) for x in xs]
    b1, b2 = betas
    for t, grads in enumerate(grads_per_step, start=1):
        for x, g, m, v in zip(xs, grads, ms, vs):
            g = torch.tensor(g)
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            m_hat, v_hat = (m / (1 - b1 ** t), v / (1 - b2 ** t)) if debias else (m, v)
            update = m_hat / (v_hat.sqrt() + eps) + weight_decay * x
            w_norm, u_norm = x.norm(), update.norm()
            if clamp is not None:
                w_norm = w_norm.clamp(0, clamp)
            ratio = 1.0 if w_norm == 0 or u_norm == 0 else (w_norm / u_norm).item()
            x.sub_(lr * ratio * update)
    return [x.numpy() for x in xs]


@pytest.mark.parametrize("debias, clamp", [(True, None), (False, 10.0), (True, 2.0)],
                         ids=["paper+apex", "torch_optimizer", "clamped"])
def test_lamb_matches_published_algorithm(debias, clamp):
    hp = dict(lr=0.02, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.03)
    init, grads = _data(11, steps=6)
    want = _torch_lamb(init, grads, **hp, debias=debias, clamp=clamp)
    buf = fastopt.ParamBuffer(init)
    opt = LAMB(buf, **hp, bias_correction=debias, clamp_value=clamp)
    for g in grads:
        for view, x in zip(buf.grads, g):
            view[...] = x
        opt.step()
    for got, w in zip(buf.params, want):
        np.testing.assert_allclose(got, w, rtol=1e-10, atol=1e-12)


def _torch_lars(init, grads_per_step, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                trust_coeff=1e-3, eps=1e-8, trust_clip=False, always_adapt=False):
    """timm.optim.Lars's step in torch (float64)."""
    torch = pytest.importorskip("torch")
    xs = [torch.tensor(a) for a in init]
    state = {}
    for grads in grads_per_step:
        for i, (p, grad) in enumerate(zip(xs, grads)):
            grad = torch.tensor(grad)
            if weight_decay != 0 or always_adapt:
                w_norm, g_norm = p.norm(2.0), grad.norm(2.0)
                trust_ratio = trust_coeff * w_norm / (g_norm + w_norm * weight_decay + eps)
                trust_ratio = torch.where(w_norm > 0, torch.where(g_norm > 0, trust_ratio, 1.0), 1.0)
                if trust_clip:
                    trust_ratio = torch.clamp(trust_ratio / lr, max=1.0)
                grad = grad.add(p, alpha=weight_decay).mul_(trust_ratio)
            if momentum != 0:
                if i not in state:
                    buf = state[i] = torch.clone(grad).detach()
                else:
                    buf = state[i]
                    buf.mul_(momentum).add_(grad, alpha=1.0 - dampening)
                grad = grad.add(buf, alpha=momentum) if nesterov else buf
            p.add_(grad, alpha=-lr)
    return [x.numpy() for x in xs]


@pytest.mark.parametrize("draw", DRAWS)
def test_lars_matches_timm_style_reference(draw):
    hp = hparams("lars", draw)
    init, grads = _data(12, steps=5)
    want = _torch_lars(init, grads, **{"lr": 1.0, **hp})
    params = [a.copy() for a in init]
    opt = LARS(params, **hp)
    for g in grads:
        opt.step(g)
    for got, w in zip(params, want):
        np.testing.assert_allclose(got, w, rtol=1e-10, atol=1e-12)


# -- the fused norms -----------------------------------------------------------------

@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 1e-6)])
def test_segment_norms_of_the_fused_pass(dtype, rtol, monkeypatch):
    """Pass 1's per-chunk sums give every tensor's ||p|| and ||u||, the same bits every run."""
    monkeypatch.setattr(layerwise, "CHUNK", 64)
    monkeypatch.setattr(_dispatch, "PARALLEL_THRESHOLD", 0)
    shapes = [(300,), (7, 9), (1,), (0,), (129,), (64,)]
    init, grads = _data(13, steps=1, shapes=shapes, dtype=dtype)
    hp = dict(lr=0.0, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1)  # lr = 0: the params stay put
    c = lamb.LAMB.kernel_scalars({**lamb.LAMB.defaults, **hp}, 1, hp["lr"], np.dtype(dtype))
    runs = []
    for _ in range(5):
        ms, vs = [np.zeros(s, dtype) for s in shapes], [np.zeros(s, dtype) for s in shapes]
        layers = Layers([a.copy() for a in init], {"exp_avg": ms, "exp_avg_sq": vs}, grads=grads[0])
        assert layers.parallel and layers.chunks.shape[0] > len(shapes)
        lamb_passes(layers, layers.fixed_grads(), c)
        runs.append([np.sqrt(layers.per_tensor(s)) for s in layers.sums])
    u = [m / (1 - 0.9) / (np.sqrt(v / (1 - 0.999)) + 1e-6) + 0.1 * p.astype(np.float64)
         for p, m, v in zip(init, ms, vs)]
    np.testing.assert_allclose(runs[0][0], [np.linalg.norm(p.astype(np.float64)) for p in init], rtol=rtol)
    np.testing.assert_allclose(runs[0][1], [np.linalg.norm(x) for x in u], rtol=rtol)
    for other in runs[1:]:
        np.testing.assert_array_equal(other[0], runs[0][0])
        np.testing.assert_array_equal(other[1], runs[0][1])


def test_lamb_moments_equal_adams_bit_for_bit():
    """Only the sums are reordered: the moments come out exactly as the (strict) Adam kernel's."""
    init, grads = _data(14, steps=3, dtype=np.float32)
    buf = fastopt.ParamBuffer(init)
    opt = LAMB(buf, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.05)
    ms, vs = [np.zeros_like(a) for a in init], [np.zeros_like(a) for a in init]
    for t, g in enumerate(grads, start=1):
        for view, x in zip(buf.grads, g):
            view[...] = x
        opt.step()
        for p, x, m, v in zip(init, g, ms, vs):
            fastopt.functional.adam_(p.copy(), x, m, v, step=t, betas=(0.8, 0.99))
    for i in range(len(SHAPES)):
        np.testing.assert_array_equal(opt.state_views(i)["exp_avg"], ms[i])
        np.testing.assert_array_equal(opt.state_views(i)["exp_avg_sq"], vs[i])


def test_rules_are_declared_on_the_engine():
    """LAMB and LARS are Rules whose passes the engine generates; LAMB moves 40 B per fp32
    param: pass 1 stores m, v (not p) and sums p**2, u**2; pass 2 reads no gradient and
    stores p alone, reading its tensor's ratio."""
    first, update = lamb.LAMB.first_kernels, lamb.LAMB.kernels
    assert first.writes == ("exp_avg", "exp_avg_sq") and first.sums == ("squares", "squares") and first.reads_grad
    assert update.writes == ("p",) and not update.reads_grad and update.per_tensor == ("ratio",)
    assert lars.LARS.first_kernels is None and lars.LARS.kernels.per_tensor == ("ratio",)
    assert lars.LARS.kernels.writes == ("p", "momentum_buffer") and lars.LARS.kernels.reads_grad


# -- the optimizer machinery --------------------------------------------------------

@pytest.mark.parametrize("rule, hp, per_group", [
    ("lamb", {}, 2),
    ("lars", dict(lr=0.1, weight_decay=1e-3), 2),
    ("lars", dict(lr=0.1), 1),  # no adaptation: no norm pass
])
def test_launches_per_step(rule, hp, per_group):
    init, grads = _data(15)
    buf = fastopt.ParamBuffer(init)
    opt = RULES[rule][0]([{"params": buf.params[:3]}, {"params": buf.params[3:]}], **hp)
    for g in grads:
        for view, x in zip(buf.grads, g):
            view[...] = x
        opt.step()
    assert opt.launches == 2 * per_group * STEPS


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_nonfinite_gradient_writes_nothing(rule, nonfinite):
    hp = hparams(rule, 2)
    init, grads = _data(16, steps=2)
    buf = fastopt.ParamBuffer(init)
    opt = RULES[rule][0](buf, nonfinite=nonfinite, **hp)
    for view, x in zip(buf.grads, grads[0]):
        view[...] = x
    opt.step()
    before = buf.arena.copy(), {k: a.copy() for k, a in opt.arenas.items()}
    buf.grads[2][1, 3] = np.nan
    if nonfinite == "raise":
        with pytest.raises(FloatingPointError):
            opt.step()
    else:
        opt.step()
        assert opt.skipped_steps == 1 and opt.last_step_skipped
    np.testing.assert_array_equal(buf.arena, before[0])
    for k, a in opt.arenas.items():
        np.testing.assert_array_equal(a, before[1][k])
    assert opt.steps == 1


@pytest.mark.parametrize("rule, exact", [("lamb", True), ("lars", False)])
def test_max_grad_norm_equals_clipping_first(rule, exact):
    """The clip factor scales g inside the kernels: LAMB equals clip_grad_norm_ then a step
    bit for bit; LARS's ratio uses c * ||g|| for ||c g||, equal to rounding."""
    hp = hparams(rule, 1)
    init, grads = _data(17, steps=3, dtype=np.float32)
    fused, plain = fastopt.ParamBuffer(init), fastopt.ParamBuffer(init)
    a = RULES[rule][0](fused, max_grad_norm=0.5, **hp)
    b = RULES[rule][0](plain, **hp)
    for g in grads:
        for x, y, gg in zip(fused.grads, plain.grads, g):
            x[...] = gg
            y[...] = gg
        a.step()
        fastopt.clip_grad_norm_(plain, 0.5)
        b.step()
    assert a.last_grad_norm > 0.5
    if exact:
        np.testing.assert_array_equal(fused.arena, plain.arena)
    else:
        np.testing.assert_allclose(fused.arena, plain.arena, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("via", ["state_dict", "checkpoint"])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_resume_is_exact(rule, via, tmp_path):
    hp = hparams(rule, 3)
    init, grads = _data(18, steps=6)

    def run(opt, buf, gs):
        for g in gs:
            for view, x in zip(buf.grads, g):
                view[...] = x
            opt.step()
    first = fastopt.ParamBuffer(init)
    a = RULES[rule][0](first, **hp)
    run(a, first, grads[:3])
    second = fastopt.ParamBuffer([np.zeros_like(x) for x in init])
    b = RULES[rule][0](second, **hp)
    if via == "state_dict":
        second.arena[...] = first.arena
        b.load_state_dict(a.state_dict())
    else:
        fastopt.load(fastopt.save(tmp_path / "ckpt.npz", a, first), b, second)
    run(a, first, grads[3:])
    run(b, second, grads[3:])
    np.testing.assert_array_equal(first.arena, second.arena)
    assert b.steps == 6


# -- bad input: a clear error naming the argument, nothing written --------------------

def _f(*s):
    return np.ones(s)


BAD_HYPER = [
    ("lamb-lr", lambda: LAMB([_f(3)], lr=-1.0), "learning rate"),
    ("lamb-betas", lambda: LAMB([_f(3)], betas=(1.0, 0.9)), "beta parameter at index 0"),
    ("lamb-eps", lambda: LAMB([_f(3)], eps=-1e-6), "epsilon"),
    ("lamb-weight_decay", lambda: LAMB([_f(3)], weight_decay=-0.1), "weight_decay"),
    ("lamb-clamp_value", lambda: LAMB([_f(3)], clamp_value=0.0), "clamp_value"),
    ("lamb-group", lambda: LAMB([{"params": [_f(3)]}, {"params": [_f(2)], "clamp_value": -1}]),
     "param group 1.*clamp_value"),
    ("lamb-max_grad_norm", lambda: LAMB([_f(3)], max_grad_norm=0.0), "max_grad_norm"),
    ("lamb-nonfinite", lambda: LAMB([_f(3)], nonfinite="ignore"), "nonfinite"),
    ("lars-lr", lambda: LARS([_f(3)], lr=-0.1), "learning rate"),
    ("lars-momentum", lambda: LARS([_f(3)], momentum=-0.9), "momentum"),
    ("lars-weight_decay", lambda: LARS([_f(3)], weight_decay=-1e-4), "weight_decay"),
    ("lars-trust_coeff", lambda: LARS([_f(3)], trust_coeff=0.0), "trust_coeff"),
    ("lars-eps", lambda: LARS([_f(3)], eps=-1.0), "epsilon"),
    ("lars-dampening", lambda: LARS([_f(3)], dampening=math.nan), "dampening"),
    ("lars-nesterov", lambda: LARS([_f(3)], nesterov=True), "Nesterov"),
]


@pytest.mark.parametrize("name, make, match", BAD_HYPER, ids=[c[0] for c in BAD_HYPER])
def test_bad_hyper_parameters(name, make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("call, error, match", [
    (lambda p, g, s: layerwise.lamb_(p, g, s, s[::-1], step=1), ValueError, r"exp_avg_sqs\[0\] has shape"),
    (lambda p, g, s: layerwise.lamb_(p, g[:1], s, s, step=1), ValueError, "grads has 1 arrays for 2 params"),
    (lambda p, g, s: layerwise.lamb_(p, [g[0], g[1].astype(np.float32)], s, [x.copy() for x in s], step=1), TypeError,
     r"grads\[1\] has dtype float32"),
    (lambda p, g, s: layerwise.lamb_(p, g, s, [x.copy() for x in s], step=0), ValueError, "step"),
    (lambda p, g, s: layerwise.lamb_(p, g, s, [x.copy() for x in s], step=1, lr=-1), ValueError, "learning rate"),
    (lambda p, g, s: layerwise.lamb_(p, g, s, s, step=1), ValueError,
     r"exp_avgs\[0\] and exp_avg_sqs\[0\] share memory"),
    (lambda p, g, s: layerwise.lars_(p, g, step=1, momentum=0.9), ValueError, "momentum_buffers is required"),
    (lambda p, g, s: layerwise.lars_(p, [g[0], np.ones(8)[::2]], step=1), ValueError,
     r"grads\[1\] is not C-contiguous"),
    (lambda p, g, s: layerwise.lars_(p, g, step=1, trust_coeff=-1.0), ValueError, "trust_coeff"),
], ids=["state-shape", "count", "dtype", "step", "lr", "aliased-states", "no-buffers", "strided", "trust_coeff"])
def test_bad_functional_input_writes_nothing(call, error, match):
    params, grads, states = [_f(3), _f(4)], [_f(3), _f(4)], [np.zeros(3), np.zeros(4)]
    with pytest.raises(error, match=match):
        call(params, grads, states)
    assert all((p == 1).all() for p in params) and all((s == 0).all() for s in states)


# -- CUDA (a GPU, or the simulator through test_cuda_simulator.py) ------------------------

CUDA_SHAPES = [(5, 7), (1,), (33,)]


@pytest.mark.cuda
@pytest.mark.parametrize("draw", DRAWS)
@pytest.mark.parametrize("rule", sorted(RULES))
def test_cuda_lists_match_reference(rule, draw):
    # the shapes in turn, one per draw and two in the last (each its own ratio): the lists form
    # launches per tensor, and the simulator runs every launch thread by thread
    n = len(CUDA_SHAPES)
    shapes = [CUDA_SHAPES[draw % n]] + ([CUDA_SHAPES[(draw + 1) % n]] if draw == LAST else [])
    hp = hparams(rule, draw)
    init, grads = _data(19, steps=2, shapes=shapes, dtype=np.float32)
    opt = RULES[rule][0]([to_backend(a, "cuda") for a in init], **hp)
    for g in grads:
        opt.step([to_backend(x, "cuda") for x in g])
    want, _, ratios = _reference(rule, [hp] * len(shapes), init, grads)
    np.testing.assert_allclose(opt.trust_ratios, ratios, rtol=1e-4)
    for a, b in zip(opt._params, want):
        np.testing.assert_allclose(to_host(a), b, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
def test_cuda_tensors_sharing_one_arena(monkeypatch):
    """The ParamBuffer layout on CUDA: three tensors in one base cut in many chunks, one
    launch per pass, and the padding between them untouched."""
    monkeypatch.setattr(layerwise, "CUDA_CHUNK", 8)
    spans = [(0, 0, 35), (0, 48, 3), (0, 64, 20)]
    init, grads = _data(20, steps=2, shapes=[(n,) for _, _, n in spans], dtype=np.float32)

    def arena(parts, fill):
        out = np.full(96, fill, np.float32)
        for (_, s, n), x in zip(spans, parts):
            out[s:s + n] = x
        return to_backend(out, "cuda")
    p, m, v = arena(init, 7.0), arena([0 * x for x in init], 7.0), arena([0 * x for x in init], 7.0)
    hp = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.02)
    for t, g in enumerate(grads, start=1):
        layers = Layers([p], {"exp_avg": [m], "exp_avg_sq": [v]}, spans=spans, grads=[arena(g, 7.0)])
        c = lamb.LAMB.kernel_scalars({**lamb.LAMB.defaults, **hp}, t, hp["lr"], np.dtype(np.float32))
        _, launches = lamb_passes(layers, layers.fixed_grads(), c)
        assert launches == 2
    want, _, _ = _reference("lamb", [hp] * 3, init, grads)
    host = to_host(p)
    for (_, s, n), w in zip(spans, want):
        np.testing.assert_allclose(host[s:s + n], w, rtol=1e-4, atol=1e-5)
    gaps = np.ones(96, bool)
    for _, s, n in spans:
        gaps[s:s + n] = False
    assert (host[gaps] == 7.0).all() and (to_host(m)[gaps] == 7.0).all()


# -- PTX --------------------------------------------------------------------------------

@pytest.mark.skipif(SIMULATOR, reason="compile_ptx does not exist under the simulator")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ptx_has_no_f64_in_float32_kernels(dtype):
    pytest.importorskip("numba_cuda", reason='numba-cuda is not installed (pip install -e ".[cuda-tools]")')
    from fastopt.kernels._ptx import compile_layers, example_scalars, f64_count, layer_kernels
    for cc in ((8, 0), (9, 0)):
        ptxs = [compile_layers(kernels, layout, example_scalars(rule, dtype), dtype, cc)
                for rule in (lamb.LAMB, lars.LARS) for kernels, layout in layer_kernels(rule)]
        counts = [f64_count(x) for x in ptxs]
        assert len(ptxs) == 4 and all(len(x.splitlines()) > 100 for x in ptxs)  # LAMB's two passes, LARS's two layouts
        if dtype == np.float32:
            assert counts == [0] * 4, counts
        else:
            assert all(n > 0 for n in counts), counts  # the count does see float64 kernels
