"""A rule declared once: its math, the states it keeps and which options need them, its
hyper-parameters with defaults and checks, its host-side scalars (by name), and torch's
names where they differ. Everything else derives from the declaration: the kernels
(:mod:`._engine`), the in-place function (``adam_``), the optimizer class, the PTX report,
the CLI's flags and the tests' tables.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from . import _args, _dispatch
from ._engine import Kernels, Scalars, math_arguments

if TYPE_CHECKING:
    from numpy.typing import DTypeLike

#: ``scalars(hyper, step, lr) -> {name: value}``: a rule's host-side per-step scalars
HostScalars = Callable[[Mapping[str, Any], int, float], Any]
#: ``constants(hyper) -> {name: value}``: the scalars that depend on the hyper-parameters alone
HostConstants = Callable[[Mapping[str, Any]], Any]


class Hyper:
    """One hyper-parameter: ``name``, ``default`` (its type is the type a value must have),
    ``check(value)`` raising ValueError with torch's message, ``keyword``: keyword-only in
    torch's constructor (after ``*``), ``torch``: torch.optim's rule has it too, ``doc``,
    ``sample``: the range the tests draw it from (see :data:`SAMPLE_KINDS`; a bool needs
    none, it is toggled; an option without one and not a bool keeps its default in the tests);
    ``off``: the value that turns the option off where that is not its default (LAMB's
    ``weight_decay=0`` against its default 1e-2): the tests draw it off in some draws, as an
    option whose default is 0. Defaults: ``check=None`` (no check), ``keyword=False``,
    ``torch=True``, ``doc=""``, ``sample=None``, ``off=None`` (off is the default)."""

    __slots__ = ("check", "default", "doc", "keyword", "name", "off", "sample", "torch")
    name: str
    default: Any
    check: Callable[[Any], None] | None
    keyword: bool
    torch: bool
    doc: str
    sample: tuple | None
    off: Any

    def __init__(self, name: str, default: Any, check: Callable[[Any], None] | None = None, *,
                 keyword: bool = False, torch: bool = True, doc: str = "", sample: tuple | None = None,
                 off: Any = None) -> None:
        self.name, self.default, self.check = name, default, check
        self.keyword, self.torch, self.doc = keyword, torch, doc
        if sample is not None:
            _check_sample(name, default, sample)
        if off is not None and (sample is None or sample[0] == "choice"):
            raise TypeError(f"{name}: off={off!r} needs a range to draw the option on from, got sample={sample!r}")
        self.sample, self.off = sample, off


#: A :class:`Hyper`'s ``sample``: ``("uniform", lo, hi)`` a float uniform in [lo, hi);
#: ``("log", lo, hi)`` a float whose logarithm is uniform (0 < lo < hi); ``("choice", a, b, ...)``
#: the values in turn; for a tuple-valued option (``betas``), a tuple of those, one per element.
#: An option whose default is 0 or None (off), or that declares its ``off`` value, is drawn off
#: in some of the tests' draws, from its range in the others; the tests (``tests/cases.py``)
#: derive every draw from these declarations.
SAMPLE_KINDS = ("uniform", "log", "choice")
#: the ranges most rules share
WEIGHT_DECAY_SAMPLE = ("uniform", 1e-3, 1e-1)
BETAS_SAMPLE = (("uniform", 0.5, 0.95), ("uniform", 0.9, 0.9999))


def _check_sample(name: str, default: Any, sample: tuple) -> None:
    if isinstance(default, tuple):
        if not (isinstance(sample, tuple) and len(sample) == len(default)):
            raise TypeError(f"{name}: sample must be one range per element of {default!r}, got {sample!r}")
        for element, part in zip(default, sample):
            _check_sample(name, element, part)
        return
    kind = sample[0] if isinstance(sample, tuple) and sample else None
    if kind == "choice":
        if len(sample) < 2:
            raise TypeError(f"{name}: ('choice', ...) needs at least one value, got {sample!r}")
        return
    if kind not in ("uniform", "log") or len(sample) != 3 or not sample[1] < sample[2]:
        raise TypeError(f"{name}: sample must be ('uniform'|'log', lo, hi) with lo < hi, "
                        f"or ('choice', value, ...), got {sample!r}")
    if kind == "log" and not sample[1] > 0:
        raise TypeError(f"{name}: a log range needs lo > 0, got {sample!r}")


class State:
    """One state array the rule keeps: ``name``, and for an optional state the condition
    under which its options need it (``when(hyper) -> bool``, described by ``because``).
    ``start``: the hyper-parameter holding its initial value (default None: zero);
    ``torch_name``: torch.optim's name for it where it differs (default None)."""

    __slots__ = ("because", "name", "start", "torch_name", "when")
    name: str
    when: Callable[[Mapping[str, Any]], bool] | None
    because: str
    start: str | None
    torch_name: str | None

    def __init__(self, name: str, when: Callable[[Mapping[str, Any]], bool] | None = None, because: str = "", *,
                 start: str | None = None, torch_name: str | None = None) -> None:
        self.name, self.when, self.because = name, when, because
        self.start = start            # the hyper-parameter holding its initial value (else zero)
        self.torch_name = torch_name  # torch.optim's name for it, where it differs


class Pass:
    """A pass a per-tensor rule runs before its update (LAMB's first): ``math`` takes the
    rule's states and scalars, ``writes`` names what it stores among ``p`` and the states,
    and it returns one more value per entry of ``sums``, reduced per chunk by that entry's
    kind (``"squares"``, ``"sum"``, ...: ``_engine.REDUCTIONS``)."""

    __slots__ = ("math", "sums", "writes")

    def __init__(self, math: Callable[..., Any], *, writes: Iterable[str], sums: Iterable[str] = ()) -> None:
        self.math, self.writes, self.sums = math, tuple(writes), tuple(sums)


class Running(NamedTuple):
    """A host value carried per param group from step to step: ``advance(hyper, step,
    value) -> value`` after update number ``step``, and ``at(hyper, steps)``, its value after
    ``steps`` updates with these hyper-parameters all along (a state that does not carry it)."""
    at: Callable[[Mapping[str, Any], int], float]
    advance: Callable[[Mapping[str, Any], int, float], float]


class Rule:
    """An update rule: ``math`` (see :mod:`._engine`) and ``scalars(hyper, step, lr) -> dict``,
    the per-step scalars by the math's argument names, computed on the host; ``constants(hyper)
    -> dict``, the math's other scalars, which depend on the hyper-parameters alone (an
    optimizer packs them once per group and again only after an edit of the group).

    ``states``: :class:`State` list in the math's order; ``hyper``: :class:`Hyper` list in
    torch's order; ``check(hyper)``: checks between hyper-parameters; ``fixed``: values a
    variant fixes (AdamW's ``decoupled_weight_decay=True``); ``running``: host values carried
    from step to step, per param group, that ``scalars`` reads from its hyper-parameters
    (NAdam's ``mu_product``, torch's state entry of that name): ``{name: Running}``;
    ``start_from_grad``:
    states that start from the gradient on their first update (SGD's momentum buffer);
    ``kernels``: the compiled :class:`~._engine.Kernels` to share (a variant's), default None:
    built from ``math``. Every keyword defaults to empty / None.

    A per-tensor rule (LAMB, LARS) also declares ``per_tensor``: the math's arguments after
    its states that hold one value per tensor (the trust ratio), ``writes``: what the
    update stores among ``p`` and the states (default all), and ``first``: a :class:`Pass`
    run before the update, whose per-chunk sums give the per-tensor values (its kernels:
    ``first_kernels``)."""

    def __init__(self, name: str, math: Callable[..., Any] | None, scalars: HostScalars, *,
                 constants: HostConstants | None = None, states: Iterable[State] = (), hyper: Iterable[Hyper] = (),
                 check: Callable[[Mapping[str, Any]], None] | None = None, fixed: Mapping[str, Any] | None = None,
                 running: Mapping[str, Running] | None = None, start_from_grad: Iterable[str] = (),
                 kernels: Kernels | None = None, per_tensor: Iterable[str] = (),
                 writes: Iterable[str] | None = None, first: Pass | None = None,
                 first_kernels: Kernels | None = None) -> None:
        self.name, self.math, self.host_scalars = name, math, scalars
        self.host_constants = constants if constants is not None else _no_constants
        self.state_list = tuple(states)
        self.states = tuple(s.name for s in self.state_list)
        self.hyper = {h.name: h for h in hyper}
        self.fixed = dict(fixed or {})
        self.running, self.start_from_grad = dict(running or {}), tuple(start_from_grad)
        self._check = check
        self.defaults = {**{n: h.default for n, h in self.hyper.items()}, **self.fixed}
        self.torch_names = {s.name: s.torch_name for s in self.state_list if s.torch_name}
        self.initial = {s.name: s.start for s in self.state_list if s.start}
        self.per_tensor = tuple(per_tensor)
        if kernels is None and math is not None:
            per_step, constant = scalars(self.defaults, 1, self.defaults.get("lr")), self.host_constants(self.defaults)
            if set(per_step) & set(constant):
                both = sorted(set(per_step) & set(constant))
                raise TypeError(f"{name}: scalars {both} are both per step and constant")
            sample = {**constant, **per_step}
            names = _scalar_names(math, self.states, self.per_tensor)
            spec = Scalars(names, {n for n, v in sample.items() if isinstance(v, (bool, np.bool_))}, constant)
            spec.check(sample)
            kernels = Kernels(name, math, self.states, spec, per_tensor=self.per_tensor, writes=writes)
            if first is not None:
                if _scalar_names(first.math, self.states, ()) != names:
                    raise TypeError(f"{first.math.__name__} must take the scalars of {math.__name__}: {names}")
                first_kernels = Kernels(f"{name}_first", first.math, self.states, spec,
                                        writes=first.writes, sums=first.sums)
        self.kernels, self.first_kernels = kernels, first_kernels

    def variant(self, name: str, *, fixed: Mapping[str, Any], defaults: Mapping[str, Any],
                samples: Mapping[str, tuple] | None = None) -> Rule:
        """The same math and kernels with some values fixed and other defaults (AdamW), and
        ``samples``: other test ranges (see :class:`Hyper`; default None: the same)."""
        samples = samples or {}
        dropped = set(samples) - (set(self.hyper) - set(fixed))
        if dropped:
            raise TypeError(f"{name}: samples for {sorted(dropped)}, which the variant does not keep")
        hyper = [Hyper(h.name, defaults.get(h.name, h.default), h.check, keyword=h.keyword, torch=h.torch,
                       doc=h.doc, sample=samples.get(h.name, h.sample), off=h.off)
                 for h in self.hyper.values() if h.name not in fixed]
        return Rule(name, self.math, self.host_scalars, constants=self.host_constants, states=self.state_list,
                    hyper=hyper, check=self._check,
                    fixed={**self.fixed, **fixed}, running=self.running, start_from_grad=self.start_from_grad,
                    kernels=self.kernels, per_tensor=self.per_tensor, first_kernels=self.first_kernels)

    def check(self, hyper: Mapping[str, Any]) -> None:
        """Every hyper-parameter's value (types are the optimizer's to check), with torch's messages."""
        for name, h in self.hyper.items():
            if h.check is not None:
                h.check(hyper[name])
        if self._check is not None:
            self._check(hyper)

    def check_types(self, hyper: Mapping[str, Any]) -> None:
        """Every hyper-parameter's type, that of its default, as the optimizer classes check
        them (:func:`._args.type_problem`): a TypeError naming the first wrong one."""
        for name, h in self.hyper.items():
            problem = _args.type_problem(name, hyper[name], h.default)
            if problem:
                raise TypeError(problem)

    def states_needed(self, hyper: Mapping[str, Any]) -> tuple[str, ...]:
        """The states these hyper-parameters read and write (the others stay None)."""
        return tuple(s.name for s in self.state_list if s.when is None or s.when(hyper))

    def scalars_at(self, hyper: Mapping[str, Any], step: int, lr: float) -> dict:
        """Every scalar of the math for update number ``step`` (1-based) at ``lr``, by name."""
        return {**self.host_constants(hyper), **self.host_scalars(hyper, step, lr)}

    def kernel_constants(self, hyper: Mapping[str, Any], dtype: DTypeLike) -> tuple:
        """The constant tail of the kernel's scalar tuple (see :meth:`kernel_scalars`)."""
        return self.kernels.scalars.pack_constants(self.host_constants(hyper), dtype)

    def kernel_scalars(self, hyper: Mapping[str, Any], step: int, lr: float, dtype: DTypeLike,
                       grad_scale: float = 1.0, constants: tuple | None = None, native: bool = False) -> tuple:
        """The kernel's scalar tuple for update number ``step`` (1-based) at ``lr``, floats in
        ``dtype``, the gradient scaled by ``grad_scale`` (default 1.0) as it is read;
        ``constants``: :meth:`kernel_constants` of the same hyper-parameters, if the caller keeps
        them; ``native``: Python floats, for a compiled entry point only (``Scalars.pack``)."""
        values = self.host_scalars(hyper, step, lr)
        if constants is None:
            values = {**self.host_constants(hyper), **values}
        return self.kernels.scalars.pack(values, dtype, grad_scale, constants, native=native)

    # -- the in-place function -------------------------------------------------------------
    def signature(self) -> inspect.Signature:
        """``(param, grad, <states>, *, step, <hyper-parameters>)``: an optional state defaults to None."""
        P = inspect.Parameter
        params = [P("param", P.POSITIONAL_OR_KEYWORD), P("grad", P.POSITIONAL_OR_KEYWORD)]
        params += [P(s.name, P.POSITIONAL_OR_KEYWORD, default=None if s.when else P.empty) for s in self.state_list]
        params += [P("step", P.KEYWORD_ONLY)]
        # a state's initial value is the caller's to set in the array it passes
        params += [P(n, P.KEYWORD_ONLY, default=h.default) for n, h in self.hyper.items()
                   if n not in self.initial.values()]
        return inspect.Signature(params)

    def function(self, name: str, doc: str) -> Callable[..., None]:
        """The public in-place call (``adam_``): checks everything, then one fused pass."""
        signature = self.signature()

        def update(*args: Any, **kwargs: Any) -> None:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            hyper = {**self.defaults, **{n: a[n] for n in self.hyper if n in a}, **self.fixed}
            self.check_types(hyper)  # the math reads flags by truth: maximize="False" would maximize
            self.check(hyper)
            _args.step(a["step"])
            needed = self.states_needed(hyper)
            states = {}
            for s in self.state_list:
                if s.name in needed:
                    _args.required(s.name, a[s.name], s.because)
                states[s.name] = a[s.name] if s.name in needed else None
            _dispatch.update(self.kernels, a["param"], a["grad"], states,
                             self.scalars_at(hyper, a["step"], hyper["lr"]))

        update.__name__ = update.__qualname__ = name
        update.__signature__ = signature
        update.__doc__ = doc
        return update



def _no_constants(hyper: Mapping[str, Any]) -> dict:
    return {}


def _scalar_names(math: Callable[..., Any], states: tuple[str, ...], per_tensor: tuple[str, ...]) -> list[str]:
    """The kernel-tuple scalars of ``math``: its arguments after the states and the per-tensor ones."""
    names = math_arguments(math, states)
    if tuple(names[:len(per_tensor)]) != per_tensor:
        raise TypeError(f"{math.__name__} takes {names[:len(per_tensor)]} after its states where its rule has "
                        f"the per-tensor values {list(per_tensor)}")
    return names[len(per_tensor):]
