"""Optimizer classes for every rule in ``fastopt.kernels``, with ``torch.optim``'s
constructor arguments, defaults and state names. A class names its rule; the rule's
declaration (``kernels/<rule>.py``) gives its constructor, its states and their checks.

``lr`` is a float or a schedule (any callable of the number of updates done, e.g.
``fastopt.schedules.warmup_cosine``), evaluated on the host before each step.

Every class also takes the keyword options of :class:`fastopt.Optimizer`:
``max_grad_norm`` (clip the global 2-norm of the gradients; the factor is applied inside
the update kernel) and ``nonfinite``: ``"skip"`` (default: a step whose gradients hold
inf or NaN changes nothing and counts in ``skipped_steps``), ``"raise"``
(FloatingPointError before anything is written) or ``"propagate"`` (PyTorch's behaviour;
with ``max_grad_norm=None`` too, no reduction pass at all).
"""
from .kernels import adadelta, adagrad, adam, adamax, lion, nadam, radam, rmsprop, sgd
from .optimizer import Optimizer


class SGD(Optimizer):
    """SGD with momentum, dampening and Nesterov (``torch.optim.SGD``); see ``kernels/sgd.py``.
    ``l1`` adds an L1 penalty: a subgradient term, or a proximal soft threshold
    (``l1_mode="proximal"``) that sets small weights to exactly zero.

    Unlike torch's, its state dict keeps a ``step`` per param (the updates done): a
    schedule's lr and the first step's momentum buffer depend on it, so a state dict without
    it would resume the schedule from its start. ``torch.optim.SGD`` loads the extra key and
    keeps it; from a torch state dict (no count) fastopt knows only "stepped or not"."""
    rule = sgd.SGD


class Adagrad(Optimizer):
    """Adagrad (``torch.optim.Adagrad``); see ``kernels/adagrad.py``."""
    rule = adagrad.ADAGRAD


class RMSprop(Optimizer):
    """RMSprop, optionally centered and with momentum (``torch.optim.RMSprop``); see ``kernels/rmsprop.py``."""
    rule = rmsprop.RMSPROP


class Adam(Optimizer):
    """Adam (``torch.optim.Adam``); see ``kernels/adam.py``. ``bias_correction=False`` is
    the lecture notes' "Adam (almost)"."""
    rule = adam.ADAM


class AdamW(Optimizer):
    """AdamW: Adam with decoupled weight decay (``torch.optim.AdamW``)."""
    rule = adam.ADAMW


class Adadelta(Optimizer):
    """Adadelta (``torch.optim.Adadelta``); see ``kernels/adadelta.py``."""
    rule = adadelta.ADADELTA


class Adamax(Optimizer):
    """Adamax (``torch.optim.Adamax``); see ``kernels/adamax.py``."""
    rule = adamax.ADAMAX


class NAdam(Optimizer):
    """NAdam with PyTorch's momentum-decay schedule (``torch.optim.NAdam``); see ``kernels/nadam.py``."""
    rule = nadam.NADAM


class RAdam(Optimizer):
    """RAdam (``torch.optim.RAdam``); see ``kernels/radam.py``."""
    rule = radam.RADAM


class Lion(Optimizer):
    """Lion (Chen et al., 2023; not in torch.optim); see ``kernels/lion.py``."""
    rule = lion.LION


def _eight_bit(base):
    """``base`` with ``state_bits=8`` by default: 8-bit blockwise state (fastopt/state8bit.py)."""
    init = base.__init__

    def __init__(self, *args, state_bits=8, **kwargs):
        init(self, *args, state_bits=state_bits, **kwargs)

    __init__.__signature__ = init.__signature__.replace(parameters=[
        p.replace(default=8) if p.name == "state_bits" else p for p in init.__signature__.parameters.values()])
    doc = f"{base.__name__} with 8-bit blockwise state (``state_bits=8``; see ``fastopt/state8bit.py``)."
    return type(f"{base.__name__}8bit", (base,), {"__init__": __init__, "__doc__": doc})


Adam8bit, AdamW8bit, Lion8bit, SGD8bit, RMSprop8bit = map(_eight_bit, (Adam, AdamW, Lion, SGD, RMSprop))

from .layerwise import LAMB, LARS  # noqa: E402  (they build on the Optimizer base, not on this file)

# name -> class, for the training script and the tests' tables
OPTIMIZERS = {cls.__name__.lower(): cls for cls in (SGD, Adagrad, RMSprop, Adam, AdamW, Adadelta, Adamax, NAdam,
                                                     RAdam, Lion, LAMB, LARS)}
