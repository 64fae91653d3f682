"""fastopt.nn: gradients of every layer and loss (gradcheck, float64, CPU and CuPy when present),
forward shapes, the one-ParamBuffer model, BatchNorm and Dropout modes, initialization, and
that small nets learn (XOR; a conv net overfits a small batch)."""
import math

import numpy as np
import pytest

import fastopt.functional as F
from fastopt.gradcheck import check_layer, gradcheck
from fastopt.nn import (
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    Dropout,
    Flatten,
    Linear,
    MaxPool2d,
    ReLU,
    Sequential,
    Sigmoid,
    Tanh,
    init,
    l2_penalty,
    mae_loss,
    mse_loss,
    softmax_cross_entropy,
)

try:
    import cupy
except ImportError:
    cupy = None

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(cupy is None, reason="CuPy is not installed"))]


def _on(device, x):
    return cupy.asarray(x) if device == "cuda" else x


def _host(x):
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else np.asarray(x)


def _randn(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


# (id, layer factory, input shape): every layer, its options, and odd sizes (floor division, tails)
LAYERS = [
    ("linear", lambda: Linear(3, 4), (2, 3)),
    ("linear-nobias", lambda: Linear(4, 2, bias=False), (3, 4)),
    ("conv", lambda: Conv2d(2, 3, 3), (2, 2, 5, 5)),
    ("conv-s2-p1", lambda: Conv2d(2, 3, 3, stride=2, padding=1), (2, 2, 5, 5)),
    ("conv-rect-nobias", lambda: Conv2d(1, 2, (2, 3), stride=(1, 2), bias=False), (2, 1, 4, 6)),
    ("conv-s2-tail", lambda: Conv2d(2, 2, 3, stride=2), (2, 2, 6, 6)),
    ("maxpool", lambda: MaxPool2d(2), (2, 2, 4, 4)),
    ("maxpool-floor", lambda: MaxPool2d(2), (2, 2, 5, 5)),
    ("maxpool-overlap-pad", lambda: MaxPool2d(3, stride=2, padding=1), (2, 2, 5, 5)),
    ("avgpool", lambda: AvgPool2d(2), (2, 2, 4, 4)),
    ("avgpool-overlap-pad", lambda: AvgPool2d(3, stride=2, padding=1), (2, 2, 5, 5)),
    ("flatten", lambda: Flatten(), (2, 2, 3, 3)),
    ("relu", lambda: ReLU(), (3, 4)),
    ("tanh", lambda: Tanh(), (3, 4)),
    ("sigmoid", lambda: Sigmoid(), (3, 4)),
    ("batchnorm1d", lambda: BatchNorm1d(3), (4, 3)),
    ("batchnorm2d", lambda: BatchNorm2d(2), (3, 2, 3, 3)),
    ("dropout", lambda: Dropout(0.5), (4, 5)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name, make, shape", LAYERS, ids=[c[0] for c in LAYERS])
def test_layer_gradients(name, make, shape, mode, device):
    model = Sequential(make(), dtype=np.float64, device=device, seed=1)
    x = _on(device, _randn(shape, seed=2))
    if mode == "eval":
        model(x * 2 + 1)  # moves BatchNorm's running statistics away from (0, 1)
        model.eval()
    report = check_layer(model, x)
    assert report.n_checked == x.size + model.buffer.numel


@pytest.mark.parametrize("device", DEVICES)
def test_whole_net_gradients(device):
    model = Sequential(Conv2d(2, 3, 3, padding=1), BatchNorm2d(3), ReLU(), MaxPool2d(2), Conv2d(3, 2, 2),
                       Tanh(), Flatten(), Linear(2 * 2 * 2, 3), Sigmoid(), dtype=np.float64, device=device, seed=3)
    check_layer(model, _on(device, _randn((2, 2, 6, 6), seed=4)))


# (id, loss, pred shape, pred scale, target maker)
LOSSES = [
    ("cross-entropy", softmax_cross_entropy, (4, 5), 1.0, lambda rng: rng.integers(0, 5, 4)),
    ("cross-entropy-large-logits", softmax_cross_entropy, (3, 4), 30.0, lambda rng: rng.integers(0, 4, 3)),
    ("mse", mse_loss, (3, 4), 1.0, lambda rng: rng.standard_normal((3, 4))),
    ("mae", mae_loss, (3, 4), 1.0, lambda rng: rng.standard_normal((3, 4))),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, loss_fn, shape, scale, target", LOSSES, ids=[c[0] for c in LOSSES])
def test_loss_gradients(name, loss_fn, shape, scale, target, device):
    rng = np.random.default_rng(5)
    pred, t = _on(device, rng.standard_normal(shape) * scale), _on(device, target(rng))
    loss, grad = loss_fn(pred, t)
    assert loss.shape == () and grad.shape == pred.shape
    gradcheck(lambda p: loss_fn(p, t)[0], pred, grad)


def test_cross_entropy_is_stable_and_matches_log_softmax():
    z, y = _randn((6, 4), seed=6) * 1e4, np.arange(6) % 4  # exp(1e4) overflows a naive softmax
    loss, grad = softmax_cross_entropy(z, y)
    log_softmax = z - np.logaddexp.reduce(z, axis=1, keepdims=True)  # pairwise log-add: never overflows
    expected = -log_softmax[np.arange(6), y].mean()
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(loss, expected, rtol=1e-12)
    np.testing.assert_allclose(grad.sum(axis=1), 0, atol=1e-15)  # softmax rows sum to 1, minus the one-hot
    shifted_loss, shifted_grad = softmax_cross_entropy(z + 123.0, y)
    np.testing.assert_allclose(shifted_loss, loss, rtol=1e-12)
    np.testing.assert_allclose(shifted_grad, grad, atol=1e-15)


@pytest.mark.parametrize("weights_only", [True, False])
def test_l2_penalty_value_and_gradient(weights_only):
    model = Sequential(Linear(3, 4), BatchNorm1d(4), ReLU(), Linear(4, 2), dtype=np.float64, seed=0)
    buf, strength = model.buffer, 0.3
    for p in buf.params:
        p[...] = _randn(p.shape, seed=p.size)
    penalized = [p.ndim >= 2 or not weights_only for p in buf.params]
    buf.grad_arena[:] = 1.0  # the penalty adds to what backward left there

    def value(*params):
        return strength * sum((p ** 2).sum() for p, on in zip(params, penalized) if on)

    r = l2_penalty(buf, strength, weights_only=weights_only)
    assert float(r) == pytest.approx(value(*buf.params), rel=1e-12)
    analytic = [g - 1.0 for g in buf.grads]
    gradcheck(value, buf.params, analytic)
    for g, on in zip(analytic, penalized):
        assert bool(np.any(g != 0)) == on


# (layer, input shape, expected output shape): the output-size formula floor((H + 2p - k) / s) + 1
SHAPES = [
    (Linear(7, 3), (5, 7), (5, 3)),
    (Conv2d(3, 8, 3, padding=1), (2, 3, 28, 28), (2, 8, 28, 28)),
    (Conv2d(3, 8, 5, stride=2), (2, 3, 28, 28), (2, 8, 12, 12)),
    (Conv2d(1, 4, (3, 1), stride=(2, 1), padding=(1, 0)), (1, 1, 7, 5), (1, 4, 4, 5)),
    (Conv2d(3, 8, 3, padding=1.0), (2, 3, 8, 8), (2, 8, 8, 8)),  # an integral float is an int
    (MaxPool2d(2), (2, 8, 28, 28), (2, 8, 14, 14)),
    (MaxPool2d(3, stride=2, padding=1), (2, 4, 7, 7), (2, 4, 4, 4)),
    (AvgPool2d(3, stride=2, padding=(1.0, 1)), (2, 4, 7, 7), (2, 4, 4, 4)),
    (AvgPool2d(2), (2, 8, 7, 7), (2, 8, 3, 3)),
    (Flatten(), (2, 8, 7, 7), (2, 392)),
    (BatchNorm2d(8), (2, 8, 7, 7), (2, 8, 7, 7)),
    (BatchNorm1d(5), (3, 5), (3, 5)),
]


@pytest.mark.parametrize("layer, shape, expected", SHAPES, ids=[repr(c[0]) for c in SHAPES])
def test_forward_shapes(layer, shape, expected):
    model = Sequential(layer, dtype=np.float32, seed=0)
    x = _randn(shape).astype(np.float32)
    out = model(x)
    assert out.shape == expected and out.dtype == np.float32
    assert model.backward(np.ones(expected, np.float32)).shape == shape


def _mnist_like():
    return Sequential(Conv2d(1, 8, 3, padding=1), ReLU(), MaxPool2d(2), Flatten(), Linear(8 * 14 * 14, 10),
                      dtype=np.float32, device="cpu", seed=0)


def test_one_buffer_holds_every_parameter_and_gradient():
    model = _mnist_like()
    buf = model.buffer
    assert buf.names == ["0.weight", "0.bias", "4.weight", "4.bias"]
    assert buf.shapes == [(8, 1, 3, 3), (8,), (10, 1568), (10,)]
    assert buf.dtype == np.float32 and buf.numel == 8 * 9 + 8 + 1568 * 10 + 10
    for layer_index, name in [(0, "weight"), (0, "bias"), (4, "weight"), (4, "bias")]:
        layer = model[layer_index]
        assert np.shares_memory(layer.params[name], buf.arena)
        assert np.shares_memory(layer.grads[name], buf.grad_arena)
        assert layer.params[name] is model.params[f"{layer_index}.{name}"]


def test_backward_overwrites_gradients_in_place():
    model = _mnist_like()
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 1, 28, 28)), rng.integers(0, 10, 4)
    grad_arena, grad_views = model.buffer.grad_arena, list(model.buffer.grads)
    _, dlogits = softmax_cross_entropy(model(x), y)
    dx = model.backward(dlogits)
    first = grad_arena.copy()
    assert dx.shape == x.shape and np.abs(first).sum() > 0
    model(x)
    assert model.backward(dlogits, need_dx=False) is None
    np.testing.assert_array_equal(grad_arena, first)  # overwritten, not accumulated (not 2x)
    assert model.buffer.grad_arena is grad_arena
    assert all(a is b for a, b in zip(model.buffer.grads, grad_views))


def test_one_update_moves_the_whole_model():
    model = _mnist_like()
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((8, 1, 28, 28)), rng.integers(0, 10, 8)
    before = model.buffer.arena.copy()
    loss0, d = softmax_cross_entropy(model(x), y)
    model.backward(d, need_dx=False)
    F.sgd_(model.buffer.arena, model.buffer.grad_arena, step=1, lr=1e-3)
    np.testing.assert_allclose(model.buffer.arena, before - 1e-3 * model.buffer.grad_arena, rtol=1e-6)
    assert float(softmax_cross_entropy(model(x), y)[0]) < float(loss0)


def test_float32_and_float64_models_agree():
    def layers():
        return [Conv2d(2, 4, 3, padding=1), BatchNorm2d(4), ReLU(), AvgPool2d(2), Flatten(), Linear(16, 3)]
    m32, m64 = Sequential(*layers(), dtype=np.float32, seed=9), Sequential(*layers(), dtype=np.float64, seed=9)
    x = _randn((3, 2, 4, 4), seed=1)
    for p32, p64 in zip(m32.buffer.params, m64.buffer.params):
        np.testing.assert_allclose(p32, p64, rtol=1e-6)  # the same draws, rounded
    out32, out64 = m32(x), m64(x)
    assert out32.dtype == np.float32 and out64.dtype == np.float64
    np.testing.assert_allclose(out32, out64, rtol=1e-4, atol=1e-5)
    m32.backward(np.ones_like(out32))
    m64.backward(np.ones_like(out64))
    for g32, g64 in zip(m32.buffer.grads, m64.buffer.grads):
        np.testing.assert_allclose(g32, g64, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("bn, shape, axes", [(BatchNorm1d(3), (16, 3), (0,)),
                                             (BatchNorm2d(3), (8, 3, 4, 4), (0, 2, 3))])
def test_batchnorm_train_uses_batch_statistics_and_tracks_running_averages(bn, shape, axes):
    model = Sequential(bn, dtype=np.float64, seed=0)
    rm, rv = np.zeros(3), np.ones(3)
    for step in range(3):
        x = _randn(shape, seed=step) * (step + 2) + step
        out = model(x)
        np.testing.assert_allclose(out.mean(axis=axes), 0, atol=1e-12)
        np.testing.assert_allclose(out.var(axis=axes), 1, rtol=1e-4)  # var / (var + eps)
        m = x.size // 3
        rm = 0.9 * rm + 0.1 * x.mean(axis=axes)
        rv = 0.9 * rv + 0.1 * x.var(axis=axes) * m / (m - 1)
    buffers = model.buffers()
    assert sorted(buffers) == ["0.running_mean", "0.running_var"]
    np.testing.assert_allclose(buffers["0.running_mean"], rm, rtol=1e-12)
    np.testing.assert_allclose(buffers["0.running_var"], rv, rtol=1e-12)


def test_maxpool_ties_send_the_gradient_to_the_first_maximum():
    # window 1: four zeros; window 2: two 3s, at (0, 3) and (1, 2). Row-major order picks
    # the first of each, as PyTorch does, so the gradient is not duplicated
    x = np.array([[[[0.0, 0.0, 1.0, 3.0], [0.0, 0.0, 3.0, 2.0]]]])
    model = Sequential(MaxPool2d(2), dtype=np.float64)
    np.testing.assert_array_equal(model(x), [[[[0.0, 3.0]]]])
    dx = model.backward(np.array([[[[5.0, 7.0]]]]))
    np.testing.assert_array_equal(dx, [[[[5.0, 0.0, 0.0, 7.0], [0.0, 0.0, 0.0, 0.0]]]])


def test_batchnorm_eval_uses_running_averages():
    model = Sequential(BatchNorm2d(2), dtype=np.float64, seed=0)
    for step in range(4):
        model(_randn((6, 2, 3, 3), seed=step) * 3 + 1)
    model.params["0.weight"][:] = [2.0, 0.5]
    model.params["0.bias"][:] = [0.1, -0.3]
    running = {k: v.copy() for k, v in model.buffers().items()}
    x = _randn((4, 2, 3, 3), seed=10)
    model.eval()
    out = model(x)
    scale = (model.params["0.weight"] / np.sqrt(running["0.running_var"] + 1e-5)).reshape(1, 2, 1, 1)
    expected = (x - running["0.running_mean"].reshape(1, 2, 1, 1)) * scale + model.params["0.bias"].reshape(1, 2, 1, 1)
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    np.testing.assert_allclose(model(x[:1]), out[:1], rtol=1e-12)  # a sample's output ignores the batch
    for k, v in model.buffers().items():
        np.testing.assert_array_equal(v, running[k])  # evaluation leaves the averages alone
    model.train()
    assert not np.allclose(model(x[:2]), out[:2])


def test_state_dict_round_trip_keeps_views():
    model = Sequential(Conv2d(1, 2, 3), BatchNorm2d(2), ReLU(), Flatten(), Linear(8, 3), dtype=np.float32, seed=0)
    model(_randn((4, 1, 4, 4)))
    state = model.state_dict()
    assert sorted(state) == ["0.bias", "0.weight", "1.bias", "1.running_mean", "1.running_var", "1.weight",
                             "4.bias", "4.weight"]
    other = Sequential(Conv2d(1, 2, 3), BatchNorm2d(2), ReLU(), Flatten(), Linear(8, 3), dtype=np.float32, seed=5)
    arena, view = other.buffer.arena, other.params["4.weight"]
    assert not np.array_equal(other.buffer.arena, model.buffer.arena)
    other.load_state_dict(state)
    assert other.buffer.arena is arena and other.params["4.weight"] is view
    np.testing.assert_array_equal(other.buffer.arena, model.buffer.arena)
    for k, v in model.buffers().items():
        np.testing.assert_array_equal(other.buffers()[k], v)
    with pytest.raises(KeyError, match="missing"):
        other.load_state_dict({k: v for k, v in state.items() if k != "1.running_var"})
    # PyTorch's BatchNorm count is ignored (the README loads torch's state dict as it is),
    # anywhere else it is a name the model does not have
    other.load_state_dict({**state, "1.num_batches_tracked": np.array(3)})
    with pytest.raises(KeyError, match=r"unexpected \['4.num_batches_tracked'\]"):
        other.load_state_dict({**state, "4.num_batches_tracked": np.array(3)})


class _DeviceArray:
    """Stands in for a CuPy array where CuPy is absent: np.asarray refuses it, .get() copies it to the host."""

    def __init__(self, a):
        self.a = a

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed")

    def get(self):
        return self.a.copy()


DEVICE_ARRAYS = [_DeviceArray] + ([cupy.asarray] if cupy is not None else [])


@pytest.mark.parametrize("to_device", DEVICE_ARRAYS, ids=lambda f: getattr(f, "__name__", "cupy"))
def test_cpu_model_loads_a_state_of_device_arrays(to_device):
    layers = lambda: [Linear(3, 4), BatchNorm1d(4), Linear(4, 2)]  # noqa: E731
    source, target = (Sequential(*layers(), dtype=np.float64, seed=s) for s in (0, 1))
    source(_randn((5, 3)))  # running statistics that differ from the initial ones
    target.load_state_dict({k: to_device(v) for k, v in source.state_dict().items()})
    for k, v in source.state_dict().items():
        np.testing.assert_array_equal(target.state_dict()[k], v, err_msg=k)


def test_dropout_train_and_eval():
    model = Sequential(Dropout(0.25), dtype=np.float64, seed=0)
    x = np.ones((200, 50))
    out = model(x)
    kept = out != 0
    assert abs(kept.mean() - 0.75) < 0.02
    np.testing.assert_allclose(out[kept], 1 / 0.75)
    np.testing.assert_array_equal(model.backward(np.ones_like(x)), out)  # same mask, same scale
    assert not np.array_equal(model(x), out)  # a new mask each step
    model.reseed(3)
    first = model(x)
    model.reseed(3)
    np.testing.assert_array_equal(model(x), first)
    model.eval()
    np.testing.assert_array_equal(model(x), x)


# (init, shape, expected std): He and Xavier from their variance formulas; uniform(-a, a) has std a / sqrt(3)
INITS = [
    ("small_gaussian", (300, 200), 0.01),
    ("xavier_normal", (300, 200), math.sqrt(2 / 500)),
    ("xavier_uniform", (300, 200), math.sqrt(6 / 500) / math.sqrt(3)),
    ("he_normal", (64, 32, 3, 3), math.sqrt(2 / (32 * 9))),
    ("he_uniform", (64, 32, 3, 3), math.sqrt(6 / (32 * 9)) / math.sqrt(3)),
]


@pytest.mark.parametrize("name, shape, std", INITS, ids=[c[0] for c in INITS])
def test_init_scale(name, shape, std):
    w = init.INITS[name](np.random.default_rng(0), shape)
    assert w.shape == shape
    assert abs(w.mean()) < 0.05 * std
    assert w.std() == pytest.approx(std, rel=0.02)


def test_default_init_follows_the_activation():
    model = Sequential(Linear(400, 300), BatchNorm1d(300), ReLU(), Linear(300, 200), Dropout(0.1), Tanh(),
                       Linear(200, 100), dtype=np.float64, seed=0)
    he = math.sqrt(2 / 400)
    xavier = math.sqrt(2 / (300 + 200)), math.sqrt(2 / (200 + 100))
    assert model.params["0.weight"].std() == pytest.approx(he, rel=0.02)  # ReLU after BatchNorm
    assert model.params["3.weight"].std() == pytest.approx(xavier[0], rel=0.02)  # Tanh after Dropout
    assert model.params["6.weight"].std() == pytest.approx(xavier[1], rel=0.02)  # output layer: linear
    assert not model.params["0.bias"].any()
    np.testing.assert_array_equal(model.params["1.weight"], 1)
    same = Sequential(Linear(400, 300), BatchNorm1d(300), ReLU(), Linear(300, 200), Dropout(0.1), Tanh(),
                      Linear(200, 100), dtype=np.float64, seed=0)
    np.testing.assert_array_equal(same.buffer.arena, model.buffer.arena)


def _activation_std(layer_init, act, depth=10, width=200):
    """The notes' experiment: unit-Gaussian data through `depth` layers; std of the last activations."""
    layers = []
    for _ in range(depth):
        layers += [Linear(width, width, bias=False, init=layer_init), act()]
    model = Sequential(*layers, dtype=np.float64, seed=0)
    return float(model(_randn((500, width))).std())


@pytest.mark.parametrize("layer_init, act, low, high", [
    ("small_gaussian", Tanh, 0, 1e-6),    # activations collapse to zero
    ("xavier_normal", Tanh, 0.1, 1.0),    # stay in range
    ("xavier_normal", ReLU, 0, 0.1),      # halve in variance at every ReLU
    ("he_normal", ReLU, 0.4, 2.0),        # He's factor 2 restores it
])
def test_init_keeps_deep_activations_alive(layer_init, act, low, high):
    assert low <= _activation_std(layer_init, act) <= high


def _train(model, loss_fn, x, y, steps, lr):
    buf = model.buffer
    m, v = np.zeros_like(buf.arena), np.zeros_like(buf.arena)
    losses = []
    for step in range(1, steps + 1):
        loss, d = loss_fn(model(x), y)
        model.backward(d, need_dx=False)
        F.adam_(buf.arena, buf.grad_arena, m, v, step=step, lr=lr)
        losses.append(float(loss))
    return losses


def test_two_layer_net_learns_xor():
    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32)
    y = np.array([0, 1, 1, 0])
    model = Sequential(Linear(2, 8), Tanh(), Linear(8, 2), dtype=np.float32, seed=0)
    losses = _train(model, softmax_cross_entropy, x, y, steps=300, lr=0.05)
    np.testing.assert_array_equal(model(x).argmax(axis=1), y)
    assert losses[-1] < 0.05 * losses[0]


def test_conv_net_overfits_a_small_batch():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((32, 1, 8, 8)).astype(np.float32), rng.integers(0, 4, 32)
    model = Sequential(Conv2d(1, 8, 3, padding=1), BatchNorm2d(8), ReLU(), MaxPool2d(2), Flatten(),
                       Linear(8 * 4 * 4, 4), dtype=np.float32, seed=0)
    losses = _train(model, softmax_cross_entropy, x, y, steps=150, lr=0.01)
    assert losses[-1] < losses[0] / 50
    model.eval()
    assert (model(x).argmax(axis=1) == y).all()


BAD = [
    ("in_features", lambda: Linear(0, 3)),
    ("kernel_size", lambda: Conv2d(1, 2, 0)),
    ("padding", lambda: Conv2d(1, 2, 3, padding=-1)),
    ("stride", lambda: MaxPool2d(2, stride=0)),
    ("padding", lambda: MaxPool2d(2, padding=2)),
    ("padding must be a non-negative integer", lambda: Conv2d(1, 2, 3, padding=1.5)),
    ("padding must be a non-negative integer", lambda: Conv2d(1, 2, 3, padding="1")),
    ("padding must be a non-negative integer", lambda: AvgPool2d(3, padding=0.5)),
    ("p must be", lambda: Dropout(1.0)),
    ("momentum", lambda: BatchNorm2d(3, momentum=2)),
    ("init must be", lambda: Linear(2, 2, init="glorot")),
    ("layers\\[1\\]", lambda: Sequential(ReLU(), "relu")),
    ("distinct", lambda: (lambda r: Sequential(r, r))(ReLU())),
    ("x must have shape", lambda: Sequential(Linear(3, 2))(np.ones((2, 4)))),
    ("x must have shape", lambda: Sequential(Conv2d(3, 2, 3))(np.ones((2, 1, 5, 5)))),
    ("smaller than the kernel", lambda: Sequential(Conv2d(1, 2, 5))(np.ones((2, 1, 3, 3)))),
    ("more than 1 value", lambda: Sequential(BatchNorm1d(2))(np.ones((1, 2)))),
    ("target must be", lambda: softmax_cross_entropy(np.zeros((3, 4)), np.zeros(3))),
    ("target labels", lambda: softmax_cross_entropy(np.zeros((3, 4)), np.array([0, 4, 1]))),
    ("target must have", lambda: mse_loss(np.zeros((3, 4)), np.zeros((4, 3)))),
    ("strength", lambda: l2_penalty(_mnist_like().buffer, -1.0)),
    ("build it inside a Sequential", lambda: Linear(3, 2)(np.ones((2, 3)))),
]


@pytest.mark.parametrize("message, call", BAD, ids=[f"{i}-{c[0]}" for i, c in enumerate(BAD)])
def test_bad_input_names_the_argument(message, call):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=message):
        call()


@pytest.mark.skipif(cupy is None, reason="CuPy is not installed")
def test_cuda_model_matches_cpu_model():
    def layers():
        return [Conv2d(1, 4, 3, padding=1), BatchNorm2d(4), ReLU(), MaxPool2d(2), Flatten(), Linear(36, 3)]
    cpu, gpu = (Sequential(*layers(), dtype=np.float64, device=d, seed=0) for d in ("cpu", "cuda"))
    x, y = _randn((4, 1, 6, 6)), np.array([0, 1, 2, 1])
    for model, xs, ys in [(cpu, x, y), (gpu, cupy.asarray(x), cupy.asarray(y))]:
        _, d = softmax_cross_entropy(model(xs), ys)
        model.backward(d)
    np.testing.assert_allclose(_host(gpu.buffer.grad_arena), cpu.buffer.grad_arena, rtol=1e-9, atol=1e-12)


def _maxpool_direct(x, kernel, stride, padding, dout):
    """Max pooling window by window over the real elements only (the padding can never
    win: PyTorch pads with -inf), and its gradient to each window's first maximum."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    y, dx = np.empty((n, c, ho, wo)), np.zeros_like(x)
    for b in range(n):
        for ch in range(c):
            for i in range(ho):
                for j in range(wo):
                    cells = [(r, q) for r in range(i * sh - ph, i * sh - ph + kh)
                             for q in range(j * sw - pw, j * sw - pw + kw) if 0 <= r < h and 0 <= q < w]
                    r, q = max(cells, key=lambda rq: (x[b, ch][rq], -cells.index(rq)))
                    y[b, ch, i, j] = x[b, ch, r, q]
                    dx[b, ch, r, q] += dout[b, ch, i, j]
    return y, dx


# (kernel, stride, padding): every window at a border reaches into the padding
POOLS_WITH_PADDING = [((2, 2), (2, 2), (1, 1)), ((3, 3), (2, 2), (1, 1)), ((3, 3), (1, 1), (1, 1)),
                      ((3, 2), (2, 1), (1, 1)), ((4, 4), (3, 3), (2, 2))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel,stride,padding", POOLS_WITH_PADDING)
def test_maxpool_with_padding_on_negative_inputs(kernel, stride, padding, device):
    """All inputs negative: padding with 0 instead of -inf would win every border window.
    A gradcheck cannot see that (the wrong forward is differentiable too), so forward and
    d(input) are compared with a direct computation."""
    x = -np.random.default_rng(11).uniform(0.5, 2.0, (2, 3, 7, 6))
    pool = MaxPool2d(kernel, stride=stride, padding=padding)
    y = pool.forward(_on(device, x))
    dout = np.random.default_rng(12).standard_normal(y.shape)
    y_direct, dx_direct = _maxpool_direct(x, kernel, stride, padding, dout)
    np.testing.assert_array_equal(_host(y), y_direct)
    assert (y_direct < 0).all()
    # overlapping windows add in another order: a few ulps
    np.testing.assert_allclose(_host(pool.backward(_on(device, dout))), dx_direct, rtol=1e-13, atol=1e-16)


# -- 16-bit storage: params and grads kept narrow, the layers computing in float32 -----------------
@pytest.mark.parametrize("storage", ["bfloat16", "float16"])
def test_storage_keeps_params_and_grads_narrow_and_computes_in_float32(storage):
    import fastopt
    from fastopt.kernels._formats import BY_NAME

    def net(**kw):
        return Sequential(Conv2d(1, 3, 3, padding=1), BatchNorm2d(3), ReLU(), Flatten(), Linear(48, 5), seed=4, **kw)

    narrow, wide = net(storage=storage), net()
    narrow_dtype = BY_NAME[storage]
    # the same initial weights, rounded once to the storage format
    for p, q in zip(narrow.buffer.params, wide.buffer.params):
        assert p.dtype == narrow_dtype and np.array_equal(p, q.astype(narrow_dtype))
        q[...] = p  # from here the two nets start from the same (representable) weights
    x = np.random.default_rng(0).normal(size=(6, 1, 4, 4))
    out_n, out_w = narrow(x), wide(x)
    assert out_n.dtype == np.float32 and np.array_equal(out_n, out_w)  # float32 compute on the same weights
    dout = np.random.default_rng(1).normal(size=out_w.shape)
    narrow.backward(dout)
    wide.backward(dout)
    for g, h in zip(narrow.buffer.grads, wide.buffer.grads):  # the float32 gradient, rounded to nearest
        assert g.dtype == narrow_dtype and np.array_equal(g, h.astype(narrow_dtype))
    # the optimizer updates the stored params in place; the next forward sees them
    fastopt.SGD(narrow.buffer, lr=0.5).step()
    for p, q in zip(narrow.buffer.params, wide.buffer.params):
        q[...] = p
    assert np.array_equal(narrow(x), wide(x))
    state = narrow.state_dict()
    assert state["0.weight"].dtype == narrow_dtype and state["1.running_mean"].dtype == np.float32
    narrow.load_state_dict({k: v.astype(np.float32) for k, v in wide.state_dict().items()})
    assert all(np.array_equal(p, q.astype(narrow_dtype)) for p, q in zip(narrow.buffer.params, wide.buffer.params))
    assert "kept in " + storage in repr(narrow)


@pytest.mark.parametrize("storage", ["bfloat16", "float16"])
@pytest.mark.parametrize("weights_only,expected", [(True, 5000.0), (False, 5050.0)])
def test_l2_penalty_of_narrow_storage_sums_in_float32(storage, weights_only, expected):
    """A bfloat16 running sum of ones stops at 256, and neither 16-bit format holds 5050."""
    model = Sequential(Linear(100, 100), storage=storage, seed=0)
    for p in model.buffer.params:
        p[...] = 1
    r = l2_penalty(model.buffer, 0.5, weights_only=weights_only)
    assert float(r) == expected and r.dtype == np.float32


@pytest.mark.parametrize("kwargs,message", [
    (dict(storage="float64"), "storage must be None or a float narrower than dtype float32"),
    (dict(storage="int8"), "storage must be None or a float narrower"),
    (dict(storage="float32", dtype=np.float16), "narrower than dtype float16"),
])
def test_storage_errors_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sequential(Linear(2, 3), **kwargs)
