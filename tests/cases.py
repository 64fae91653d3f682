"""The table every kernel test draws from: for each rule, seeded random hyper-parameter
sets that between them turn every option on and off."""
import zlib

import numpy as np

from fastopt.kernels import RULES


def _betas(rng):
    return (float(rng.uniform(0.5, 0.95)), float(rng.uniform(0.9, 0.9999)))


def _wd(rng, i):
    return 0.0 if i % 2 == 0 else float(rng.uniform(1e-3, 1e-1))


def _l1(rng, i, mode):
    """L1 and optax's eps_root on the last draw only (torch has neither: the parity tests
    skip that draw)."""
    return dict(l1=float(rng.uniform(1e-3, 1e-1)), l1_mode=mode) if i == 3 else {}


def _eps_root(rng, i):
    return dict(eps_root=float(10 ** rng.uniform(-10, -6))) if i == 3 else {}


# rule -> draw(rng, i) -> hyper-parameters; i = 0 always gives the defaults (plus lr for sgd)
DRAWS = {
    "sgd": lambda rng, i: {} if i == 0 else dict(
        momentum=[0.0, float(rng.uniform(0.5, 0.99)), float(rng.uniform(0.5, 0.99))][i % 3],
        dampening=float(rng.uniform(0, 0.5)) if i % 3 == 2 else 0.0,
        nesterov=(i % 3 == 1), weight_decay=_wd(rng, i), maximize=(i % 4 == 3),
        **_l1(rng, i, "proximal")),
    "adagrad": lambda rng, i: {} if i == 0 else dict(
        lr=float(rng.uniform(1e-3, 1e-1)), lr_decay=float(rng.uniform(0, 0.1)) if i % 2 else 0.0,
        weight_decay=_wd(rng, i + 1), eps=float(10 ** rng.uniform(-10, -6)), maximize=(i == 3)),
    "rmsprop": lambda rng, i: {} if i == 0 else dict(
        lr=float(rng.uniform(1e-3, 1e-2)), alpha=float(rng.uniform(0.8, 0.999)),
        eps=float(10 ** rng.uniform(-8, -4)), weight_decay=_wd(rng, i), centered=(i % 2 == 1),
        momentum=float(rng.uniform(0.5, 0.95)) if i >= 2 else 0.0, maximize=(i == 3)),
    "adam": lambda rng, i: {} if i == 0 else dict(
        lr=float(10 ** rng.uniform(-4, -2)), betas=_betas(rng), eps=float(10 ** rng.uniform(-8, -5)),
        weight_decay=_wd(rng, i), amsgrad=(i % 2 == 1), maximize=(i == 2), bias_correction=(i != 3),
        decoupled_weight_decay=(i == 1), **_l1(rng, i, "proximal"), **_eps_root(rng, i)),
    "adamw": lambda rng, i: {} if i == 0 else dict(
        lr=float(10 ** rng.uniform(-4, -2)), betas=_betas(rng), eps=float(10 ** rng.uniform(-8, -5)),
        weight_decay=float(rng.uniform(0, 0.2)), amsgrad=(i % 2 == 0), maximize=(i == 3),
        bias_correction=(i != 3), **_l1(rng, i, "subgradient"), **_eps_root(rng, i)),
    "adadelta": lambda rng, i: {} if i == 0 else dict(
        lr=float(rng.uniform(0.1, 1.0)), rho=float(rng.uniform(0.8, 0.99)),
        eps=float(10 ** rng.uniform(-7, -5)), weight_decay=_wd(rng, i), maximize=(i == 2)),
    "adamax": lambda rng, i: {} if i == 0 else dict(
        lr=float(10 ** rng.uniform(-4, -2)), betas=_betas(rng), eps=float(10 ** rng.uniform(-8, -5)),
        weight_decay=_wd(rng, i), maximize=(i == 3)),
    "nadam": lambda rng, i: {} if i == 0 else dict(
        lr=float(10 ** rng.uniform(-4, -2)), betas=_betas(rng), eps=float(10 ** rng.uniform(-8, -5)),
        weight_decay=_wd(rng, i), momentum_decay=float(rng.uniform(1e-3, 1e-2)),
        decoupled_weight_decay=(i == 3), maximize=(i == 2)),
    "radam": lambda rng, i: {} if i == 0 else dict(
        lr=float(10 ** rng.uniform(-4, -2)), betas=_betas(rng), eps=float(10 ** rng.uniform(-8, -5)),
        weight_decay=_wd(rng, i), decoupled_weight_decay=(i == 3), maximize=(i == 2)),
    "lion": lambda rng, i: {} if i == 0 else dict(
        lr=float(10 ** rng.uniform(-4, -2)), betas=_betas(rng), weight_decay=_wd(rng, i),
        maximize=(i == 2)),
}
assert set(DRAWS) == set(RULES), "every rule needs a row in the table"
N_DRAWS = 4


def hparams(rule, i):
    hp = DRAWS[rule](np.random.default_rng([zlib.crc32(rule.encode()), i]), i)
    if rule == "sgd":
        hp.setdefault("lr", 0.05)
    return hp


def states(rule, shape, dtype=np.float64):
    """Zero-filled state arrays, in the order the function takes them (as PyTorch initializes)."""
    module = RULES[rule][0]
    return [np.zeros(shape, dtype) for _ in module.states]


def gradients(steps, shape, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for _ in range(steps)]
