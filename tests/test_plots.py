"""plot_curves writes readable PNGs; format_table aligns its columns."""
import numpy as np
import pytest

from fastopt.plots import format_table, plot_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# (curves, logy): plain values, (x, y) pairs, NaN gaps, non-positive values on a log axis
CURVES = [
    ({"sgd": [2.3, 1.1, 0.7, 0.5], "adam": [2.3, 0.6, 0.3, 0.2]}, True),
    ({"train": [(1, 0.5), (2, 0.8), (3, 0.9)], "test": [(1, 0.45), (3, 0.85)]}, False),
    ({"diverged": [1.0, 10.0, float("nan"), float("nan")], "ok": np.linspace(1, 0.1, 4)}, True),
    ({"with zero": [1.0, 0.0, -1.0, 0.5]}, True),
]


@pytest.mark.parametrize("curves,logy", CURVES, ids=["values", "pairs", "nan", "nonpositive"])
def test_plot_curves_writes_a_png(tmp_path, curves, logy):
    from matplotlib.image import imread

    out = plot_curves(tmp_path / "runs" / "loss.png", curves, "Training loss", "loss", logy=logy)
    assert out == tmp_path / "runs" / "loss.png"
    assert out.read_bytes()[:8] == PNG_MAGIC
    image = imread(out)
    assert image.shape[0] > 300 and image.shape[1] > 400
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_plot_curves_draws_the_data(tmp_path):
    """Different data give different pictures (the curves are really drawn)."""
    from matplotlib.image import imread

    a = imread(plot_curves(tmp_path / "a.png", {"x": [0, 1, 2, 3]}, "t", "y"))
    b = imread(plot_curves(tmp_path / "b.png", {"x": [3, 2, 1, 0]}, "t", "y"))
    assert a.shape == b.shape and not np.array_equal(a, b)


@pytest.mark.parametrize("curves,message", [
    ({}, "curves is empty"),
    ({"bad": [[1, 2, 3], [4, 5, 6]]}, r"curves\['bad'\] must be .* got shape \(2, 3\)"),
    ({"bad": np.zeros((2, 2, 2))}, r"curves\['bad'\]"),
])
def test_plot_curves_rejects_bad_curves(tmp_path, curves, message):
    with pytest.raises(ValueError, match=message):
        plot_curves(tmp_path / "x.png", curves, "t", "y")


ROWS = [("quadratic", "sgd", 0.026476, 0.23),
        ("rosenbrock", "momentum", 1.73e-12, float("inf")),
        ("q", "adam", 3, 12345)]


def test_format_table_aligns_columns():
    text = format_table(ROWS, ("problem", "optimizer", "final loss", "distance"))
    lines = text.split("\n")
    assert len(lines) == 2 + len(ROWS)
    assert len({len(line) for line in lines}) == 1  # every line padded to the same width
    rule = lines[1]
    assert set(rule) == {"-", " "}
    # columns: runs of dashes in the rule; each cell lies inside its column
    starts = [i for i, c in enumerate(rule) if c == "-" and (i == 0 or rule[i - 1] == " ")]
    ends = [i + 1 for i, c in enumerate(rule) if c == "-" and (i + 1 == len(rule) or rule[i + 1] == " ")]
    assert len(starts) == 4
    for line, row in zip(lines[2:], ROWS):
        cells = [line[s:e] for s, e in zip(starts, ends)]
        assert cells[0] == cells[0].lstrip() and cells[1] == cells[1].lstrip()  # text: left
        assert cells[2] == cells[2].rjust(len(cells[2])) and cells[2][-1] != " "  # numbers: right
        assert [c.strip() for c in cells[:2]] == list(row[:2])
        assert float(cells[2]) == pytest.approx(row[2], rel=1e-3)
        assert float(cells[3]) == pytest.approx(row[3], rel=1e-3)
    assert lines[0].split() == ["problem", "optimizer", "final", "loss", "distance"]


def test_format_table_mixed_column_is_left_aligned_and_floatfmt_applies():
    text = format_table([("a", 1.23456), ("bb", "n/a")], ("name", "value"), floatfmt=".2f")
    lines = text.split("\n")
    assert lines[2] == "a     1.23 " and lines[3] == "bb    n/a  "


def test_format_table_rejects_ragged_rows():
    with pytest.raises(ValueError, match=r"rows\[1\] has 1 cells but there are 2 headers"):
        format_table([(1, 2), (3,)], ("a", "b"))
