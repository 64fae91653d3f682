"""Each rule at 1e3, 1e5 and 1e7 float32 parameters: fastopt vs its NumPy reference vs
torch.optim (foreach and fused, when installed) vs a roof kernel that moves the same bytes
with trivial arithmetic. Run: ``pytest benchmarks/`` (the table prints at the end)."""
import numpy as np
import pytest

from fastopt.kernels import RULES
from fastopt.kernels._rule import Rule, State

SIZES = [10**3, 10**5, 10**7]
# every rule with the options a user would typically turn on (sgd: momentum)
HP = {"sgd": dict(lr=0.01, momentum=0.9)}
TORCH_NAMES = {"sgd": "SGD", "adagrad": "Adagrad", "rmsprop": "RMSprop", "adam": "Adam", "adamw": "AdamW",
               "adadelta": "Adadelta", "adamax": "Adamax", "nadam": "NAdam", "radam": "RAdam"}


def roof_math(p, g, s0, s1, s2):
    return p + g, s0 + g, s1 + g, s2 + g


# the same traffic as a rule with up to three states, trivial arithmetic
ROOF = Rule("roof", roof_math, lambda h, step, lr: {},
            states=[State(f"s{k}", lambda h: True) for k in range(3)]).kernels


def _rounds(n):
    return {10**3: 2000, 10**5: 200, 10**7: 10}[n]


def _setup(rule, n):
    rng = np.random.default_rng(0)
    module = RULES[rule][0]
    p = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    states = [np.zeros(n, np.float32) for _ in module.states]
    hp = HP.get(rule, {})
    # the states this configuration really uses (a step with amsgrad off never touches max_exp_avg_sq)
    used = {"sgd": 1, "rmsprop": 1, "adam": 2, "adamw": 2}.get(rule, len(states))
    return p, g, states, hp, used


@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"{n:.0e}")
@pytest.mark.parametrize("impl", ["fastopt", "roof", "numpy", "torch_foreach", "torch_fused"])
@pytest.mark.parametrize("rule", list(RULES))
def test_step(record, rule, impl, n):
    _, fn, reference = RULES[rule]
    p, g, states, hp, used = _setup(rule, n)
    nbytes = p.itemsize * n * (2 + used + 1 + used)  # read p, g, states; write p, states
    step = [0]

    if impl == "fastopt":
        def run():
            step[0] += 1
            fn(p, g, *states, step=step[0], **hp)
    elif impl == "roof":
        from fastopt.kernels._dispatch import PARALLEL_THRESHOLD
        kernel = ROOF.cpu(parallel=n >= PARALLEL_THRESHOLD)
        args = [p, g, *states[:used]] + [None] * (3 - used)
        one = np.float32(1)

        def run():
            kernel(*args, None, (one, None))
    elif impl == "numpy":
        def run():
            step[0] += 1
            reference(p, g, *states, step=step[0], **hp)
    else:
        torch = pytest.importorskip("torch", reason="torch not installed")
        if rule not in TORCH_NAMES:
            pytest.skip(f"torch has no {rule}")
        torch.set_num_threads(numba_threads())
        tp = torch.from_numpy(p)
        tp.grad = torch.from_numpy(g)
        kind = impl.split("_")[1]
        try:
            opt = getattr(torch.optim, TORCH_NAMES[rule])([tp], **{kind: True}, **hp)
            opt.step()
        except (RuntimeError, TypeError, ValueError) as e:
            pytest.skip(f"torch {TORCH_NAMES[rule]} has no {kind} CPU implementation: {e}")
        run = opt.step
    record(rule, n, impl, run, nbytes, _rounds(n) if impl != "numpy" else max(3, _rounds(n) // 10))


def numba_threads():
    import numba
    return numba.get_num_threads()
