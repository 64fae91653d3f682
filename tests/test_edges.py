"""Edge semantics that the seeded tables do not reach: a zero decay next to an inf
parameter in the layer-wise rules, and hyper-parameters of the wrong shape."""
import itertools

import numpy as np
import pytest

from fastopt import layerwise
from fastopt.kernels import lamb, lars


def _layers():
    """Two tensors, one holding an inf (what an inf gradient under nonfinite="propagate" leaves)."""
    params = [np.array([np.inf, 1.0, -2.0, 0.5]), np.array([0.5, -0.25, 3.0])]
    grads = [np.array([0.3, -1.0, 0.2, 0.1]), np.array([-0.4, 0.7, 0.05])]
    return params, grads


@pytest.mark.parametrize("rule,kwargs,states", [
    # torch_optimizer.Lamb's form: `if weight_decay != 0: adam_step.add_(p, alpha=weight_decay)`
    ("lamb", dict(weight_decay=0.0, bias_correction=False, clamp_value=10.0), 2),
    # timm's Lars: no decay term, no trust ratio at weight_decay == 0
    ("lars", dict(weight_decay=0.0, momentum=0.9, lr=0.1), 1),
], ids=["lamb", "lars"])
def test_zero_decay_leaves_an_inf_param_inf_and_its_tensor_finite(rule, kwargs, states):
    """A zero decay adds no ``0 * p`` term: the inf stays inf (not NaN), and the update and
    state of every other element are those of the reference (which skips the term too)."""
    module = {"lamb": lamb, "lars": lars}[rule]
    fn, reference = getattr(layerwise, f"{rule}_"), getattr(module, f"{rule}_reference")
    params, grads = _layers()
    ref_params, _ = _layers()
    state = [[np.zeros_like(p) for p in params] for _ in range(states)]
    ref_state = [[np.zeros_like(p) for p in params] for _ in range(states)]
    for step in (1, 2, 3):
        fn(params, grads, *state, step=step, **kwargs)
        reference(ref_params, grads, *ref_state, step=step, **kwargs)
    assert params[0][0] == np.inf
    for got, want in zip([*params, *itertools.chain(*state)], [*ref_params, *itertools.chain(*ref_state)]):
        assert np.isfinite(got[1:]).all()
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    if rule == "lars":  # the buffer is pure gradient at a zero decay
        np.testing.assert_allclose(state[0][0], grads[0] * (1 + 0.9 + 0.81), rtol=1e-15)


def _betas_cases():
    import fastopt
    import fastopt.functional as F
    p, g = np.zeros(3), np.ones(3)
    cases = []
    for name in ("adam", "adamw", "adamax", "nadam", "radam", "lion"):
        fn = getattr(F, f"{name}_")
        states = [np.zeros(3) for _ in fastopt.kernels.RULES[name][0].states]
        cases.append(pytest.param(lambda fn=fn, states=states, b=None: fn(p, g, *states, step=1, betas=b),
                                  id=f"{name}_"))
        cls = fastopt.OPTIMIZERS[name]
        cases.append(pytest.param(lambda cls=cls, b=None: cls([np.zeros(3)], betas=b), id=cls.__name__))
    return cases


@pytest.mark.parametrize("betas", [0.9, None, (0.9,), (0.9, 0.99, 0.5)], ids=["scalar", "None", "one", "three"])
@pytest.mark.parametrize("make", _betas_cases())
def test_betas_that_are_no_pair_raise_an_error_naming_betas(make, betas):
    """torch answers ``betas=0.9`` with "'float' object is not subscriptable"; fastopt names the argument."""
    with pytest.raises((TypeError, ValueError), match=r"^(param group 0: )?betas must be a pair"):
        make(b=betas)
