"""The table every kernel test draws from: for each rule, seeded random hyper-parameter
sets that between them turn every option on and off, derived from the rules' declarations
(``Hyper(..., sample=...)`` in ``kernels/<rule>.py``: adding an option adds its range there).

Every optimizer's rule has its table: the element-wise ones (``fastopt.kernels.RULES``) and
the per-tensor LAMB and LARS (``fastopt.layerwise``), by the optimizer's name (``DECLARED``).

Draw 0 is the defaults. In draws 1..N_DRAWS-1, an option with a range and a non-zero default
(lr, betas, eps) is drawn from its range every time; an on/off option (a bool; a number whose
default 0 or None means off, as weight decay or LAMB's clamp_value; one that declares its
``off`` value, as LAMB's weight decay) is on in the draws ``ON_IN`` gives for its place among
the rule's on/off options, and off (at its ``off`` value, else its default) in the others.
An option torch.optim lacks (``torch=False``) moves only in the last draw, which the torch
parity tests skip. A draw the rule's own checks reject (SGD's Nesterov with dampening) gives
back its options, the last declared first, until they pass.
Draws 1.. name every option they may move, at its off value where it is off.
"""
import zlib

import numpy as np

import fastopt
from fastopt.kernels import RULES

# optimizer name -> its rule, for every optimizer (LAMB's and LARS's are outside RULES)
DECLARED = {name: cls.rule for name, cls in fastopt.OPTIMIZERS.items()}

N_DRAWS = 4
LAST = N_DRAWS - 1
# The draws an on/off option is on in, by its place among the rule's on/off options (in
# declaration order), turning round after the last. The first three are each off once, so
# any two of them meet in a draw (SGD's momentum and dampening in draw 1; Adam's weight
# decay with and without decoupled_weight_decay); the next two are on once. Each is on in
# draw 1 or 2, which the torch parity tests run, and off in draw 0.
ON_IN = ({1, 2}, {1, 3}, {2, 3}, {2}, {1})
# values every draw of a rule keeps: SGD's lr, 0.05, as the hand-written table had it (its
# tests' tolerances and "the parameters moved" checks were set with it)
FIXED = {"sgd": {"lr": 0.05}}


def _value(sample, rng):
    """A value from a declared range; the "choice" kind is not drawn here (see _choice)."""
    if isinstance(sample[0], tuple):
        return tuple(_value(part, rng) for part in sample)
    kind, lo, hi = sample
    if kind == "log":
        return float(10 ** rng.uniform(np.log10(lo), np.log10(hi)))
    return float(rng.uniform(lo, hi))


def _choice(rule, h, i):
    """The values of a ("choice", ...) option in turn over the draws it moves in, starting
    with the first that is not its default; rules sharing one compiled math (Adam, AdamW)
    carry on each other's turn, so between them they reach every value."""
    values = [v for v in h.sample[1:] if v != h.default] + [v for v in h.sample[1:] if v == h.default]
    moving = [LAST] if not h.torch else list(range(1, N_DRAWS))
    pool = sharing_kernels(rule)
    turn = pool.index(rule) * len(moving) + moving.index(i)
    return values[turn % len(values)]


def sharing_kernels(rule):
    """The rules compiled from the same math as ``rule`` (Adam and AdamW), ``rule`` among them."""
    kernels = DECLARED[rule].kernels
    return [r for r, m in DECLARED.items() if m.kernels is kernels]


def on_off(h):
    """Whether the table turns ``h`` on and off rather than drawing it every time."""
    if isinstance(h.default, bool):
        return True
    ranged = h.sample is not None and h.sample[0] != "choice"
    return ranged and (h.off is not None or h.default is None or h.default == 0)


def off_value(h):
    """The value of an on/off option where it is off."""
    return h.off if h.off is not None else h.default


def _derive(rule, i):
    declared = DECLARED[rule]
    if i == 0:
        return {}
    rng = np.random.default_rng([zlib.crc32(rule.encode()), i])
    hp, place, named = {}, 0, []
    for name, h in declared.hyper.items():
        if h.sample is None and not isinstance(h.default, bool):
            continue
        # every range is drawn whether used or not: a draw's values do not hang on its neighbours'
        value = _value(h.sample, rng) if h.sample is not None and h.sample[0] != "choice" else None
        if not h.torch and i != LAST:
            continue
        named.append(name)
        if h.sample is not None and h.sample[0] == "choice":
            hp[name] = _choice(rule, h, i)
        elif not on_off(h):
            hp[name] = value
        else:
            on = not h.torch or i in ON_IN[place % len(ON_IN)]
            if h.torch:
                place += 1
            if on:
                hp[name] = (not h.default) if isinstance(h.default, bool) else value
            elif off_value(h) != h.default:
                hp[name] = off_value(h)
    kept = _within_checks(declared, hp)
    # the options left off are named too: one draw written over another (an edit mid-run in
    # test_restore) turns them off rather than keeping the other's (dampening under nesterov);
    # one the checks gave back is at its default
    return {name: kept.get(name, declared.hyper[name].default) for name in named}


def _within_checks(declared, hp):
    """``hp``, or if the rule's checks reject it, ``hp`` less the fewest options dropped last
    declared first: one option if one suffices, else the last ones until the checks pass."""
    def passes(candidate):
        try:
            declared.check({**declared.defaults, **candidate})
        except ValueError:
            return False
        return True

    if passes(hp):
        return hp
    for name in reversed(list(hp)):
        fewer = {k: v for k, v in hp.items() if k != name}
        if passes(fewer):
            return fewer
    names = list(hp)
    while names and not passes({k: hp[k] for k in names}):
        names.pop()
    return {k: hp[k] for k in names}


# element-wise rule -> draw(i) -> hyper-parameters; draw 0 gives the defaults (plus FIXED)
DRAWS = {rule: (lambda i, rule=rule: _derive(rule, i)) for rule in RULES}


def hparams(rule, i):
    """Draw ``i`` of any rule in DECLARED (LAMB's and LARS's too)."""
    return {**FIXED.get(rule, {}), **_derive(rule, i)}


def states(rule, shape, dtype=np.float64):
    """Zero-filled state arrays, in the order the function takes them (as PyTorch initializes)."""
    module = DECLARED[rule]
    return [np.zeros(shape, dtype) for _ in module.states]


def gradients(steps, shape, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for _ in range(steps)]
