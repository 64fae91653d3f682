"""One training step (forward, softmax cross-entropy, backward, SGD-momentum update) of a small
conv net, fastopt.nn vs the same net in PyTorch on the CPU, same weights, same run:
Conv(1->16, 3x3, pad 1) ReLU MaxPool2 Conv(16->32, 3x3, pad 1) ReLU MaxPool2 Linear(1568->128)
ReLU Linear(128->10), float32, batch 128 of 28x28x1. Run ``pytest benchmarks/test_nn.py``;
the ratio prints at the end of the module. fastopt updates the whole model with one fused
``sgd_`` over ``model.buffer.arena``; torch with ``torch.optim.SGD`` (its default, foreach).

Also the measurement behind "no fused Numba kernel in fastopt.nn": bias + ReLU fused in one
Numba loop vs NumPy's two passes, on the first conv layer's output.
"""
import numpy as np
import pytest

import fastopt.functional as F
from fastopt import nn

BATCH, ROUNDS = 128, 30
TIMES = {}  # impl -> median seconds of one step


def _fastopt_net():
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10), dtype=np.float32, seed=0)


def _torch_net(torch):
    t = torch.nn
    torch.manual_seed(0)
    return t.Sequential(t.Conv2d(1, 16, 3, padding=1), t.ReLU(), t.MaxPool2d(2), t.Conv2d(16, 32, 3, padding=1),
                        t.ReLU(), t.MaxPool2d(2), t.Flatten(), t.Linear(32 * 7 * 7, 128), t.ReLU(), t.Linear(128, 10))


def _batch():
    rng = np.random.default_rng(0)
    return rng.standard_normal((BATCH, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, BATCH)


@pytest.fixture(scope="module", autouse=True)
def ratio_line(request):
    yield
    if {"fastopt", "torch"} <= TIMES.keys():
        import torch
        line = (f"\nconvnet train step, batch {BATCH}, float32, CPU: fastopt {TIMES['fastopt'] * 1e3:.2f} ms, "
                f"torch {TIMES['torch'] * 1e3:.2f} ms (torch threads {torch.get_num_threads()}): "
                f"torch/fastopt = {TIMES['torch'] / TIMES['fastopt']:.2f} (above 1: fastopt is faster)")
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled():  # print past pytest's output capture
            print(line)


@pytest.mark.parametrize("impl", ["fastopt", "torch"])
def test_convnet_step(record, benchmark, impl):
    x, y = _batch()
    if impl == "fastopt":
        model = _fastopt_net()
        torch = pytest.importorskip("torch", reason="torch not installed: the same weights come from it")
        model.load_state_dict({k: v.numpy() for k, v in _torch_net(torch).state_dict().items()})
        buf = model.buffer
        momentum, step = np.zeros_like(buf.arena), [0]

        def run():
            loss, dlogits = nn.softmax_cross_entropy(model(x), y)
            model.backward(dlogits, need_dx=False)
            step[0] += 1
            F.sgd_(buf.arena, buf.grad_arena, momentum, step=step[0], lr=0.01, momentum=0.9)
            return loss
        nbytes = buf.arena.nbytes * 5  # the update's share: read p, g, m; write p, m
    else:
        torch = pytest.importorskip("torch", reason="torch not installed")
        tmodel = _torch_net(torch)
        opt = torch.optim.SGD(tmodel.parameters(), lr=0.01, momentum=0.9)
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)

        def run():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(tmodel(tx), ty)
            loss.backward()
            opt.step()
            return loss.item()
        nbytes = sum(p.numel() for p in tmodel.parameters()) * 4 * 5
    first = float(run())  # both start from the same weights: the same first loss
    TIMES.setdefault("first_loss", {})[impl] = first
    record("convnet", BATCH, impl, run, nbytes, ROUNDS)
    TIMES[impl] = benchmark.stats.stats.median
    losses = TIMES["first_loss"]
    if len(losses) == 2:
        assert losses["fastopt"] == pytest.approx(losses["torch"], rel=1e-4)


def _fused_bias_relu():
    from numba import njit, prange

    @njit(parallel=True, error_model="numpy")
    def bias_relu(y, b, out):
        for o in prange(y.shape[0]):
            for m in range(y.shape[1]):
                v = y[o, m] + b[o]
                out[o, m] = v if v > 0 else 0
    return bias_relu


@pytest.mark.parametrize("impl", ["numpy", "numba-fused"])
def test_bias_relu(record, impl):
    rng = np.random.default_rng(0)
    y = rng.standard_normal((16, BATCH * 28 * 28)).astype(np.float32)  # conv1's product, (C_out, N*H*W)
    b, out = rng.standard_normal(16).astype(np.float32), np.empty_like(y)
    if impl == "numpy":
        def run():  # what Conv2d + ReLU do: an in-place bias add, then a new array
            np.add(y, b[:, None], out=out)
            return np.maximum(out, 0)
    else:
        kernel = _fused_bias_relu()

        def run():
            kernel(y, b, out)
            return out
    expected = np.maximum(y + b[:, None], 0)
    np.testing.assert_array_equal(run(), expected)
    record("bias+relu", y.size, "fastopt" if impl == "numpy" else "numba-fused", run, y.nbytes * 2, 200)
