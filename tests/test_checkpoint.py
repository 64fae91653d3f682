"""Nothing is lost: checkpoints resume bit for bit, are written atomically and refuse a
model they do not fit; torch.optim state dicts cross over in both directions."""
import os

import numpy as np
import pytest

import fastopt
from cases import hparams
from conftest import to_backend, to_host
from fastopt.kernels import RULES

SHAPES = [(9, 4), (4,), (5, 3, 2), (1,)]


def _grads(seed, steps, dtype):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(steps)]


def _model(rule, hp, dtype, backend="cpu", buffer=True):
    rng = np.random.default_rng(0)
    init = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    if buffer:
        buf = fastopt.ParamBuffer(init)
        groups = [{"params": buf.params[:2]}, {"params": buf.params[2:], "lr": hp.get("lr", 1e-3) * 3}]
        return fastopt.OPTIMIZERS[rule](groups, **hp), buf
    params = [to_backend(a, backend) for a in init]
    return fastopt.OPTIMIZERS[rule](params, **hp), params


def _step(opt, params, grads, backend="cpu"):
    if isinstance(params, fastopt.ParamBuffer):
        for view, g in zip(params.grads, grads):
            view[...] = g
        opt.step()
    else:
        opt.step([to_backend(g, backend) for g in grads])


def _host_params(params):
    arrays = params.params if isinstance(params, fastopt.ParamBuffer) else params
    return [to_host(a) for a in arrays]


def _resume_equals_uninterrupted(tmp_path, rule, dtype, backend="cpu", buffer=True, steps=6, stop=3, hp=None):
    hp = hparams(rule, 1) if hp is None else hp
    grads = _grads(1, steps, dtype)
    whole, wp = _model(rule, hp, dtype, backend, buffer)
    for g in grads:
        _step(whole, wp, g, backend)

    first, fp = _model(rule, hp, dtype, backend, buffer)
    for g in grads[:stop]:
        _step(first, fp, g, backend)
    path = tmp_path / "ckpt.npz"
    fastopt.save(path, first, fp)
    resumed, rp = _model(rule, dict(hp, lr=0.5) if "lr" in hp else hp, dtype, backend, buffer)
    fastopt.load(path, resumed, rp)  # the checkpoint's lr wins over the constructor's
    for g in grads[stop:]:
        _step(resumed, rp, g, backend)

    for a, b in zip(_host_params(wp), _host_params(rp)):
        np.testing.assert_array_equal(a, b)
    for name, arena in whole.arenas.items():
        np.testing.assert_array_equal(to_host(arena), to_host(resumed.arenas[name]), err_msg=name)
    assert resumed.steps == whole.steps == steps


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_resume_is_bit_exact(tmp_path, rule, dtype):
    _resume_equals_uninterrupted(tmp_path, rule, dtype)


@pytest.mark.parametrize("rule, hp", [("lamb", dict(lr=1e-2)), ("lars", dict(lr=0.1, momentum=0.9, weight_decay=1e-4))])
def test_resume_is_bit_exact_layerwise(tmp_path, rule, hp):
    _resume_equals_uninterrupted(tmp_path, rule, np.float32, hp=hp)


@pytest.mark.parametrize("rule", ["adam", "sgd"])
def test_resume_is_bit_exact_with_separate_arrays(tmp_path, rule):
    _resume_equals_uninterrupted(tmp_path, rule, np.float32, buffer=False)


@pytest.mark.cuda
@pytest.mark.parametrize("rule", ["adam", "nadam"])
def test_resume_is_bit_exact_on_cuda(tmp_path, rule):
    _resume_equals_uninterrupted(tmp_path, rule, np.float32, backend="cuda", buffer=False, steps=3, stop=2)


def test_save_is_atomic(tmp_path, monkeypatch):
    opt, buf = _model("adam", {}, np.float32)
    _step(opt, buf, _grads(2, 1, np.float32)[0])
    path = tmp_path / "ckpt.npz"
    fastopt.save(path, opt, buf)
    good = path.read_bytes()

    def crash(f, **arrays):
        f.write(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(np, "savez", crash)
    _step(opt, buf, _grads(3, 1, np.float32)[0])
    with pytest.raises(OSError, match="disk full"):
        fastopt.save(path, opt, buf)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["ckpt.npz"]  # no temporary file left behind


def _mismatch_cases():
    return [
        ("rule", lambda: _model("sgd", dict(lr=0.1), np.float32), "optimizer is SGD here but Adam"),
        ("dtype", lambda: _model("adam", {}, np.float64), "dtype is float64 here but float32"),
        ("shape", lambda: (fastopt.Adam([np.zeros(s, np.float32) for s in [(9, 4), (4,), (5, 3, 3), (1,)]]), None),
         r"param 2 has shape \(5, 3, 3\) here but \(5, 3, 2\)"),
        ("count", lambda: (fastopt.Adam([np.zeros((9, 4), np.float32)]), None), "1 params here but 4"),
    ]


@pytest.mark.parametrize("name, make, match", _mismatch_cases(), ids=[c[0] for c in _mismatch_cases()])
def test_load_names_what_differs(tmp_path, name, make, match):
    opt, buf = _model("adam", {}, np.float32)
    _step(opt, buf, _grads(4, 1, np.float32)[0])
    path = tmp_path / "ckpt.npz"
    fastopt.save(path, opt)
    other, _ = make()
    before = {k: to_host(v) for k, v in (other.arenas or {}).items()}
    with pytest.raises(ValueError, match=match):
        fastopt.load(path, other)
    assert {k: to_host(v) for k, v in (other.arenas or {}).items()}.keys() == before.keys()
    assert other.steps == 0


def test_load_rejects_a_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, x=np.zeros(3))
    opt, _ = _model("adam", {}, np.float32)
    with pytest.raises(ValueError, match="not a fastopt checkpoint"):
        fastopt.load(path, opt)


def test_load_checks_params(tmp_path):
    opt, buf = _model("adam", {}, np.float32)
    path = tmp_path / "ckpt.npz"
    fastopt.save(path, opt)
    with pytest.raises(ValueError, match="checkpoint holds none"):
        fastopt.load(path, opt, buf)


# -- torch.optim state dicts, both ways -----------------------------------------------

TORCH_RULES = ["sgd", "adagrad", "rmsprop", "adam", "adamw", "adadelta", "adamax", "nadam", "radam"]


def _torch_pair(rule, hp, init):
    torch = pytest.importorskip("torch")
    hp = {k: v for k, v in hp.items() if k != "bias_correction"}
    tparams = [torch.tensor(a, requires_grad=True) for a in init]
    topt = getattr(torch.optim, type(fastopt.OPTIMIZERS[rule]([np.zeros(1)], **hp)).__name__)(
        tparams, foreach=False, **hp)
    fparams = [a.copy() for a in init]
    return torch, tparams, topt, fparams, fastopt.OPTIMIZERS[rule](fparams, **hp)


def _torch_step(torch, tparams, topt, grads):
    for p, g in zip(tparams, grads):
        p.grad = torch.tensor(g)
    topt.step()


@pytest.mark.parametrize("direction", ["torch_to_fastopt", "fastopt_to_torch"])
@pytest.mark.parametrize("rule", TORCH_RULES)
def test_torch_state_dict_crosses_over(rule, direction):
    hp = hparams(rule, 2)
    grads = _grads(5, 6, np.float64)
    init = [np.random.default_rng(6).standard_normal(s) for s in SHAPES]
    torch, tparams, topt, fparams, fopt = _torch_pair(rule, hp, init)
    if direction == "torch_to_fastopt":
        for g in grads[:3]:
            _torch_step(torch, tparams, topt, g)
        for a, p in zip(fparams, tparams):
            a[...] = p.detach().numpy()
        fopt.load_state_dict(topt.state_dict())
    else:
        for g in grads[:3]:
            fopt.step(g)
        with torch.no_grad():
            for a, p in zip(fparams, tparams):
                p.copy_(torch.from_numpy(a))
        topt.load_state_dict(fopt.state_dict(torch=True))
    for g in grads[3:]:
        _torch_step(torch, tparams, topt, g)
        fopt.step(g)
    for a, p in zip(fparams, tparams):
        np.testing.assert_allclose(a, p.detach().numpy(), rtol=1e-9, atol=1e-12)
    # torch's SGD keeps no step count: fastopt can only tell "stepped" (1) from "fresh" (0)
    assert fopt.steps == (1 + 3 if (rule, direction) == ("sgd", "torch_to_fastopt") else 6)


def _tampered(tmp_path, edit):
    """A valid checkpoint whose meta or arrays ``edit`` changes; the loader must refuse it."""
    import json
    opt, buf = _model("adam", {}, np.float32)
    _step(opt, buf, _grads(7, 1, np.float32)[0])
    path = tmp_path / "ckpt.npz"
    fastopt.save(path, opt, buf)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays["meta"]))
    edit(meta, arrays)
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("edit, match", [
    (lambda m, a: m["groups"][0].__setitem__("lr", -1.0), "learning rate"),
    (lambda m, a: a.__setitem__("state.exp_avg", a["state.exp_avg"][:10]), "state.exp_avg"),
    (lambda m, a: m.__setitem__("steps", [1]), "step counts"),
    (lambda m, a: a.pop("params.arena"), "params.arena is missing"),
], ids=["hyper", "short-arena", "steps", "no-params"])
def test_load_refuses_a_tampered_checkpoint_before_writing(tmp_path, edit, match):
    path = _tampered(tmp_path, edit)
    opt, buf = _model("adam", {}, np.float32)
    before = buf.arena.copy()
    with pytest.raises(ValueError, match=match):
        fastopt.load(path, opt, buf)
    np.testing.assert_array_equal(buf.arena, before)
    assert opt.steps == 0 and opt.param_groups[0]["lr"] == 1e-3
