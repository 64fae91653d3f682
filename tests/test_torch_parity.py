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
    hp = dict(hp)
    if hp.pop("bias_correction", True) is False:
        pytest.skip("torch has no Adam without bias correction")
    if hp.pop("l1", 0.0):
        pytest.skip("torch has no L1 option")
    hp.pop("l1_mode", None)
    return hp


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
    for name, a in zip(module.STATES, state):
        if names[name] in tstate:
            np.testing.assert_allclose(a, tstate[names[name]].numpy(), rtol=1e-7, atol=1e-10, err_msg=name)
        else:
            assert not a.any(), f"{name} was written though torch keeps no such state here"
    assert not np.allclose(param, p0)
