"""Restoring or editing state is all or nothing (issue 17): state dicts of another rule or
with missing, mistyped or malformed entries, broken or hostile checkpoint files, param-group
edits between steps, threads, aliasing and the arena's padding. Every case checks that a
refused call left parameters, state, step counts and groups exactly as they were."""
import json
import threading
import zipfile

import numpy as np
import pytest

import fastopt
from fastopt.kernels import adam as adam_rule

SHAPES = [(5, 3), (3,), (2, 2)]


def _arrays(seed=0, dtype=np.float64, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def _stepped(cls=fastopt.Adam, steps=2, groups=None, **hp):
    """An optimizer over a ParamBuffer after ``steps`` steps with seeded gradients."""
    buf = fastopt.ParamBuffer(_arrays())
    params = buf if groups is None else [{"params": buf.params[a:b]} for a, b in groups]
    opt = cls(params, **hp)
    for t in range(steps):
        for view, g in zip(buf.grads, _arrays(100 + t)):
            view[...] = g
        opt.step()
    return opt, buf


def _snapshot(opt, buf):
    """Everything a refused restore must leave alone."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    arenas = {k: v.copy() for k, v in (opt.arenas or {}).items()}
    return buf.arena.copy(), arenas, opt._steps(), groups


def _assert_unchanged(before, opt, buf):
    arena, arenas, steps, groups = before
    now_arena, now_arenas, now_steps, now_groups = _snapshot(opt, buf)
    np.testing.assert_array_equal(now_arena, arena)
    assert now_arenas.keys() == arenas.keys()
    for k in arenas:
        np.testing.assert_array_equal(now_arenas[k], arenas[k])
    assert now_steps == steps and now_groups == groups


# -- 1. load_state_dict -------------------------------------------------------------------

def _torch_state(cls_name, **hp):
    torch = pytest.importorskip("torch")
    ps = [torch.nn.Parameter(torch.tensor(a)) for a in _arrays()]
    opt = getattr(torch.optim, cls_name)(ps, **hp)
    for t in range(2):
        for p, g in zip(ps, _arrays(100 + t)):
            p.grad = torch.tensor(g)
        opt.step()
    return opt.state_dict()


@pytest.mark.parametrize("target, source", [
    ("Adam", lambda: _torch_state("SGD", lr=0.1, momentum=0.9)),
    ("SGD", lambda: _torch_state("Adam")),
    ("Adagrad", lambda: _torch_state("RMSprop")),
    ("RMSprop", lambda: _torch_state("Adagrad")),
    ("SGD", lambda: _stepped(fastopt.Adam)[0].state_dict()),
    ("Adam", lambda: _stepped(fastopt.SGD, lr=0.1, momentum=0.9)[0].state_dict()),
    ("RMSprop", lambda: _stepped(fastopt.Adagrad)[0].state_dict()),
    ("Adagrad", lambda: _stepped(fastopt.RMSprop)[0].state_dict()),
    ("AdamW", lambda: _stepped(fastopt.Adam)[0].state_dict()),
], ids=["torch-sgd>adam", "torch-adam>sgd", "torch-rmsprop>adagrad", "torch-adagrad>rmsprop",
        "adam>sgd", "sgd>adam", "adagrad>rmsprop", "rmsprop>adagrad", "adam>adamw"])
def test_state_dict_of_another_rule_is_refused(target, source):
    sd = source()
    opt, buf = _stepped(getattr(fastopt, target), **({"momentum": 0.9, "lr": 0.1} if target == "SGD" else {}))
    before = _snapshot(opt, buf)
    with pytest.raises(ValueError, match=f"not a state dict of {target}|does not keep"):
        opt.load_state_dict(sd)
    _assert_unchanged(before, opt, buf)


@pytest.mark.parametrize("torch_layout", [False, True])
def test_missing_state_entry_is_named(torch_layout):
    opt, buf = _stepped()
    sd = opt.state_dict(torch=torch_layout) if not torch_layout else _torch_state("Adam")
    del sd["state"][1]["exp_avg_sq"]
    before = _snapshot(opt, buf)
    with pytest.raises(ValueError, match=r"param 1 has no 'exp_avg_sq'"):
        opt.load_state_dict(sd)
    _assert_unchanged(before, opt, buf)


@pytest.mark.parametrize("step", [3.7, "3", True, -2, -2.0, float("nan"), float("inf"), None])
def test_bad_step_count_is_refused(step):
    opt, buf = _stepped()
    sd = opt.state_dict()
    for entry in sd["state"].values():
        entry["step"] = step
    before = _snapshot(opt, buf)
    with pytest.raises(ValueError, match="step"):
        opt.load_state_dict(sd)
    _assert_unchanged(before, opt, buf)


def test_torch_tensor_step_counts_load():
    torch = pytest.importorskip("torch")
    opt, _buf = _stepped(steps=3)
    sd = opt.state_dict()
    for entry in sd["state"].values():
        entry["step"] = torch.tensor(3.0)
    opt.load_state_dict(sd)
    assert opt.steps == 3


@pytest.mark.parametrize("bad", [np.array(["a", "b", "c"]), np.zeros(3, complex), np.zeros(4)],
                         ids=["strings", "complex", "shape"])
def test_bad_array_in_a_later_entry_writes_nothing(bad):
    opt, buf = _stepped(groups=[(0, 1), (1, 3)])
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = 0.5  # would be written first if the check came late
    sd["state"][1]["exp_avg"] = bad
    before = _snapshot(opt, buf)
    with pytest.raises(ValueError, match="param 1"):
        opt.load_state_dict(sd)
    _assert_unchanged(before, opt, buf)


def test_mistyped_hyper_parameter_in_state_dict_is_refused():
    opt, buf = _stepped()
    sd = opt.state_dict()
    sd["param_groups"][0]["amsgrad"] = "no"
    before = _snapshot(opt, buf)
    with pytest.raises(ValueError, match="amsgrad must be True or False"):
        opt.load_state_dict(sd)
    _assert_unchanged(before, opt, buf)


def test_state_for_unlisted_params_is_refused():
    opt, _buf = _stepped()
    sd = opt.state_dict()
    sd["state"][7] = dict(sd["state"][0])
    with pytest.raises(ValueError, match="no param group lists"):
        opt.load_state_dict(sd)


# -- 2. fastopt.load -----------------------------------------------------------------------

def _checkpoint(tmp_path, **edits):
    """A saved Adam checkpoint whose entries are replaced by ``edits`` (None removes one)."""
    opt, buf = _stepped(groups=[(0, 2), (2, 3)])
    path = tmp_path / "ckpt.npz"
    fastopt.save(path, opt, buf)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays["meta"]))
    for key, value in edits.items():
        if key.startswith("meta."):
            meta[key[5:]] = value
        elif value is None:
            del arrays[key]
        else:
            arrays[key] = value
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)
    return path


def _fresh():
    return _stepped(steps=1, groups=[(0, 2), (2, 3)], lr=0.25)


@pytest.mark.parametrize("edits, match", [
    ({"params.arena": np.array(["x"] * 64)}, "params.arena is <U1"),
    ({"params.arena": np.zeros(64, complex)}, "params.arena is complex128"),
    ({"params.arena": np.zeros(64, np.float32)}, "params.arena is float32"),
    ({"state.exp_avg_sq": None}, "state.exp_avg_sq is missing"),
    ({"state.exp_avg": np.zeros(64, np.float32)}, "state.exp_avg is float32"),
    ({"meta.offsets": [0, 0, 0]}, "offsets place two params"),
    ({"meta.offsets": [0, 16]}, "offsets"),
    ({"meta.offsets": [0, -16, 32]}, "offsets"),
    ({"meta.offsets": [0, 16, 10**6]}, "arena of >= "),
    ({"meta.steps": [2, True]}, "step counts"),
    ({"meta.steps": [2, 2.5]}, "step counts"),
    ({"meta.groups": [{"params": 2, "lr": 1e-3, "amsgrad": "no"}, {"params": 1}]}, "amsgrad must be True or False"),
    ({"meta.groups": [{"params": 1}, {"params": 2}]}, r"params per group are \[2, 1\] here but \[1, 2\]"),
    ({"meta.groups": [{"params": 2}, {"params": 1, "lr": -1.0}]}, "param group 1"),
    ({"state.bogus": np.zeros(3)}, "state.bogus is not an entry"),
    ({"extra": np.zeros(3)}, "extra is not an entry"),
], ids=["arena-str", "arena-complex", "arena-f32", "no-state", "state-f32", "offsets-zero", "offsets-short",
        "offsets-negative", "offsets-beyond", "step-bool", "step-float", "hyper-str", "groups-2-1-vs-1-2",
        "later-group-bad", "unknown-state", "unknown-entry"])
def test_bad_checkpoint_writes_nothing(tmp_path, edits, match):
    path = _checkpoint(tmp_path, **edits)
    opt, buf = _fresh()
    before = _snapshot(opt, buf)
    with pytest.raises(ValueError, match=match):
        fastopt.load(path, opt, buf)
    _assert_unchanged(before, opt, buf)


@pytest.mark.parametrize("content, match", [
    (b"", "not a readable .npz"),
    (np.random.default_rng(0).bytes(4096), "not a readable .npz"),
    (None, "not a readable .npz"),  # a .npy file
], ids=["empty", "random", "npy"])
def test_unreadable_checkpoint_file_is_named(tmp_path, content, match):
    path = tmp_path / "ckpt.npz"
    if content is None:
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    else:
        path.write_bytes(content)
    opt, buf = _fresh()
    with pytest.raises(ValueError, match=f"{path}.*{match}"):
        fastopt.load(path, opt, buf)


@pytest.mark.parametrize("declared", [(10 ** 12,), (64,)], ids=["huge", "short-data"])
def test_checkpoint_headers_are_read_before_data(tmp_path, declared):
    """An entry whose header declares more than the member holds is refused from the header
    alone (10**12 float64 would be 7 TiB)."""
    path = _checkpoint(tmp_path)
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist() if n != "state.exp_avg_sq.npy"}
    header = np.lib.format.header_data_from_array_1_0(np.zeros(1))
    header["shape"] = declared
    with zipfile.ZipFile(path, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
        with z.open("state.exp_avg_sq.npy", "w") as f:
            np.lib.format.write_array_header_1_0(f, header)
            f.write(b"\0" * 64)
    opt, buf = _fresh()
    before = _snapshot(opt, buf)
    with pytest.raises(ValueError, match=r"state\.exp_avg_sq.*more data than it holds"):
        fastopt.load(path, opt, buf)
    _assert_unchanged(before, opt, buf)


def test_resume_from_checkpoint_still_exact(tmp_path):
    path = _checkpoint(tmp_path)
    opt, buf = _fresh()
    fastopt.load(path, opt, buf)
    whole, wbuf = _stepped(groups=[(0, 2), (2, 3)])
    np.testing.assert_array_equal(buf.arena, wbuf.arena)
    assert opt._steps() == whole._steps()


# -- 3. edits of param_groups between steps ------------------------------------------------

def _step_with(opt, buf, seed=7):
    for view, g in zip(buf.grads, _arrays(seed)):
        view[...] = g
    opt.step()


@pytest.mark.parametrize("cls, key, value, error, match", [
    (fastopt.Adam, "betas", (2.0, 0.999), ValueError, "beta"),
    (fastopt.Adam, "eps", -1.0, ValueError, "epsilon"),
    (fastopt.Adam, "weight_decay", -5.0, ValueError, "weight_decay"),
    (fastopt.Adam, "amsgrad", "yes", TypeError, "amsgrad must be True or False"),
    (fastopt.Adam, "amsgrad", True, ValueError, "max_exp_avg_sq"),
    (fastopt.RMSprop, "centered", True, ValueError, "grad_avg"),
    (fastopt.RMSprop, "momentum", 0.9, ValueError, "momentum_buffer"),
], ids=["betas", "eps", "decay", "amsgrad-str", "amsgrad-late", "centered-late", "rmsprop-momentum-late"])
def test_group_edit_is_checked_before_the_next_step(cls, key, value, error, match):
    opt, buf = _stepped(cls)
    opt.param_groups[0][key] = value
    before = _snapshot(opt, buf)
    with pytest.raises(error, match=f"param group 0.*{match}|{match}"):
        _step_with(opt, buf)
    _assert_unchanged(before, opt, buf)


def test_option_set_before_the_first_step_allocates_its_state():
    buf = fastopt.ParamBuffer(_arrays())
    opt = fastopt.RMSprop(buf)
    opt.param_groups[0]["centered"] = True
    _step_with(opt, buf)
    assert "grad_avg" in opt.arenas


@pytest.mark.parametrize("cls", [fastopt.SGD, fastopt.LARS])
def test_sgd_momentum_turned_on_mid_run_starts_from_the_gradient(cls):
    """torch.optim.SGD (timm's Lars too) creates the buffer from the gradient when momentum
    first applies: the same as a fresh optimizer with momentum stepping from there."""
    late, buf = _stepped(cls, lr=0.1, momentum=0.0, steps=2)
    late.param_groups[0]["momentum"] = 0.9
    fresh = cls(fastopt.ParamBuffer([a.copy() for a in buf.params]), lr=0.1, momentum=0.9)
    for t in range(3):
        _step_with(late, buf, seed=200 + t)
        fbuf = fresh._buffer
        _step_with(fresh, fbuf, seed=200 + t)
    np.testing.assert_array_equal(buf.arena, fbuf.arena)
    assert late.steps == 5


def test_sgd_momentum_turned_on_mid_run_matches_torch():
    torch = pytest.importorskip("torch")
    opt, buf = _stepped(fastopt.SGD, lr=0.1, momentum=0.0, steps=0)
    ps = [torch.nn.Parameter(torch.tensor(a.copy())) for a in buf.params]
    ref = torch.optim.SGD(ps, lr=0.1, momentum=0.0, foreach=False)
    for t in range(5):
        if t == 2:
            opt.param_groups[0]["momentum"] = 0.9
            ref.param_groups[0]["momentum"] = 0.9
        _step_both(opt, buf, ref, ps, seed=300 + t)
    _assert_like_torch(buf, ps)


def _step_both(opt, buf, ref, ps, seed):
    """One step of ``opt`` over ``buf`` and of the torch optimizer ``ref`` over ``ps``, same gradients."""
    import torch
    _step_with(opt, buf, seed=seed)
    for p, g in zip(ps, _arrays(seed)):
        p.grad = torch.tensor(g)
    ref.step()


def _assert_like_torch(buf, ps):
    for a, p in zip(buf.params, ps):
        np.testing.assert_allclose(a, p.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_lr_edit_does_not_trigger_a_recheck():
    opt, buf = _stepped()
    opt.param_groups[0]["lr"] = 0.01
    assert not opt._edited[0]
    opt.param_groups[0]["eps"] = 1e-6
    assert opt._edited[0]
    _step_with(opt, buf)
    assert not opt._edited[0]


@pytest.mark.parametrize("rule", sorted(fastopt.OPTIMIZERS))
def test_every_hyper_parameter_edited_mid_run_is_used(rule):
    """A step after an edit of any hyper-parameter (each optimizer packs the constant
    scalars once per group) equals a fresh optimizer given the edited values and the state
    before the edit, bit for bit."""
    from cases import hparams
    cls = fastopt.OPTIMIZERS[rule]
    before, after = hparams(rule, 1), hparams(rule, 2)
    opt, buf = _stepped(cls, **before)
    needed = opt.states_needed(opt.param_groups[0])
    edits = {k: v for k, v in after.items()
             if k != "lr" and opt.states_needed({**opt.param_groups[0], k: v}) == needed}
    assert edits, f"{rule}: no hyper-parameter to edit"
    saved = opt.state_dict()
    for k, v in edits.items():
        opt.param_groups[0][k] = v
        saved["param_groups"][0][k] = v
    fresh_buf = fastopt.ParamBuffer([a.copy() for a in buf.params])
    fresh = cls(fresh_buf, **before)
    fresh.load_state_dict(saved)
    for t in range(3):
        _step_with(opt, buf, seed=400 + t)
        _step_with(fresh, fresh_buf, seed=400 + t)
    np.testing.assert_array_equal(buf.arena, fresh_buf.arena)
    assert opt.param_groups[0]["lr"] == fresh.param_groups[0]["lr"]


def test_list_hyper_parameters_become_tuples():
    """A list (betas) is stored as a tuple: an edit in place could not be seen by the checks."""
    opt, buf = _stepped(betas=[0.8, 0.9])
    assert opt.param_groups[0]["betas"] == (0.8, 0.9)
    opt.param_groups[0]["betas"] = [0.7, 0.95]
    _step_with(opt, buf)
    assert opt.param_groups[0]["betas"] == (0.7, 0.95)


# -- 4. concurrent use -----------------------------------------------------------------------

@pytest.mark.parametrize("form", ["buffer", "arrays"])
def test_threads_stepping_one_optimizer(form):
    """Four threads, 50 steps each, from the very first step (the plans are built then):
    every step counted, and the result that of 200 steps in one thread, bit for bit."""
    import sys
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up
    shapes = [(300, 100), (100,), (7, 9)] * 4
    grads = _arrays(5, shapes=shapes)

    def model():
        init = _arrays(shapes=shapes)
        if form == "arrays":
            return fastopt.Adam(init, lr=1e-2, max_grad_norm=1.0), init, grads
        buf = fastopt.ParamBuffer(init)
        for view, g in zip(buf.grads, grads):
            view[...] = g
        return fastopt.Adam(buf, lr=1e-2, max_grad_norm=1.0), buf.params, None

    opt, params, g = model()
    errors = []

    def work():
        try:
            for _ in range(50):
                opt.step(g)
        except Exception as e:  # pragma: no cover - what the test looks for
            errors.append(e)
    try:
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors and opt.steps == 200
    ref, ref_params, g = model()
    for _ in range(200):
        ref.step(g)
    for a, b in zip(params, ref_params):
        np.testing.assert_array_equal(a, b)


def test_save_while_another_thread_steps_is_a_consistent_snapshot(tmp_path):
    """Each checkpoint taken while another thread steps loads to a state of the sequential
    trajectory: the params and moments of one and the same step."""
    import sys
    shapes = [(300, 100), (100,), (7, 9)] * 2
    grads = _arrays(5, shapes=shapes)

    def model():
        buf = fastopt.ParamBuffer(_arrays(shapes=shapes))
        for view, g in zip(buf.grads, grads):
            view[...] = g
        return fastopt.Adam(buf, lr=1e-2), buf

    ref, ref_buf = model()
    trajectory = {0: (ref_buf.arena.copy(), None)}
    for t in range(1, 201):
        ref.step()
        trajectory[t] = (ref_buf.arena.copy(), ref.arenas["exp_avg"].copy())
    opt, buf = model()
    opt.step()
    done = threading.Event()

    def work():
        for _ in range(199):
            opt.step()
        done.set()
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        thread = threading.Thread(target=work)
        thread.start()
        paths = []
        while not done.is_set() and len(paths) < 30:
            paths.append(fastopt.save(tmp_path / f"c{len(paths)}.npz", opt, buf))
        thread.join()
    finally:
        sys.setswitchinterval(old)
    assert paths
    for path in paths:
        check, check_buf = model()
        fastopt.load(path, check, check_buf)
        params, exp_avg = trajectory[check.steps]
        np.testing.assert_array_equal(check_buf.arena, params)
        np.testing.assert_array_equal(check.arenas["exp_avg"], exp_avg)


# -- 6. aliasing and padding -----------------------------------------------------------------

def test_frombuffer_alias_is_refused():
    p, g = np.ones(8), np.ones(8)
    m = np.zeros(8)
    alias = np.frombuffer(m.data, dtype=m.dtype)  # another base object over the same memory
    alias.flags.writeable = True if alias.flags.writeable else alias.flags.writeable
    with pytest.raises(ValueError, match="exp_avg and exp_avg_sq share memory"):
        fastopt.functional.adam_(p, g, m, alias, step=1)
    assert (p == 1).all() and (m == 0).all()


def test_grads_swapped_with_params_is_refused():
    params = _arrays(shapes=[(4,), (4,), (4,)])
    opt = fastopt.SGD(params, lr=0.1)
    before = [a.copy() for a in params]
    with pytest.raises(ValueError, match=r"params\[1\] and grads\[0\] share memory|"
                                         r"params\[0\] and grads\[1\] share memory"):
        opt.step([params[1], params[0], params[2]])
    with pytest.raises(ValueError, match=r"params\[0\] and grads\[0\] share memory"):
        opt.step([params[0], params[1].copy(), params[2].copy()])
    for a, b in zip(params, before):
        np.testing.assert_array_equal(a, b)


def test_layerwise_aliases_are_refused():
    from fastopt import layerwise
    p, g = np.ones(4), np.ones(4)
    with pytest.raises(ValueError, match=r"params\[0\] and params\[1\] share memory"):
        layerwise.lamb_([p, p], [g, g], [np.zeros(4), np.zeros(4)], [np.zeros(4), np.zeros(4)], step=1)
    s = np.zeros(4)
    with pytest.raises(ValueError, match="share memory"):
        layerwise.lamb_([np.ones(4), np.ones(4)], [g, g], [s, s], [np.zeros(4), np.zeros(4)], step=1)
    assert (p == 1).all() and (s == 0).all()


def test_arena_padding_never_counts_toward_the_norm_or_the_guard():
    buf = fastopt.ParamBuffer(_arrays())  # 15, 3 and 4 elements: each padded to 8 (float64)
    assert buf.grad_arena.size > buf.numel
    opt = fastopt.Adam(buf, max_grad_norm=1e9)
    buf.grad_arena.fill(1.0)
    opt.step()
    assert opt.last_grad_norm == pytest.approx(np.sqrt(buf.numel))
    buf.grad_arena.fill(0.0)
    padding = np.ones(buf.grad_arena.size, bool)
    for o, a in zip(buf.offsets, buf.params):
        padding[o:o + a.size] = False
    buf.grad_arena[padding] = np.nan
    opt.step()
    assert not opt.last_step_skipped and opt.steps == 2


def test_clip_checks_every_grad_before_scaling_any():
    first, second = np.full(4, 10.0), np.full(4, 10.0)
    second.flags.writeable = False
    with pytest.raises(ValueError, match=r"grads\[1\] is read-only"):
        fastopt.clip_grad_norm_([first, second], 1.0)
    assert (first == 10.0).all()


def test_numpy_scalars_are_numbers():
    grads = [np.full(4, 10.0)]
    assert fastopt.clip_grad_norm_(grads, np.float32(1.0)) == pytest.approx(20.0)
    opt = fastopt.Adam([np.ones(4)], max_grad_norm=np.float32(1.0), lr=np.float64(0.1))
    opt.step([np.ones(4)])
    assert opt.steps == 1


@pytest.mark.parametrize("shape, error", [((-1, 4), ValueError), ((3.5,), TypeError), (("3",), TypeError)])
def test_param_buffer_refuses_bad_shapes(shape, error):
    with pytest.raises(error, match=r"shapes\[0\]"):
        fastopt.ParamBuffer(shapes=[shape])


# -- 8. cases the suite did not cover --------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_guard_catches_every_nonfinite_value(bad, nonfinite):
    opt, buf = _stepped(nonfinite=nonfinite)
    buf.grads[1][2] = bad
    before = _snapshot(opt, buf)
    if nonfinite == "raise":
        with pytest.raises(FloatingPointError):
            opt.step()
    else:
        opt.step()
        assert opt.last_step_skipped and opt.skipped_steps == 1
    _assert_unchanged(before, opt, buf)


def test_hyper_parameter_types_checked_at_construction():
    with pytest.raises(TypeError, match="amsgrad must be True or False"):
        fastopt.Adam([np.ones(3)], amsgrad="no")
    with pytest.raises(TypeError, match="eps must be a real number"):
        fastopt.Adam([np.ones(3)], eps="1e-8")


def test_adam_rule_checks_are_the_constructors():
    """The re-check after an edit uses the rule's own messages."""
    with pytest.raises(ValueError) as direct:
        adam_rule.ADAM.check(dict(adam_rule.ADAM.defaults, betas=(2.0, 0.999)))
    opt, buf = _stepped()
    opt.param_groups[0]["betas"] = (2.0, 0.999)
    with pytest.raises(ValueError) as edited:
        _step_with(opt, buf)
    assert str(direct.value) in str(edited.value)


def test_first_step_with_no_gradient_warns():
    buf = fastopt.ParamBuffer(_arrays())
    opt = fastopt.Adam(buf)
    with pytest.warns(RuntimeWarning, match="every gradient zero"):
        opt.step()


# -- found in review: each fails on the first version of this change ---------------------------

def test_load_checks_the_params_it_writes_before_anything(tmp_path):
    params = [np.ones((5, 3)), np.ones(3)]
    opt = fastopt.Adam(params)
    opt.step([np.ones((5, 3)), np.ones(3)])
    path = fastopt.save(tmp_path / "c.npz", opt, params)
    fresh = fastopt.Adam([np.zeros((5, 3)), np.zeros(3)])
    readonly = np.zeros(3)
    readonly.flags.writeable = False
    for bad, match in [([np.zeros((3, 5)).T, np.zeros(3)], "not C-contiguous"),
                       ([np.zeros((5, 3)), readonly], "read-only")]:
        with pytest.raises(ValueError, match=match):
            fastopt.load(path, fresh, bad)
        assert fresh.steps == 0 and fresh.arenas is None


def test_a_groups_params_cannot_be_replaced():
    opt, buf = _stepped()
    with pytest.raises(ValueError, match="params cannot be replaced"):
        opt.param_groups[0]["params"] = [np.ones(3)]
    with pytest.raises(TypeError, match="add_param_group"):
        opt.param_groups.append({"params": [np.ones(3)]})
    opt.param_groups[0] = {"params": [np.ones(3)], "lr": 0.1}
    before = _snapshot(opt, buf)
    with pytest.raises(ValueError, match="params were replaced"):
        _step_with(opt, buf)
    _assert_unchanged(before, opt, buf)


def test_a_group_replaced_by_a_dict_is_checked_and_used():
    opt, buf = _stepped()
    group = dict(opt.param_groups[0], eps=-1.0)
    opt.param_groups[0] = group
    with pytest.raises(ValueError, match="epsilon"):
        _step_with(opt, buf)
    opt.param_groups[0] = dict(group, eps=1e-8, lr=0.5)
    ref, ref_buf = _stepped()
    ref.param_groups[0]["lr"] = 0.5
    _step_with(opt, buf)
    _step_with(ref, ref_buf)
    np.testing.assert_array_equal(buf.arena, ref_buf.arena)


def test_a_fixed_option_cannot_be_edited():
    opt, buf = _stepped(fastopt.AdamW)
    opt.param_groups[0]["decoupled_weight_decay"] = False
    with pytest.raises(ValueError, match="decoupled_weight_decay is True in AdamW"):
        _step_with(opt, buf)


def test_a_restart_pending_over_a_skipped_step_holds():
    """Momentum turned on, the next step skipped (NaN), then another group edited: the
    buffer still starts from the gradient, as torch's would."""
    buf = fastopt.ParamBuffer([np.ones(4), np.ones(4)])
    opt = fastopt.SGD([{"params": buf.params[:1]}, {"params": buf.params[1:]}], lr=0.1)
    buf.grad_arena[:] = 1.0
    opt.step()
    opt.param_groups[0]["momentum"], opt.param_groups[0]["dampening"] = 0.9, 0.5
    buf.grads[0][0] = np.nan
    opt.step()
    assert opt.last_step_skipped
    buf.grad_arena[:] = 1.0
    opt.param_groups[1]["momentum"] = 0.9
    opt.step()
    np.testing.assert_array_equal(opt.state_views(0)["momentum_buffer"], np.ones(4))  # g, not (1 - 0.5) g


def test_numpy_scalar_hyper_parameters_save(tmp_path):
    opt = fastopt.Adam([np.ones(3)], lr=np.float32(0.1), weight_decay=np.float64(0.01), amsgrad=np.bool_(True))
    opt.step([np.ones(3)])
    fresh = fastopt.Adam([np.ones(3)], amsgrad=True)
    fastopt.load(fastopt.save(tmp_path / "c.npz", opt), fresh)
    assert fresh.steps == 1 and fresh.param_groups[0]["lr"] == pytest.approx(0.1)


def test_restore_refuses_what_does_not_fit():
    opt, buf = _stepped()
    before = _snapshot(opt, buf)
    groups = [dict(g) for g in opt.param_groups]
    for steps, arrays in [([7, 7], {}), ([7], {(1, "exp_avg"): np.full(9, 5.0)}), ([-1], {}),
                          ([7], {(1, "bogus"): np.zeros(3)})]:
        with pytest.raises(ValueError, match="restore"):
            opt.restore(groups, steps, arrays)
    _assert_unchanged(before, opt, buf)


@pytest.mark.parametrize("step", [1e300, 2 ** 60])
def test_huge_step_counts_are_refused(step):
    opt, _ = _stepped(fastopt.NAdam)
    sd = opt.state_dict()
    for entry in sd["state"].values():
        entry["step"] = step
    with pytest.raises(ValueError, match="step"):
        opt.load_state_dict(sd)


def test_nadam_schedule_product_at_a_late_step_is_quick():
    from fastopt.kernels import nadam
    assert nadam.mu_product(2 ** 40, 0.9, 4e-3) < 1e-300


# -- 4. a restart pending at a save, and the counts a resumed run goes on from ---------------

def _sgd_momentum_turned_on(state_bits=None, skip=True):
    """SGD (dampening 0.5) over a 4,200-element tensor (8-bit state for it) and a small one:
    2 steps without momentum, then momentum turned on and (``skip``) a NaN step skipped, so
    the buffer's start from the gradient is still pending."""
    rng = np.random.default_rng(3)
    params = [rng.standard_normal(4200).astype(np.float32), rng.standard_normal(7).astype(np.float32)]
    opt = fastopt.SGD(params, lr=0.1, dampening=0.5, state_bits=state_bits)
    for _ in range(2):
        opt.step([rng.standard_normal(a.size).astype(np.float32) for a in params])
    opt.param_groups[0]["momentum"] = 0.9
    if skip:
        opt.step([np.full(a.size, np.nan, np.float32) for a in params])
        assert opt.last_step_skipped
    return opt, params


def _go_on(opt, params, steps=3):
    rng = np.random.default_rng(11)
    for _ in range(steps):
        opt.step([rng.standard_normal(a.size).astype(np.float32) for a in params])


@pytest.mark.parametrize("state_bits", [None, 8])
@pytest.mark.parametrize("skip", [True, False], ids=["after-a-skipped-step", "edit-not-yet-stepped"])
@pytest.mark.parametrize("how", ["checkpoint", "state_dict"])
def test_a_pending_momentum_start_survives_save_and_load(tmp_path, how, skip, state_bits):
    """The buffer a restart starts from the gradient, pending at the save (over a skipped
    step, or an edit no step has seen), starts so after the load too: the resumed run equals
    the uninterrupted one bit for bit (the skip count goes on as well)."""
    whole, wparams = _sgd_momentum_turned_on(state_bits, skip)
    half, hparams = _sgd_momentum_turned_on(state_bits, skip)
    resumed_params = [np.zeros_like(a) for a in hparams]
    resumed = fastopt.SGD(resumed_params, lr=0.1, dampening=0.5, state_bits=state_bits)  # momentum 0 here
    if how == "checkpoint":
        fastopt.load(fastopt.save(tmp_path / "c.npz", half, hparams), resumed, resumed_params)
    else:
        resumed.load_state_dict(half.state_dict())
        for a, b in zip(resumed_params, hparams):
            a[...] = b
    assert resumed.skipped_steps == whole.skipped_steps == int(skip)
    _go_on(whole, wparams)
    _go_on(resumed, resumed_params)
    for a, b in zip(wparams, resumed_params):
        np.testing.assert_array_equal(a, b)
    for n, arena in whole.export_state()["arenas"].items():
        np.testing.assert_array_equal(arena, resumed.export_state()["arenas"][n], err_msg=n)


def test_a_torch_sgd_state_without_its_buffer_starts_it_from_the_gradient():
    """torch's SGD makes a momentum buffer at its first update with momentum: a state dict
    whose steps were taken without momentum has none, and the buffer starts from the next
    gradient on either side."""
    torch = pytest.importorskip("torch")
    p = np.ones(5)
    opt = fastopt.SGD([p], lr=0.1)
    opt.step([np.ones(5)])
    sd = opt.state_dict()
    sd["param_groups"][0]["momentum"] = 0.9
    assert "momentum_buffer" not in sd["state"][0]
    loaded = fastopt.SGD([p.copy()], lr=0.1)
    loaded.load_state_dict(sd)
    loaded.step([np.full(5, 2.0)])
    np.testing.assert_array_equal(loaded.state_views(0)["momentum_buffer"], np.full(5, 2.0))
    tp = torch.ones(5, dtype=torch.float64, requires_grad=True)
    topt = torch.optim.SGD([tp], lr=0.1, momentum=0.9)
    tp.grad = torch.full((5,), 2.0, dtype=torch.float64)
    topt.step()
    np.testing.assert_array_equal(topt.state[tp]["momentum_buffer"].numpy(), np.full(5, 2.0))


def test_a_state_dict_with_some_buffers_missing_is_refused():
    opt, _ = _stepped(fastopt.SGD, momentum=0.9)
    sd = opt.state_dict()
    del sd["state"][1]["momentum_buffer"]
    fresh, fbuf = _stepped(fastopt.SGD, momentum=0.9)
    before = _snapshot(fresh, fbuf)
    with pytest.raises(ValueError, match="some params' state has 'momentum_buffer' and some not"):
        fresh.load_state_dict(sd)
    _assert_unchanged(before, fresh, fbuf)


# -- 5. the gradient factor and an AMP scaler's values --------------------------------------

@pytest.mark.parametrize("grad_scale", [0.0, -1.0, float("nan"), float("inf"), 1e39, "2"])
def test_a_bad_grad_scale_is_refused_before_any_write(grad_scale):
    opt, buf = _stepped(fastopt.Adam)
    before = _snapshot(opt, buf)
    with pytest.raises(ValueError, match="grad_scale must be a finite positive number"):
        opt.step(grad_scale=grad_scale)
    _assert_unchanged(before, opt, buf)


@pytest.mark.parametrize("loss_scale", [0.0, -2.0, float("nan"), float("inf"), 1e-45])
@pytest.mark.parametrize("nonfinite", ["skip", "raise", "propagate"])
def test_a_loss_scale_that_is_no_finite_positive_number_skips_the_step(loss_scale, nonfinite):
    """As an inf found by the scaler: nothing written, the step counted as skipped (the
    device-side step decides alike, where nothing can be raised without a sync)."""
    opt, buf = _stepped(fastopt.Adam, nonfinite=nonfinite)
    before = _snapshot(opt, buf)
    opt.step(loss_scale=np.array([loss_scale], np.float32), found_inf=np.zeros(1, np.float32))
    assert opt.last_step_skipped and opt.skipped_steps == 1
    _assert_unchanged(before, opt, buf)
    opt.step(loss_scale=np.array([2.0], np.float32), found_inf=np.zeros(1, np.float32))
    assert not opt.last_step_skipped and opt.steps == 3


def test_nadam_resumes_exactly_after_a_beta_edit(tmp_path):
    """NAdam's running mu_product (each step's beta1) is saved: a checkpoint taken after beta1
    was edited resumes bit for bit."""
    def run(opt, buf, steps):
        for t in steps:
            if t == 2:
                opt.param_groups[0]["betas"] = (0.8, 0.99)
            _step_with(opt, buf, seed=t)
    whole, wbuf = _stepped(fastopt.NAdam, steps=0)
    run(whole, wbuf, range(6))
    half, hbuf = _stepped(fastopt.NAdam, steps=0)
    run(half, hbuf, range(4))
    fresh, fbuf = _stepped(fastopt.NAdam, steps=0)
    fastopt.load(fastopt.save(tmp_path / "c.npz", half, hbuf), fresh, fbuf)
    run(fresh, fbuf, range(4, 6))
    np.testing.assert_array_equal(fbuf.arena, wbuf.arena)
    assert fresh.running_values(0) == whole.running_values(0)


# an option turned off mid-run and on again (its state kept meanwhile, as torch keeps it):
# (class, option, on, off)
TOGGLES = [(fastopt.SGD, "momentum", 0.9, 0.0), (fastopt.RMSprop, "momentum", 0.5, 0.0),
           (fastopt.RMSprop, "centered", True, False), (fastopt.Adam, "amsgrad", True, False)]


def _resume(opt, buf, via, tmp_path):
    """A new optimizer and buffer resumed from ``opt`` ``via`` a state dict, torch's layout
    or a checkpoint; the new optimizer is built with the options as they are now."""
    hyper = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    groups = [{"params": [], **{k: v for k, v in g.items() if k != "params"}} for g in opt.param_groups]
    new_buf = fastopt.ParamBuffer([a.copy() for a in buf.params])
    first = 0
    for g, saved in zip(groups, opt.param_groups):
        g["params"] = new_buf.params[first:first + len(saved["params"])]
        first += len(saved["params"])
    new = type(opt)(groups, **{k: v for k, v in hyper.items() if k not in opt.rule.fixed})
    if via == "checkpoint":
        fastopt.load(fastopt.save(tmp_path / "c.npz", opt), new)
    else:
        new.load_state_dict(opt.state_dict(torch=via == "torch layout"))
    return new, new_buf


@pytest.mark.parametrize("via", ["state dict", "torch layout", "checkpoint"])
@pytest.mark.parametrize("cls,option,on,off", TOGGLES, ids=[f"{c.__name__}-{o}" for c, o, _, _ in TOGGLES])
def test_a_state_kept_while_its_option_is_off_survives_a_resume(cls, option, on, off, via, tmp_path):
    """Saved while the option is off, loaded, the option back on: the resumed run reads the
    kept state as the uninterrupted run does, bit for bit (it restarted SGD's momentum from
    the gradient, 0.85 off, and refused RMSprop's and Adam's as never kept)."""
    runs = []
    for resume in (False, True):
        opt, buf = _stepped(cls, lr=0.01, steps=2, **{option: on})
        opt.param_groups[0][option] = off
        _step_with(opt, buf, seed=400)
        if resume:
            opt, buf = _resume(opt, buf, via, tmp_path)
        opt.param_groups[0][option] = on
        for t in range(2):
            _step_with(opt, buf, seed=401 + t)
        runs.append(buf.arena.copy())
    np.testing.assert_array_equal(*runs)


@pytest.mark.parametrize("via", ["state dict", "checkpoint"])
def test_a_group_that_never_started_a_state_starts_it_from_the_gradient_after_a_resume(via, tmp_path):
    """Two groups, momentum in the first only: the second group's slice of the momentum arena
    holds zeros it never started; turned on after a resume, its buffer starts from the
    gradient, as in the uninterrupted run."""
    runs = []
    for resume in (False, True):
        opt, buf = _stepped(fastopt.SGD, lr=0.1, steps=2, groups=[(0, 1), (1, 3)], momentum=0.0)
        opt.param_groups[0]["momentum"] = 0.9
        _step_with(opt, buf, seed=500)
        if resume:
            opt, buf = _resume(opt, buf, via, tmp_path)
        opt.param_groups[1]["momentum"] = 0.9
        for t in range(2):
            _step_with(opt, buf, seed=501 + t)
        runs.append(buf.arena.copy())
    np.testing.assert_array_equal(*runs)


@pytest.mark.parametrize("via", [None, "state dict", "checkpoint"])
def test_momentum_turned_on_and_off_again_before_any_update_is_never_made(via, tmp_path):
    """Momentum on, then a step the guard skips (the edit settled, no update used it), then off
    again: torch never made the buffer, so momentum on later starts it from the gradient
    (with dampening the difference shows: a zero buffer gives (1 - dampening) g). The same
    uninterrupted and resumed."""
    torch = pytest.importorskip("torch")
    opt, buf = _stepped(fastopt.SGD, lr=0.1, dampening=0.5, steps=1)
    ps = [torch.nn.Parameter(torch.tensor(a.copy())) for a in buf.params]
    ref = torch.optim.SGD(ps, lr=0.1, dampening=0.5, foreach=False)
    opt.param_groups[0]["momentum"] = 0.9
    buf.grads[0][0, 0] = np.nan
    opt.step()
    assert opt.last_step_skipped
    opt.param_groups[0]["momentum"] = 0.0
    if via is not None:
        opt, buf = _resume(opt, buf, via, tmp_path)
    for t, momentum in enumerate([0.0, 0.9, 0.9]):
        opt.param_groups[0]["momentum"] = ref.param_groups[0]["momentum"] = momentum
        _step_both(opt, buf, ref, ps, seed=600 + t)
    _assert_like_torch(buf, ps)


def test_a_group_replaced_before_the_first_step_is_checked_and_adopted():
    """As after a step: a dict with other params is refused (the state is laid out for the
    params it replaces: it stepped the new array and left the real one), a bad value is
    refused, and an edit of the adopted dict is seen."""
    p, q = np.ones(4), np.full(6, 5.0)
    opt = fastopt.SGD([p], lr=0.1)
    opt.param_groups[0] = {**opt.param_groups[0], "params": [q]}
    with pytest.raises(ValueError, match="its params were replaced"):
        opt.step([np.ones(4)])
    with pytest.raises(ValueError, match="its params were replaced"):
        opt.load_state_dict(fastopt.SGD([np.ones(4)], lr=0.1).state_dict())
    assert (p == 1).all() and (q == 5).all()
    opt.param_groups[0] = {**opt.param_groups[0], "params": [p], "momentum": -5.0}
    with pytest.raises(ValueError, match="momentum"):
        opt.step([np.ones(4)])
    assert (p == 1).all()
    opt.param_groups[0] = {**opt.param_groups[0], "params": [p], "momentum": 0.0}
    opt.step([np.ones(4)])
    opt.param_groups[0]["weight_decay"] = 1.0  # an edit of the adopted dict
    opt.step([np.ones(4)])
    np.testing.assert_allclose(p, 0.9 - 0.1 * (1 + 0.9))


def test_a_refused_first_step_lays_nothing_out():
    """Gradients of the wrong shape: refused before the state arenas are laid out, so groups
    can still be added (the optimizer has not stepped)."""
    opt = fastopt.Adam([np.ones(4)])
    with pytest.raises(ValueError, match="shape"):
        opt.step([np.ones(5)])
    assert opt.arenas is None and opt.steps == 0
    opt.add_param_group({"params": [np.ones(2)]})


def test_a_group_replaced_by_a_dict_may_name_its_param_buffer():
    buf = fastopt.ParamBuffer([np.ones(4), np.ones(2)])
    opt = fastopt.SGD(buf, lr=0.1)
    opt.param_groups[0] = {**opt.param_groups[0], "params": buf, "lr": 0.5}
    buf.grad_arena[...] = 1.0
    opt.step()
    np.testing.assert_allclose(buf.params[0], 0.5)


def test_a_group_of_separate_arrays_replaced_after_a_step_steps_every_group():
    """Gradients are split by group: a replaced group's dict is a new object (it raised
    KeyError after the groups before it had stepped, and again at every later step)."""
    p0, p1 = np.ones(3), np.ones(3)
    opt = fastopt.SGD([{"params": [p0]}, {"params": [p1]}], lr=0.05)
    grads = [np.ones(3), np.ones(3)]
    opt.step(grads)
    opt.param_groups[1] = {**opt.param_groups[1], "lr": 0.1}
    opt.step(grads)
    np.testing.assert_allclose(p0, 0.9)
    np.testing.assert_allclose(p1, 0.85)
    assert opt._steps() == [2, 2]


@pytest.mark.parametrize("name,value,match", [
    ("max_grad_norm", -1.0, "max_grad_norm must be None or a positive number"),
    ("max_grad_norm", float("nan"), "max_grad_norm must be"), ("max_grad_norm", "1", "max_grad_norm must be"),
    ("max_grad_norm", 0.0, "max_grad_norm must be"), ("nonfinite", "skp", "nonfinite must be one of")])
def test_clipping_and_guard_options_set_between_steps_are_checked(name, value, match):
    """They are attributes a step reads as they are: a negative max_grad_norm climbed the
    gradient, NaN made every param NaN, a misspelt nonfinite let NaN through."""
    opt, buf = _stepped(max_grad_norm=1.0)
    before = _snapshot(opt, buf)
    with pytest.raises(ValueError, match=match):
        setattr(opt, name, value)
    assert opt.max_grad_norm == 1.0 and opt.nonfinite == "skip"
    _step_with(opt, buf)
    opt.max_grad_norm, opt.nonfinite = None, "propagate"  # valid values are taken
    _step_with(opt, buf)
    assert opt.last_grad_norm is not None and before[2] == [2]


def test_adamw_takes_a_group_that_carries_its_fixed_key():
    """AdamW's own groups hold decoupled_weight_decay=True: a model rebuilt from them works, as
    torch's AdamW takes it; the other value is refused."""
    opt = fastopt.AdamW([np.ones(3)])
    again = fastopt.AdamW([{**opt.param_groups[0], "params": [np.ones(3)]}])
    assert again.param_groups[0]["decoupled_weight_decay"] is True
    with pytest.raises(ValueError, match="decoupled_weight_decay is True in AdamW"):
        fastopt.AdamW([{"params": [np.ones(3)], "decoupled_weight_decay": False}])


def test_param_groups_slices_cannot_drop_or_add_groups():
    opt = fastopt.SGD([{"params": [np.ones(3)]}, {"params": [np.ones(3)]}], lr=0.1)
    with pytest.raises(TypeError, match="replace one group at a time"):
        opt.param_groups[1:] = []
    assert len(opt.param_groups) == 2
