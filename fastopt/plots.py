"""Plotting and table helpers for the training scripts.

    plot_curves(out_path, curves, title, ylabel)   one line per named curve -> PNG
    plot_accuracy(out_path, curves, title, n)      accuracy per epoch on a logit axis -> PNG
    centred_mean(values, window)                   smoothing without lag
    format_table(rows, headers)                    aligned plain-text table

Figures are drawn with Matplotlib's object-oriented API on its Agg canvas: no pyplot, so
no display is needed, the caller's backend is left alone and no figure stays open.
"""
from __future__ import annotations

import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _xy(name: Any, curve: Any) -> tuple[np.ndarray, np.ndarray]:
    """A curve as (x, y): a 1-D sequence of values is drawn against 0, 1, 2, ...; a
    sequence of (x, y) pairs as given."""
    values = np.asarray(curve, dtype=np.float64)
    if values.ndim == 1:
        return np.arange(len(values)), values
    if values.ndim == 2 and values.shape[1] == 2:
        return values[:, 0], values[:, 1]
    raise ValueError(f"curves[{name!r}] must be a 1-D sequence of values or a sequence of "
                     f"(x, y) pairs, got shape {values.shape}")


def plot_curves(out_path: str | os.PathLike, curves: Mapping[Any, Any], title: str, ylabel: str,
                xlabel: str = "step", logy: bool = False, dpi: int = 100) -> Path:
    """Save a PNG with one line per entry of ``curves`` (``{name: values}`` or
    ``{name: [(x, y), ...]}``), a legend, and a log y-axis if ``logy`` (default False; values
    <= 0 are then left out of the line). NaN values leave gaps. ``xlabel`` defaults to "step",
    ``dpi`` to 100. Creates the parent folder; returns the path as a ``pathlib.Path``."""
    from matplotlib.figure import Figure

    if not curves:
        raise ValueError("curves is empty: nothing to plot")
    lines = {name: _xy(name, curve) for name, curve in curves.items()}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(8, 5), dpi=dpi, layout="constrained")
    ax = fig.subplots()
    for name, (x, y) in lines.items():
        if logy:
            y = np.where(y > 0, y, np.nan)  # a log axis cannot show them
        ax.plot(x, y, lw=1.5, label=str(name))
    if logy:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
    fig.savefig(out_path)
    return out_path


def _cell(value: Any, floatfmt: str) -> tuple[str, bool]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(value), True
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return format(float(value), floatfmt), True
    return str(value), False


def format_table(rows: Iterable[Sequence[Any]], headers: Sequence[Any], floatfmt: str = ".4g") -> str:
    """Rows of cells as an aligned plain-text table: a header line, a rule of dashes, one
    line per row, columns two spaces apart. A column of numbers only is right-aligned (floats
    written with ``floatfmt``, default ".4g"), any other column left-aligned; every line has
    the same length."""
    headers = [str(h) for h in headers]
    cells = []
    for i, row in enumerate(rows):
        row = list(row)
        if len(row) != len(headers):
            raise ValueError(f"rows[{i}] has {len(row)} cells but there are {len(headers)} headers")
        cells.append([_cell(v, floatfmt) for v in row])
    widths = [max([len(h)] + [len(r[j][0]) for r in cells]) for j, h in enumerate(headers)]
    numeric = [bool(cells) and all(r[j][1] for r in cells) for j in range(len(headers))]

    def line(texts: Sequence[str], right: Sequence[bool]) -> str:
        return "  ".join(t.rjust(w) if r else t.ljust(w) for t, w, r in zip(texts, widths, right))

    out = [line(headers, numeric), "  ".join("-" * w for w in widths)]
    out += [line([t for t, _ in r], numeric) for r in cells]
    return "\n".join(out)


def smooth(values: Sequence[float] | np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` points (the first points average what there is so far)."""
    values = np.asarray(values, dtype=np.float64)
    window = max(1, min(int(window), len(values)))
    c = np.cumsum(np.insert(values, 0, 0.0))
    i = np.arange(1, len(values) + 1)
    return (c[i] - c[np.maximum(i - window, 0)]) / np.minimum(i, window)


def centred_mean(values: Sequence[float] | np.ndarray, window: int) -> np.ndarray:
    """Mean over a window of ``2 * (window // 2) + 1`` points centred on each point, narrowed
    symmetrically near the ends (the first and last points are their own mean). A trailing
    mean lags: on a fast-falling loss it runs above every point; a centred one has no lag and
    follows a straight stretch exactly."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    half = max(0, int(window) // 2)
    i = np.arange(n)
    h = np.minimum(half, np.minimum(i, n - 1 - i))
    c = np.cumsum(np.insert(values, 0, 0.0))
    return (c[i + h + 1] - c[i - h]) / (2 * h + 1)


ACCURACY_TICKS = (0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999)


def plot_accuracy(out_path: str | os.PathLike, curves: Mapping[Any, Any], title: str,
                  n_examples: int | Mapping[Any, int], ylabel: str = "accuracy") -> Path:
    """Accuracy per epoch (``{name: [(epoch, accuracy), ...]}``) on a logit axis, which gives
    90 -> 99% as much room as 50 -> 90%: the last percent, where the runs differ, stays
    readable next to the first epochs. 0% and 100% (which the axis cannot show) are drawn at
    half an example from them. ``n_examples``: the number of examples behind the curves, or
    one per curve (``{name: n}``); the edges sit half an example of the largest set from 0 and
    1, so no accuracy that set can reach (1 - 1/n at best) is drawn at 100%. ``ylabel``
    defaults to "accuracy". Returns the path as a ``pathlib.Path``."""
    fig = accuracy_figure(curves, title, n_examples, ylabel)
    out_path = Path(out_path)
    fig.savefig(out_path)
    return out_path


def accuracy_figure(curves: Mapping[Any, Any], title: str, n_examples: int | Mapping[Any, int],
                    ylabel: str = "accuracy") -> Figure:
    """The figure of :func:`plot_accuracy` (a Matplotlib Figure, not saved)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    sizes = n_examples.values() if isinstance(n_examples, dict) else [n_examples]
    edge = 0.5 / max(sizes)
    fig = Figure(figsize=(8, 5), dpi=100, layout="constrained")
    ax = fig.subplots()
    for name, points in curves.items():
        x, y = np.asarray(points, dtype=np.float64).reshape(-1, 2).T
        ax.plot(x, np.clip(y, edge, 1 - edge), lw=1.5, marker="o", ms=3, label=str(name))
    ax.set_yscale("logit")
    # the edges are labelled 0% and 100%; ticks too close to them would overprint those labels
    ticks = [edge] + [t for t in ACCURACY_TICKS if 2 * edge < t < 1 - 2 * edge] + [1 - edge]
    names = {edge: "0%", 1 - edge: "100%"}
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(
        lambda v, _: names.get(v) or f"{100 * v:.2f}".rstrip("0").rstrip(".") + "%"))
    ax.set(title=title, xlabel="epoch", ylabel=f"{ylabel} (logit scale)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig
