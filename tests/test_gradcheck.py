"""fastopt.gradcheck: passes correct analytic gradients, fails wrong ones and names the worst
element, rejects inputs it cannot check, and leaves the inputs as it found them."""
import numpy as np
import pytest

from fastopt.gradcheck import GradcheckReport, check_layer, gradcheck
from fastopt.nn import BatchNorm1d, Linear, ReLU, Sequential, Tanh

RNG = np.random.default_rng(7)
A = RNG.standard_normal((5, 5))

# (name, f(*inputs), analytic gradient(*inputs) -> list, input shapes)
CORRECT = [
    ("sum sin", lambda x: np.sin(x).sum(), lambda x: [np.cos(x)], [(3, 4)]),
    ("quadratic form", lambda x: x @ A @ x, lambda x: [(A + A.T) @ x], [(5,)]),
    ("log-sum-exp", lambda x: np.log(np.exp(x).sum()), lambda x: [np.exp(x) / np.exp(x).sum()], [(6,)]),
    ("two inputs", lambda x, w: np.tanh(x @ w).sum(),
     lambda x, w: [(1 - np.tanh(x @ w) ** 2) @ w.T, x.T @ (1 - np.tanh(x @ w) ** 2)], [(2, 3), (3, 4)]),
]


def _inputs(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s in shapes]


@pytest.mark.parametrize("name, f, grad, shapes", CORRECT, ids=[c[0] for c in CORRECT])
def test_correct_gradient_passes(name, f, grad, shapes):
    inputs = _inputs(shapes)
    report = gradcheck(f, inputs, grad(*inputs))
    assert report.passed and report.n_failed == 0
    assert report.n_checked == sum(x.size for x in inputs)
    assert report.max_rel_error < 1e-6


def _corrupt_one(g, index, factor):
    g = g.copy()
    g[index] *= factor
    return g


# (name, f, WRONG gradient, shapes, where the check must point: (input position, index) or None)
WRONG = [
    ("sign flipped", lambda x: np.sin(x).sum(), lambda x: [-np.cos(x)], [(3, 4)], None),
    ("factor 2 missing", lambda x: (x ** 2).sum(), lambda x: [x], [(4,)], None),
    ("derivative of another function", lambda x: np.sin(x).sum(), lambda x: [np.sin(x)], [(3,)], None),
    ("transposed", lambda x: (x * A).sum(), lambda x: [A.T], [(5, 5)], None),
    ("one element 1% off", lambda x: np.sin(x).sum(), lambda x: [_corrupt_one(np.cos(x), (1, 2), 1.01)],
     [(3, 4)], (0, (1, 2))),
    ("second input wrong", lambda x, w: (x @ w).sum(),
     lambda x, w: [np.ones((2, 2)) @ w.T, _corrupt_one(np.outer(x.sum(0), np.ones(2)), (2, 0), 0.5)],
     [(2, 3), (3, 2)], (1, (2, 0))),
]


@pytest.mark.parametrize("name, f, grad, shapes, where", WRONG, ids=[c[0] for c in WRONG])
def test_wrong_gradient_fails_and_names_the_element(name, f, grad, shapes, where):
    inputs = _inputs(shapes, seed=1)
    with pytest.raises(AssertionError, match="gradcheck FAILED") as info:
        gradcheck(f, inputs, grad(*inputs))
    report = gradcheck(f, inputs, grad(*inputs), raise_on_fail=False)
    assert not report.passed and report.n_failed >= 1
    assert str(report) == str(info.value)
    if where is not None:
        position, index = where
        assert report.n_failed == 1
        assert report.worst_input == f"inputs[{position}]" and report.worst_index == index
        assert report.analytic == pytest.approx(grad(*inputs)[position][index])
        assert f"inputs[{position}]{list(index)}" in str(report)


def test_report_values_are_the_worst_element():
    x = _inputs([(4,)])[0]
    wrong = np.cos(x)
    wrong[3] += 0.5
    report = gradcheck(lambda v: np.sin(v).sum(), x, wrong, raise_on_fail=False, names=["theta"])
    assert isinstance(report, GradcheckReport)
    assert report.worst_input == "theta" and report.worst_index == (3,)
    assert report.numeric == pytest.approx(np.cos(x[3]), rel=1e-8)
    assert report.abs_error == pytest.approx(0.5, rel=1e-6)
    assert report.max_rel_error == pytest.approx(0.5 / max(abs(wrong[3]), abs(np.cos(x[3]))), rel=1e-6)


def test_inputs_restored_bit_for_bit_and_grads_callable():
    inputs = _inputs([(3, 3), (3,)])
    before = [x.copy() for x in inputs]
    gradcheck(lambda m, v: (m @ v).sum(), inputs, lambda m, v: [np.outer(np.ones(3), v), m.sum(0)])
    for x, b in zip(inputs, before):
        assert np.array_equal(x, b)


def test_absolute_floor_ignores_rounding_noise_at_zero_gradient():
    # d/dx of sum(x^3) at x = 0 is 0: the numeric value is rounding noise, relative error ~1
    x = np.zeros(3)
    assert gradcheck(lambda v: (v ** 3).sum(), x, np.zeros(3)).passed
    with pytest.raises(AssertionError):
        gradcheck(lambda v: (v ** 3).sum(), x, np.zeros(3), atol=0.0, rtol=1e-12)


BAD_ARGS = [
    ("float32 input", dict(inputs=np.ones(3, np.float32), grads=np.ones(3, np.float32)), TypeError, "float64"),
    ("shape mismatch", dict(inputs=np.ones(3), grads=np.ones(4)), ValueError, "shape"),
    ("count mismatch", dict(inputs=[np.ones(3)], grads=[np.ones(3), np.ones(3)]), ValueError, "grads has 2"),
    ("non-contiguous", dict(inputs=np.ones((4, 4))[:, ::2], grads=np.ones((4, 2))), ValueError, "C-contiguous"),
    ("empty", dict(inputs=[], grads=[]), ValueError, "inputs is empty"),
    ("eps", dict(inputs=np.ones(3), grads=np.ones(3), eps=0), ValueError, "eps must be > 0"),
    ("not an array", dict(inputs="x", grads=np.ones(3)), TypeError, "inputs must be"),
]


@pytest.mark.parametrize("name, kwargs, error, message", BAD_ARGS, ids=[c[0] for c in BAD_ARGS])
def test_bad_arguments(name, kwargs, error, message):
    with pytest.raises(error, match=message):
        gradcheck(lambda *a: 0.0, **kwargs)


class _NoBiasGrad(Linear):
    def backward(self, dout, need_dx=True):
        dx = super().backward(dout, need_dx)
        self.grads["bias"][...] = 0  # forgets db
        return dx


class _ScaledDx(Linear):
    def backward(self, dout, need_dx=True):
        return super().backward(dout, need_dx) * 1.01  # dx 1% too large


class _ReluWrongMask(ReLU):
    def backward(self, dout, need_dx=True):
        return dout * (self.out >= 0)  # passes gradient where x < 0 too (out == 0 there)


class _TanhMissingSquare(Tanh):
    def backward(self, dout, need_dx=True):
        return dout * (1 - self.out)


BROKEN_LAYERS = [
    ("linear forgets db", lambda: _NoBiasGrad(3, 4), (2, 3), "0.bias"),
    ("linear dx 1% off", lambda: _ScaledDx(3, 4), (2, 3), "x"),
    ("relu mask >= 0", lambda: _ReluWrongMask(), (3, 4), "x"),
    ("tanh 1 - y", lambda: _TanhMissingSquare(), (3, 4), "x"),
]


@pytest.mark.parametrize("name, make, shape, culprit", BROKEN_LAYERS, ids=[c[0] for c in BROKEN_LAYERS])
def test_check_layer_catches_a_broken_backward(name, make, shape, culprit):
    model = Sequential(make(), dtype=np.float64, seed=0)
    x = np.random.default_rng(3).standard_normal(shape)
    report = check_layer(model, x, raise_on_fail=False)
    assert not report.passed and report.worst_input == culprit
    assert report.per_input[culprit] > 1e-3


@pytest.mark.parametrize("layers", [(Linear(3, 4), Tanh()), (Linear(3, 4), BatchNorm1d(4), Tanh())],
                         ids=["linear-tanh", "linear-batchnorm-tanh"])
def test_check_layer_leaves_input_params_and_running_statistics_unchanged(layers):
    model = Sequential(*layers, dtype=np.float64, seed=0)
    x = np.random.default_rng(0).standard_normal((5, 3))
    x0, arena0 = x.copy(), model.buffer.arena.copy()
    buffers0 = {name: b.copy() for name, b in model.buffers().items()}
    assert check_layer(model, x).passed
    assert np.array_equal(x, x0) and np.array_equal(model.buffer.arena, arena0)
    assert model.buffers().keys() == buffers0.keys()
    for name, b in model.buffers().items():
        assert np.array_equal(b, buffers0[name]), name


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("side", ["analytic", "function"])
def test_a_nonfinite_gradient_or_function_fails(bad, side):
    """NaN > rtol is False: a NaN or inf on either side must fail on its own."""
    x = np.array([1.0, 2.0, 3.0])
    grad = 2 * x
    if side == "analytic":
        grad[1] = bad
        f = lambda v: float((v ** 2).sum())  # noqa: E731
    else:
        f = lambda v: float((v ** 2).sum()) * (bad if v[1] > 2.0 else 1.0)  # noqa: E731
    report = gradcheck(f, [x], [grad], raise_on_fail=False)
    assert not report.passed and report.n_failed >= 1
    assert report.worst_index == (1,) and report.max_rel_error == np.inf
