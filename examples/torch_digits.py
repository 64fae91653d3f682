"""A torch CNN on scikit-learn's bundled 8x8 digits, trained twice from the same weights on
the same batches: with ``fastopt.torch.AdamW`` and with ``torch.optim.AdamW``. The training
loop is torch's own; only the optimizer's import differs.

    python examples/torch_digits.py [--epochs 15] [--limit N] [--threads 1] [--device cuda] [--net train-conv]

``--net train-conv`` is the torch twin of ``fastopt train``'s conv net (BatchNorm included),
so that examples/s can be set beside ``fastopt train --device ...`` on the same machine.
"""
import argparse
import time

import torch
from torch import nn

import fastopt.torch
from fastopt.app.data import load_digits

NETS = ("small", "train-conv")


def model(seed, net="small"):
    torch.manual_seed(seed)
    if net == "train-conv":  # fastopt.app.recipes.build_model("conv", (1, 8, 8), 10)
        return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(32 * 2 * 2, 64), nn.ReLU(), nn.Linear(64, 10))
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4 * 4, 10))


def _sync(device):
    if device.type == "cuda":  # the step's kernels run asynchronously: time them to their end
        torch.cuda.synchronize(device)


def run(optimizer_class, data, args):
    x, y, x_test, y_test = data
    device = x.device
    net = model(args.seed, args.net).to(device)
    opt = optimizer_class(net.parameters(), lr=args.lr, weight_decay=1e-4)
    order = torch.Generator().manual_seed(args.seed)
    steps, start = [], time.perf_counter()
    for _ in range(args.epochs):
        for idx in torch.randperm(len(x), generator=order).split(args.batch_size):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            loss.backward()
            _sync(device)
            t = time.perf_counter()
            opt.step()
            _sync(device)
            steps.append(time.perf_counter() - t)
    _sync(device)
    seconds = time.perf_counter() - start
    net.eval()
    with torch.no_grad():
        accuracy = (net(x_test).argmax(1) == y_test).double().mean().item()
    return net, accuracy, loss.item(), seconds, steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--limit", type=int, default=None, help="train on the first N examples only")
    parser.add_argument("--threads", type=int, default=1, help="torch's threads (fastopt's kernels: numba's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the data, the net and the optimizer there)")
    parser.add_argument("--net", choices=NETS, default="small",
                        help="small: two convolutions; train-conv: the torch twin of fastopt train's conv net")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = [torch.from_numpy(a).to(device) for a in load_digits()]
    if args.limit:
        data[0], data[1] = data[0][:args.limit], data[1][:args.limit]
    print(f"digits: {len(data[0])} training and {len(data[2])} test images, {args.epochs} epochs, "
          f"batch {args.batch_size}, AdamW lr {args.lr}, net {args.net} on {device}")
    nets = []
    for name, cls in (("fastopt.torch.AdamW", fastopt.torch.AdamW), ("torch.optim.AdamW", torch.optim.AdamW)):
        net, accuracy, loss, seconds, steps = run(cls, data, args)
        nets.append(net)
        # the first step includes loading (or compiling) the kernels: shown apart
        later = sorted(steps[1:]) or [0.0]
        print(f"{name:<20} test accuracy {100 * accuracy:6.2f}%  last loss {loss:.4f}  training {seconds:.2f} s "
              f"({len(data[0]) * args.epochs / (seconds - steps[0]):,.0f} examples/s after the first step), "
              f"first step {1e3 * steps[0]:.1f} ms, "
              f"median step {1e6 * later[len(later) // 2]:.0f} us")
    gap = max((a - b).abs().max().item() for a, b in zip(nets[0].parameters(), nets[1].parameters()))
    print(f"largest weight difference between the two runs: {gap:.2e} (float32 rounding, compounded)")


if __name__ == "__main__":
    main()
