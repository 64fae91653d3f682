"""Every rule PyTorch has, against torch.optim on the same gradient sequence (float64)."""
import numpy as np
import pytest

from cases import N_DRAWS, gradients, hparams, states
from fastopt.kernels import RULES

torch = pytest.importorskip("torch", reason="torch is not installed (pip install -e .[torch]); CI installs it")

STEPS = 200
TORCH = {  # fastopt rule -> (torch class, fastopt state name -> torch state key)
    "sgd": (torch.optim.SGD, {"momentum_buffer": "momentum_buffer"}),
    "adagrad": (torch.optim.Adagrad, {"state_sum": "sum"}),
    "rmsprop": (torch.optim.RMSprop, {"square_avg": "square_avg", "momentum_buffer": "momentum_buffer",
                                      "grad_avg": "grad_avg"}),
    "adam": (torch.optim.Adam, {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq",
                                "max_exp_avg_sq": "max_exp_avg_sq"}),
    "adamw": (torch.optim.AdamW, {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq",
                                  "max_exp_avg_sq": "max_exp_avg_sq"}),
    "adadelta": (torch.optim.Adadelta, {"square_avg": "square_avg", "acc_delta": "acc_delta"}),
    "adamax": (torch.optim.Adamax, {"exp_avg": "exp_avg", "exp_inf": "exp_inf"}),
    "nadam": (torch.optim.NAdam, {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}),
    "radam": (torch.optim.RAdam, {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}),
}


def _torch_kwargs(rule, hp):
    """``hp`` without the options the rule declares torch lacks; a draw that moves one of
    them off its default has no torch counterpart and is skipped."""
    declared = RULES[rule][0].hyper
    fastopt_only = {k: v for k, v in hp.items() if not declared[k].torch}
    moved = sorted(k for k, v in fastopt_only.items() if v != declared[k].default)
    if moved:
        pytest.skip(f"torch.optim has no {', '.join(moved)}")
    return {k: v for k, v in hp.items() if k not in fastopt_only}


@pytest.mark.parametrize("draw", range(N_DRAWS))
@pytest.mark.parametrize("rule", sorted(TORCH))
def test_matches_torch(rule, draw):
    _, fn, _ = RULES[rule]
    cls, names = TORCH[rule]
    hp = hparams(rule, draw)
    n = 1031
    p0 = np.random.default_rng(draw).standard_normal(n)
    param, state = p0.copy(), states(rule, n)
    tparam = torch.tensor(p0, requires_grad=False)
    opt = cls([tparam], foreach=False, **_torch_kwargs(rule, hp))
    for step, g in enumerate(gradients(STEPS, n, seed=draw), start=1):
        fn(param, g, *state, step=step, **hp)
        tparam.grad = torch.tensor(g)
        opt.step()
    # float64 both sides; the forms differ by a few ulps a step (torch's lerp, addcdiv, and
    # its float32 mu_product in NAdam), so 1e-7 relative after 200 steps.
    np.testing.assert_allclose(param, tparam.numpy(), rtol=1e-7, atol=1e-10)
    tstate = opt.state[tparam]
    module = RULES[rule][0]
    for name, a in zip(module.states, state):
        if names[name] in tstate:
            np.testing.assert_allclose(a, tstate[names[name]].numpy(), rtol=1e-7, atol=1e-10, err_msg=name)
        else:
            assert not a.any(), f"{name} was written though torch keeps no such state here"
    assert not np.allclose(param, p0)


# -- torch's semantics at the edges ------------------------------------------------------

# (rule, hyper-parameters): decays torch skips (`if weight_decay != 0`), coupled and decoupled
SKIPPED_DECAY = [
    ("sgd", dict(lr=0.05)), ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.3)),
    ("adagrad", {}), ("rmsprop", {}), ("rmsprop", dict(momentum=0.9, centered=True)),
    ("adam", {}), ("adam", dict(amsgrad=True)), ("adam", dict(eps=0.0)),
    ("adamw", {}), ("adamw", dict(weight_decay=0.0, amsgrad=True)),
    ("adadelta", {}), ("adamax", {}),
    ("nadam", {}), ("nadam", dict(weight_decay=0.1, decoupled_weight_decay=True)),
    ("radam", {}), ("radam", dict(weight_decay=0.1, decoupled_weight_decay=True)),
]


def _run_both(rule, hp, p0, grads):
    """fastopt's functional rule and torch.optim (foreach=False, float64) on the same
    steps; returns (fastopt's param and states by torch name, torch's param and state)."""
    _, fn, _ = RULES[rule]
    cls, names = TORCH[rule]
    param, state = p0.copy(), states(rule, p0.size)
    tparam = torch.tensor(p0)
    opt = cls([tparam], foreach=False, **hp)
    for step, g in enumerate(grads, start=1):
        fn(param, g, *state, step=step, **hp)
        tparam.grad = torch.tensor(g)
        opt.step()
    ours = {names[n]: a for n, a in zip(RULES[rule][0].states, state)}
    theirs = {k: v.numpy() for k, v in opt.state[tparam].items() if k in ours}
    return param, ours, tparam.numpy(), theirs


@pytest.mark.parametrize("rule,hp", SKIPPED_DECAY, ids=[f"{r}-{'-'.join(map(str, h.values())) or 'defaults'}"
                                                         for r, h in SKIPPED_DECAY])
def test_nonfinite_params_keep_finite_states_as_in_torch(rule, hp):
    """0 * inf is NaN: a kernel that computes the decay term when the decay is 0 (or
    decoupled) turns the moments of an inf or NaN parameter into NaN where torch's stay
    finite. Parameters start inf, -inf and NaN (as an inf gradient under
    nonfinite="propagate" leaves them); one coordinate always gets a zero gradient, which
    with eps=0 makes its parameter NaN at the first step."""
    p0 = np.array([np.inf, -np.inf, np.nan, 1.5, -0.5, 0.25, 2.0])
    grads = gradients(5, p0.size, seed=3)
    for g in grads:
        g[5] = 0.0
    param, ours, tparam, theirs = _run_both(rule, hp, p0, grads)
    # 1e-9: torch's NAdam keeps mu_product in float32 (the default dtype) over 5 steps
    np.testing.assert_allclose(param, tparam, rtol=1e-9, atol=0, equal_nan=True)
    assert set(theirs) <= set(ours)
    for name, value in theirs.items():
        np.testing.assert_allclose(ours[name], value, rtol=1e-9, atol=0, equal_nan=True, err_msg=name)
        assert np.array_equal(np.isnan(ours[name]), np.isnan(value)), name


@pytest.mark.parametrize("rule,hp,name", [
    ("adam", dict(amsgrad=True), "max_exp_avg_sq"),
    ("adamw", dict(amsgrad=True), "max_exp_avg_sq"),
    ("adamax", {}, "exp_inf"),
])
def test_a_nan_gradient_reaches_the_running_maximum_as_in_torch(rule, hp, name):
    """torch.maximum propagates NaN; Python's max(a, nan) returns a and would hide it."""
    p0 = np.random.default_rng(1).standard_normal(6)
    grads = gradients(4, p0.size, seed=4)
    grads[1][2] = np.nan
    param, ours, tparam, theirs = _run_both(rule, hp, p0, grads)
    assert np.isnan(theirs[name][2]) and np.isnan(ours[name][2])
    np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-12, atol=0, equal_nan=True)
    np.testing.assert_allclose(param, tparam, rtol=1e-12, atol=0, equal_nan=True)


@pytest.mark.parametrize("default", [torch.float32, torch.float64], ids=["default-f32", "default-f64"])
def test_nadam_exports_mu_product_in_the_dtype_torch_keeps(default):
    """torch keeps NAdam's mu_product in its scalar dtype (float64 when that is the default
    dtype, else float32); exported in another dtype, a run continued in torch drifts."""
    import fastopt
    saved = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        p0 = np.random.default_rng(5).standard_normal(64)
        grads = gradients(6, p0.size, seed=5)
        param = p0.copy()
        ours = fastopt.NAdam([param], lr=0.01, nonfinite="propagate")
        uninterrupted = torch.tensor(p0)
        topt = torch.optim.NAdam([uninterrupted], lr=0.01, foreach=False)
        for g in grads[:3]:
            ours.step([g])
            uninterrupted.grad = torch.tensor(g)
            topt.step()
        exported = ours.state_dict(torch=True)["state"][0]["mu_product"]
        kept = topt.state[uninterrupted]["mu_product"]
        assert exported.dtype == kept.dtype == default
        assert float(exported) == pytest.approx(float(kept), rel=1e-15 if default == torch.float64 else 1e-7)
        if default == torch.float64:  # continue in torch from fastopt's export
            resumed = torch.tensor(param)
            other = torch.optim.NAdam([resumed], lr=0.01, foreach=False)
            other.load_state_dict(ours.state_dict(torch=True))
            for g in grads[3:]:
                for p, o in ((uninterrupted, topt), (resumed, other)):
                    p.grad = torch.tensor(g)
                    o.step()
            np.testing.assert_allclose(resumed.numpy(), uninterrupted.numpy(), rtol=1e-13, atol=0)
    finally:
        torch.set_default_dtype(saved)


def test_sgd_state_dict_keeps_a_step_count_that_torch_carries_along():
    """fastopt's SGD state keeps ``step`` (torch's keeps none): a schedule's lr and the
    first step's buffer depend on it. The decision is documented, and the key is needed:
    a state dict without it resumes at the wrong lr. torch.optim.SGD loads it and keeps
    it, so a round trip through torch still carries the count."""
    import fastopt
    from fastopt import schedules
    assert "``step``" in fastopt.SGD.__doc__
    grads = gradients(6, 16, seed=7)
    p0 = np.random.default_rng(7).standard_normal(16)

    def make(param):
        return fastopt.SGD([param], lr=schedules.step_decay(0.1, 0.5, 2), momentum=0.9, nonfinite="propagate")

    straight = p0.copy()
    opt = make(straight)
    for g in grads:
        opt.step([g])
    resumed = p0.copy()
    first = make(resumed)
    for g in grads[:3]:
        first.step([g])
    saved = first.state_dict()
    assert saved["state"][0]["step"] == 3
    for entry, expected in ((saved, straight), ({**saved, "state": {0: {"momentum_buffer":
                             saved["state"][0]["momentum_buffer"]}}}, None)):
        param = resumed.copy()
        second = make(param)
        second.load_state_dict(entry)
        for g in grads[3:]:
            second.step([g])
        if expected is not None:
            np.testing.assert_array_equal(param, expected)
        else:  # without the count, "stepped" is all that is known: the schedule restarts
            assert second.steps != opt.steps and not np.allclose(param, straight, rtol=1e-6)
    tparam = torch.tensor(resumed)
    topt = torch.optim.SGD([tparam], lr=0.1, momentum=0.9, foreach=False)
    topt.load_state_dict(first.state_dict(torch=True))
    tparam.grad = torch.tensor(grads[3])
    topt.step()
    assert float(topt.state_dict()["state"][0]["step"]) == 3
