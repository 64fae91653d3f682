"""Optimizer classes for every rule in ``fastopt.kernels``, with ``torch.optim``'s
constructor arguments, defaults and state names. The math lives in the rule's file;
each class here only names its hyper-parameters and the state its options need.

``lr`` is a float or a schedule (any callable of the number of updates done, e.g.
``fastopt.schedules.warmup_cosine``), evaluated on the host before each step.

Every class also takes the keyword ``options`` of :class:`fastopt.Optimizer`:
``max_grad_norm`` (clip the global 2-norm of the gradients; the factor is applied inside
the update kernel) and ``nonfinite``: ``"skip"`` (default: a step whose gradients hold
inf or NaN changes nothing and counts in ``skipped_steps``), ``"raise"``
(FloatingPointError before anything is written) or ``"propagate"`` (PyTorch's behaviour;
with ``max_grad_norm=None`` too, no reduction pass at all).
"""
from .kernels import adadelta, adagrad, adam, adamax, lion, nadam, radam, rmsprop, sgd
from .optimizer import Optimizer


def _pair(betas):
    """``betas`` as a tuple (a state dict may hold a list); a non-iterable such as 0.9 is
    passed on as it is, for the group check to refuse by name."""
    try:
        return tuple(betas)
    except TypeError:
        return betas


class SGD(Optimizer):
    """SGD with momentum, dampening and Nesterov (``torch.optim.SGD``); see ``kernels/sgd.py``.
    ``l1`` adds an L1 penalty: a subgradient term, or a proximal soft threshold
    (``l1_mode="proximal"``) that sets small weights to exactly zero.

    Unlike torch's, its state dict keeps a ``step`` per param (the updates done): a
    schedule's lr and the first step's momentum buffer depend on it, so a state dict without
    it would resume the schedule from its start. ``torch.optim.SGD`` loads the extra key and
    keeps it; from a torch state dict (no count) fastopt knows only "stepped or not"."""
    rule = sgd
    start_from_grad = ("momentum_buffer",)  # momentum turned on mid-run starts as torch's: from g

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 maximize=False, l1=0.0, l1_mode="subgradient", **options):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize, l1=l1, l1_mode=l1_mode), **options)

    def _states_needed(self, group):
        return ("momentum_buffer",) if group["momentum"] != 0 else ()


class Adagrad(Optimizer):
    """Adagrad (``torch.optim.Adagrad``); see ``kernels/adagrad.py``."""
    rule = adagrad
    torch_names = {"state_sum": "sum"}
    initial = {"state_sum": "initial_accumulator_value"}

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10,
                 *, maximize=False, **options):
        if not initial_accumulator_value >= 0:
            raise ValueError(f"Invalid initial_accumulator_value value: {initial_accumulator_value}")
        super().__init__(params, dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value, eps=eps,
                                      maximize=maximize), **options)


class RMSprop(Optimizer):
    """RMSprop, optionally centered and with momentum (``torch.optim.RMSprop``); see ``kernels/rmsprop.py``."""
    rule = rmsprop

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, *,
                 maximize=False, **options):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                                      centered=centered, maximize=maximize), **options)

    def _states_needed(self, group):
        return (("square_avg",) + (("momentum_buffer",) if group["momentum"] > 0 else ())
                + (("grad_avg",) if group["centered"] else ()))


class Adam(Optimizer):
    """Adam (``torch.optim.Adam``); see ``kernels/adam.py``. ``bias_correction=False`` is
    the lecture notes' "Adam (almost)"."""
    rule = adam

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, *,
                 maximize=False, decoupled_weight_decay=False, bias_correction=True, l1=0.0, l1_mode="subgradient",
                 **options):
        super().__init__(params, dict(lr=lr, betas=_pair(betas), eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, maximize=maximize,
                                      decoupled_weight_decay=decoupled_weight_decay,
                                      bias_correction=bias_correction, l1=l1, l1_mode=l1_mode), **options)

    def _states_needed(self, group):
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())


class AdamW(Adam):
    """AdamW: Adam with decoupled weight decay (``torch.optim.AdamW``)."""
    fixed = {"decoupled_weight_decay": True}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, bias_correction=True, l1=0.0, l1_mode="subgradient", **options):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         decoupled_weight_decay=True, bias_correction=bias_correction, l1=l1, l1_mode=l1_mode,
                         **options)


class Adadelta(Optimizer):
    """Adadelta (``torch.optim.Adadelta``); see ``kernels/adadelta.py``."""
    rule = adadelta

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, *, maximize=False, **options):
        super().__init__(params, dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize), **options)


class Adamax(Optimizer):
    """Adamax (``torch.optim.Adamax``); see ``kernels/adamax.py``."""
    rule = adamax

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *, maximize=False, **options):
        super().__init__(params, dict(lr=lr, betas=_pair(betas), eps=eps, weight_decay=weight_decay,
                                      maximize=maximize), **options)


class NAdam(Optimizer):
    """NAdam with PyTorch's momentum-decay schedule (``torch.optim.NAdam``); see ``kernels/nadam.py``."""
    rule = nadam
    derived = ("mu_product",)  # torch keeps the momentum schedule's product; fastopt derives it from the step

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, momentum_decay=4e-3,
                 decoupled_weight_decay=False, *, maximize=False, **options):
        super().__init__(params, dict(lr=lr, betas=_pair(betas), eps=eps, weight_decay=weight_decay,
                                      momentum_decay=momentum_decay,
                                      decoupled_weight_decay=decoupled_weight_decay, maximize=maximize), **options)

    def _to_torch_state(self, entry, group):
        import torch
        out = super()._to_torch_state(entry, group)
        # torch keeps the running product of the momentum schedule (fastopt derives it from the
        # step) in its scalar dtype: float64 when that is the default dtype, else float32
        dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        out["mu_product"] = torch.tensor(
            nadam.mu_product(int(entry["step"]), group["betas"][0], group["momentum_decay"]), dtype=dtype)
        return out


class RAdam(Optimizer):
    """RAdam (``torch.optim.RAdam``); see ``kernels/radam.py``."""
    rule = radam

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decoupled_weight_decay=False, *, maximize=False, **options):
        super().__init__(params, dict(lr=lr, betas=_pair(betas), eps=eps, weight_decay=weight_decay,
                                      decoupled_weight_decay=decoupled_weight_decay, maximize=maximize), **options)


class Lion(Optimizer):
    """Lion (Chen et al., 2023; not in torch.optim); see ``kernels/lion.py``."""
    rule = lion

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False, **options):
        super().__init__(params, dict(lr=lr, betas=_pair(betas), weight_decay=weight_decay, maximize=maximize),
                         **options)


from .layerwise import LAMB, LARS  # noqa: E402  (they build on the Optimizer base, not on this file)

# name -> class, for the training script and the tests' tables
OPTIMIZERS = {cls.__name__.lower(): cls for cls in (SGD, Adagrad, RMSprop, Adam, AdamW, Adadelta, Adamax, NAdam,
                                                     RAdam, Lion, LAMB, LARS)}
