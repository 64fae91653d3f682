"""fastopt.nn against PyTorch in float64, given the same weights: outputs, losses, every
parameter gradient, d(input), BatchNorm's running statistics, evaluation mode, and a few
SGD steps through fastopt.functional on the arena vs torch.optim.SGD."""
import numpy as np
import pytest

import fastopt.functional as F
from fastopt import nn

torch = pytest.importorskip("torch", reason="torch is not installed (pip install -e .[torch]); CI installs it")
tnn = torch.nn

ATOL = 1e-10


def _pair(make_fast, make_torch):
    """The same architecture in both libraries, torch's weights copied into fastopt by name."""
    torch.manual_seed(0)
    tmodel = tnn.Sequential(*make_torch()).double()
    with torch.no_grad():  # move BatchNorm's gamma / beta off (1, 0) so they matter
        for name, p in tmodel.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    model = nn.Sequential(*make_fast(), dtype=np.float64, seed=1)
    model.load_state_dict(tmodel.state_dict())  # as the README has it: num_batches_tracked too
    return model, tmodel


# (id, fastopt layers, torch layers, input shape, number of classes / outputs)
ARCHS = [
    ("convnet",
     lambda: [nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1),
              nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(6, 5)],
     lambda: [tnn.Conv2d(2, 4, 3, padding=1), tnn.BatchNorm2d(4), tnn.ReLU(), tnn.MaxPool2d(3, stride=2, padding=1),
              tnn.Conv2d(4, 6, 3, stride=2, padding=1), tnn.Tanh(), tnn.AvgPool2d(2), tnn.Flatten(), tnn.Linear(6, 5)],
     (4, 2, 8, 8), 5),
    ("mnist-like",
     lambda: [nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 2, bias=False), nn.Sigmoid(),
              nn.Flatten(), nn.Linear(4 * 4 * 4, 6), nn.ReLU(), nn.Linear(6, 3)],
     lambda: [tnn.Conv2d(1, 3, 3), tnn.ReLU(), tnn.MaxPool2d(2), tnn.Conv2d(3, 4, 2, bias=False), tnn.Sigmoid(),
              tnn.Flatten(), tnn.Linear(4 * 4 * 4, 6), tnn.ReLU(), tnn.Linear(6, 3)],
     (3, 1, 12, 12), 3),
    ("mlp-batchnorm",
     lambda: [nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 4, bias=False), nn.Sigmoid(),
              nn.Linear(4, 3)],
     lambda: [tnn.Linear(5, 7), tnn.BatchNorm1d(7), tnn.Tanh(), tnn.Linear(7, 4, bias=False), tnn.Sigmoid(),
              tnn.Linear(4, 3)],
     (6, 5), 3),
]

LOSSES = {  # fastopt loss, torch loss, target maker (rng, batch, outputs)
    "cross-entropy": (nn.softmax_cross_entropy, tnn.functional.cross_entropy, lambda rng, n, k: rng.integers(0, k, n)),
    "mse": (nn.mse_loss, tnn.functional.mse_loss, lambda rng, n, k: rng.standard_normal((n, k))),
    "mae": (nn.mae_loss, tnn.functional.l1_loss, lambda rng, n, k: rng.standard_normal((n, k))),
}


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("name, make_fast, make_torch, shape, k", ARCHS, ids=[a[0] for a in ARCHS])
def test_forward_loss_and_gradients_match_torch(name, make_fast, make_torch, shape, k, loss):
    model, tmodel = _pair(make_fast, make_torch)
    fast_loss, torch_loss, make_target = LOSSES[loss]
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal(shape), make_target(rng, shape[0], k)
    tx = torch.tensor(x, requires_grad=True)

    out = model(x)
    value, dout = fast_loss(out, y)
    dx = model.backward(dout)
    tout = tmodel(tx)
    tvalue = torch_loss(tout, torch.tensor(y))
    tvalue.backward()

    np.testing.assert_allclose(out, tout.detach().numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(value, tvalue.item(), rtol=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=0, atol=ATOL)
    tgrads = dict(tmodel.named_parameters())
    assert sorted(model.grads) == sorted(tgrads)
    for pname, g in model.grads.items():
        np.testing.assert_allclose(g, tgrads[pname].grad.numpy(), rtol=0, atol=ATOL, err_msg=pname)
    tbuffers = tmodel.state_dict()
    for bname, b in model.buffers().items():
        np.testing.assert_allclose(b, tbuffers[bname].numpy(), rtol=1e-12, atol=ATOL, err_msg=bname)


@pytest.mark.parametrize("name, make_fast, make_torch, shape, k", ARCHS, ids=[a[0] for a in ARCHS])
def test_eval_mode_matches_torch_after_training_steps(name, make_fast, make_torch, shape, k):
    model, tmodel = _pair(make_fast, make_torch)
    rng = np.random.default_rng(3)
    momentum = np.zeros_like(model.buffer.arena)
    topt = torch.optim.SGD(tmodel.parameters(), lr=0.05, momentum=0.9)
    for step in range(1, 6):
        x, y = rng.standard_normal(shape), rng.integers(0, k, shape[0])
        _, dout = nn.softmax_cross_entropy(model(x), y)
        model.backward(dout, need_dx=False)
        F.sgd_(model.buffer.arena, model.buffer.grad_arena, momentum, step=step, lr=0.05, momentum=0.9)
        topt.zero_grad()
        tnn.functional.cross_entropy(tmodel(torch.tensor(x)), torch.tensor(y)).backward()
        topt.step()
    for pname, p in tmodel.named_parameters():
        np.testing.assert_allclose(model.params[pname], p.detach().numpy(), rtol=1e-9, atol=ATOL, err_msg=pname)
    model.eval()
    tmodel.eval()
    x = rng.standard_normal(shape)
    with torch.no_grad():
        np.testing.assert_allclose(model(x), tmodel(torch.tensor(x)).numpy(), rtol=1e-9, atol=ATOL)


def test_dropout_is_identity_in_eval_and_scaled_in_train_as_torch():
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.3), nn.Linear(6, 2), dtype=np.float64, seed=0)
    tmodel = tnn.Sequential(tnn.Linear(4, 6), tnn.Dropout(0.3), tnn.Linear(6, 2)).double()
    model.load_state_dict({k: v.numpy() for k, v in tmodel.state_dict().items()})
    x = np.random.default_rng(0).standard_normal((5, 4))
    model.eval()
    tmodel.eval()
    with torch.no_grad():
        np.testing.assert_allclose(model(x), tmodel(torch.tensor(x)).numpy(), rtol=0, atol=ATOL)
    # in training both keep a Bernoulli(0.7) mask scaled by 1 / 0.7 (the masks themselves differ)
    model.train()
    hidden = model[1](np.ones((400, 50)))
    assert set(np.unique(hidden)) == {0.0, 1 / 0.7}
