"""fastopt.torch against torch.optim on torch models, fp32, torch's threads active in the
same process (as in a real loop): a torch.nn.TransformerEncoder (d_model 512, 8 heads, 6
layers, about 19M params in about 100 tensors) and a tiny MLP (1,208 params in 6 tensors).

* ``xfmr`` rows: one AdamW step. fastopt = ``fastopt.torch.AdamW()`` (its default
  ``nonfinite="propagate"``: torch's semantics), guarded = ``nonfinite="skip"`` (one more
  read of the grads for the inf/NaN check), torch_fused = ``torch.optim.AdamW(fused=True)``,
  torch = torch's default.
* ``xfmr-iter`` rows: forward + backward + step of a batch of 8 sequences of 32 tokens.
* ``<rule>-xfmr`` rows: RMSprop, Adagrad, NAdam, RAdam (and Lion, fastopt only: torch has
  none) against torch's default implementation of the same rule.

pytest-benchmark runs each implementation in its own block; this VM's bandwidth drifts
between blocks, so the ratios here are indicative: ``benchmarks/torch_dropin_rounds.py``
alternates the implementations round by round and reports the spread."""
import pytest

torch = pytest.importorskip("torch", reason="torch not installed")
ft = pytest.importorskip("fastopt.torch")
from torch import nn  # noqa: E402

GUARDED = dict(nonfinite="skip")


def transformer(seed=0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d_model=512, nhead=8, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=6, enable_nested_tensor=False)


def tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))


def optimizer(impl, rule, params):
    """``impl``: fastopt | guarded | torch_fused | torch."""
    if impl in ("fastopt", "guarded"):
        return getattr(ft, rule)(params, **(GUARDED if impl == "guarded" else {}))
    return getattr(torch.optim, rule)(params, **({"fused": True} if impl == "torch_fused" else {}))


def with_grads(net, opt):
    """Random gradients in place (into the arena for fastopt.torch), then one warm-up step."""
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=g) * 1e-3 for p in net.parameters()]
    for p in net.parameters():
        if p.grad is None:  # fastopt.torch too: a .grad stays None until a backward (or this) makes one
            p.grad = torch.zeros_like(p)
    opt.zero_grad(set_to_none=False)  # fastopt.torch: every .grad is now its arena view (a loop's backward does so)
    for p, grad in zip(net.parameters(), grads):
        p.grad.copy_(grad)
    opt.step()
    return opt


def n_bytes(net):
    return 4 * 7 * sum(p.numel() for p in net.parameters())  # AdamW: read p, g, m, v; write p, m, v


@pytest.mark.parametrize("impl", ["fastopt", "guarded", "torch_fused", "torch"])
@pytest.mark.parametrize("model", ["xfmr", "tiny"])
def test_adamw_step(record, model, impl):
    net = (transformer if model == "xfmr" else tiny)()
    opt = with_grads(net, optimizer(impl, "AdamW", net.parameters()))
    size = sum(p.numel() for p in net.parameters())
    record(f"{model}-torch", size, impl, opt.step, n_bytes(net), 10 if model == "xfmr" else 2000)


@pytest.mark.parametrize("impl", ["fastopt", "torch_fused"])
def test_transformer_iteration(record, impl):
    net = transformer()
    opt = optimizer(impl, "AdamW", net.parameters())
    x = torch.randn(8, 32, 512, generator=torch.Generator().manual_seed(2))

    def iteration():
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
    iteration()
    record("xfmr-iter", sum(p.numel() for p in net.parameters()), impl, iteration, n_bytes(net), 3)


@pytest.mark.parametrize("impl", ["fastopt", "torch"])
@pytest.mark.parametrize("rule", ["RMSprop", "Adagrad", "NAdam", "RAdam", "Lion"])
def test_rule_on_transformer(record, rule, impl):
    if not hasattr(torch.optim, rule) and impl != "fastopt":
        pytest.skip(f"torch.optim has no {rule}")
    net = transformer()
    opt = with_grads(net, optimizer(impl, rule, net.parameters()))
    record(f"{rule.lower()}-xfmr", sum(p.numel() for p in net.parameters()), impl, opt.step, n_bytes(net), 5)
