"""Gradient checking (the lecture notes: always use the analytic gradient, and check it
against the numerical one).

For every element theta_k of every input, the central difference in float64

    n_k = (f(theta + h e_k) - f(theta - h e_k)) / (2 h)          (error O(h^2), not O(h))

is compared with the analytic a_k by the relative error

    rel_k = |a_k - n_k| / max(|a_k|, |n_k|, tiny)

An element fails when rel_k > rtol AND |a_k - n_k| > atol: the absolute floor keeps elements
whose true gradient is ~0 (where the relative error is rounding noise over rounding noise)
from failing. The defaults (h = 1e-6, rtol = 1e-5, atol = 1e-7) follow from the error of
the difference itself: truncation ~ h^2 |f'''| ~ 1e-12, rounding ~ 1e-16 |f| / h ~ 1e-9 for
|f| ~ 10; a wrong gradient is off by a fraction of its own size, far above both.
The report names the worst element: its input, index, analytic and numeric value.
"""
# no `from __future__ import annotations`: it would turn GradcheckReport's field types into strings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .nn._array import array_module, to_numpy

if TYPE_CHECKING:
    from .nn.module import Layer

TINY = 1e-300


@dataclass
class GradcheckReport:
    """What :func:`gradcheck` found. ``str(report)`` is the human-readable summary."""

    passed: bool
    max_rel_error: float      # over all elements
    worst_input: str          # where the worst element is (the failing one, if any fails)
    worst_index: tuple
    analytic: float           # at the worst element
    numeric: float
    n_failed: int
    n_checked: int
    eps: float
    rtol: float
    atol: float
    per_input: dict = field(default_factory=dict)  # name -> max relative error

    @property
    def abs_error(self) -> float:
        """|analytic - numeric| at the worst element."""
        return abs(self.analytic - self.numeric)

    def __str__(self) -> str:
        head = "gradcheck passed" if self.passed else f"gradcheck FAILED: {self.n_failed} of {self.n_checked} elements"
        worst = (f"worst element {self.worst_input}{list(self.worst_index)}: analytic {self.analytic:.10g}, "
                 f"numeric {self.numeric:.10g}, |diff| {self.abs_error:.3g}")
        per = ", ".join(f"{k} {v:.2e}" for k, v in self.per_input.items())
        return (f"{head} (max relative error {self.max_rel_error:.3e}; rtol={self.rtol:g}, atol={self.atol:g}, "
                f"eps={self.eps:g})\n  {worst}\n  max relative error per input: {per}")


def _as_list(arrays: Any, what: str) -> list[np.ndarray]:
    if isinstance(arrays, (list, tuple)):
        return list(arrays)
    if hasattr(arrays, "shape"):
        return [arrays]
    raise TypeError(f"{what} must be an array or a list of arrays, got {type(arrays).__name__}")


def gradcheck(fn: Callable[..., Any], inputs: np.ndarray | Sequence[np.ndarray],
              grads: np.ndarray | Sequence[np.ndarray] | Callable[..., Any], *, eps: float = 1e-6,
              rtol: float = 1e-5, atol: float = 1e-7, names: Sequence[str] | None = None,
              raise_on_fail: bool = True) -> GradcheckReport:
    """Check ``grads`` (the analytic d fn / d inputs) against central differences.

    fn: ``fn(*inputs) -> scalar`` (a float or a 0-d array). It may also read the inputs through
        a closure (layer parameters): each input is perturbed IN PLACE, one element at a time,
        and restored exactly afterwards.
    inputs: a float64 array or a list of them (NumPy or CuPy, C-contiguous, writeable).
    grads: the analytic gradients, an array or a list matching ``inputs`` in shape, or a
        callable ``grads(*inputs)`` returning them (called once, before any perturbation).
    eps: the step h (default 1e-6). rtol, atol: the per-element tolerances described in the
        module docstring (defaults 1e-5, 1e-7).
    names: a name per input for the report (default "inputs[i]").

    Returns a :class:`GradcheckReport`; with ``raise_on_fail`` (default) a failing check raises
    ``AssertionError`` carrying the report instead. 2 * (total elements) calls of fn.
    """
    inputs = _as_list(inputs, "inputs")
    if not inputs:
        raise ValueError("inputs is empty: nothing to check")
    if callable(grads):
        grads = grads(*inputs)
    grads = _as_list(grads, "grads")
    if len(grads) != len(inputs):
        raise ValueError(f"grads has {len(grads)} arrays for {len(inputs)} inputs")
    names = list(names) if names is not None else [f"inputs[{i}]" for i in range(len(inputs))]
    if len(names) != len(inputs):
        raise ValueError(f"names has {len(names)} entries for {len(inputs)} inputs")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    for name, x, g in zip(names, inputs, grads):
        if x.dtype != np.float64:
            raise TypeError(f"{name} has dtype {x.dtype}; gradcheck needs float64 (a central difference in "
                            "float32 keeps only ~3 significant digits): build the model with dtype=np.float64")
        if g.shape != x.shape:
            raise ValueError(f"the gradient for {name} has shape {g.shape}, the input has {x.shape}")
        if not x.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous (it is perturbed through a flat view)")
    analytic = [to_numpy(g).astype(np.float64).ravel() for g in grads]  # copied before fn runs again
    numeric = [_central_differences(fn, inputs, x, eps) for x in inputs]
    return _report(names, inputs, analytic, numeric, eps, rtol, atol, raise_on_fail)


def _central_differences(fn, inputs, x, eps):
    flat = x.reshape(-1)  # a view: perturbing it perturbs x
    out = np.empty(flat.size)
    for k in range(flat.size):
        saved = flat[k].copy()
        flat[k] = saved + eps
        up = float(fn(*inputs))
        flat[k] = saved - eps
        down = float(fn(*inputs))
        flat[k] = saved
        out[k] = (up - down) / (2 * eps)
    return out


def _report(names, inputs, analytic, numeric, eps, rtol, atol, raise_on_fail):
    a, n = np.concatenate(analytic), np.concatenate(numeric)
    with np.errstate(invalid="ignore"):  # inf - inf: NaN, failed below
        diff = np.abs(a - n)
        rel = diff / np.maximum(np.maximum(np.abs(a), np.abs(n)), TINY)
    # an inf or NaN on either side fails: NaN > rtol is False, and inf - inf is NaN
    failing = ((rel > rtol) & (diff > atol)) | ~np.isfinite(a) | ~np.isfinite(n)
    # the worst element: the largest relative error among those over the absolute floor,
    # since below it the relative error only measures rounding
    candidates = failing if failing.any() else (diff > atol) if (diff > atol).any() else np.ones_like(failing)
    k = int(np.flatnonzero(candidates)[np.argmax(rel[candidates])]) if a.size else 0
    starts = np.cumsum([0] + [x.size for x in inputs])
    which = int(np.searchsorted(starts, k, side="right") - 1)
    report = GradcheckReport(
        passed=not failing.any(), max_rel_error=float(np.nan_to_num(rel, nan=np.inf).max(initial=0.0)),
        worst_input=names[which],
        worst_index=tuple(int(i) for i in np.unravel_index(k - starts[which], inputs[which].shape)),
        analytic=float(a[k]) if a.size else 0.0, numeric=float(n[k]) if a.size else 0.0,
        n_failed=int(failing.sum()), n_checked=int(a.size), eps=eps, rtol=rtol, atol=atol,
        per_input={name: float(rel[s:e].max(initial=0.0)) for name, s, e in zip(names, starts[:-1], starts[1:])})
    if raise_on_fail and not report.passed:
        raise AssertionError(str(report))
    return report


def check_layer(layer: "Layer", x: np.ndarray, *, seed: int = 0, eps: float = 1e-6, rtol: float = 1e-5,
                atol: float = 1e-7, params: bool = True, raise_on_fail: bool = True) -> GradcheckReport:
    """Gradient check of a built layer (or a whole ``Sequential``) at input ``x`` (float64).

    The scalar is a random projection of the output, L = sum(layer(x) * r) with r ~ N(0, 1)
    (seeded by ``seed``, default 0), so dL/dout = r and every output element matters. Checks
    dL/dx and, with ``params`` (default True), dL/d(every parameter in ``layer.params``),
    which ``backward`` wrote into ``layer.grads``. ``layer.reseed(seed)`` runs before every
    forward, so a Dropout mask is the same in each evaluation. Returns the :class:`GradcheckReport` (or raises). The
    layer's buffers (BatchNorm's running statistics, which each training-mode forward
    updates) are put back as they were. ``eps``, ``rtol``, ``atol`` and ``raise_on_fail``
    (defaults 1e-6, 1e-5, 1e-7, True) are :func:`gradcheck`'s.
    """
    xp = array_module(x)
    x = xp.array(x, dtype=x.dtype, copy=True)  # perturbed in place below; keep the caller's
    saved = {name: b.copy() for name, b in layer.buffers().items()}
    try:
        layer.reseed(seed)
        out = layer.forward(x)
        r = xp.asarray(np.random.default_rng(seed).standard_normal(out.shape), dtype=out.dtype)
        dx = layer.backward(r)
        named = list(layer.params.items()) if params else []
        analytic = [dx] + [layer.grads[name].copy() for name, _ in named]

        def projected(*_):
            layer.reseed(seed)
            return (layer.forward(x) * r).sum()

        return gradcheck(projected, [x] + [p for _, p in named], analytic, eps=eps, rtol=rtol, atol=atol,
                         names=["x"] + [name for name, _ in named], raise_on_fail=raise_on_fail)
    finally:
        live = layer.buffers()
        for name, b in saved.items():
            live[name][...] = b
