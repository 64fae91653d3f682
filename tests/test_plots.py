"""plot_curves writes readable PNGs; plot_accuracy draws what each curve's set can reach;
centred_mean smooths without lag; format_table aligns its columns."""
import numpy as np
import pytest

from fastopt.plots import accuracy_figure, centred_mean, format_table, plot_accuracy, plot_curves, smooth

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


def test_accuracy_is_clipped_by_the_largest_set_not_the_test_set():
    """99.93% of 1,438 training images beside a test set of 359: the train curve is drawn at
    99.93%, not at the test set's 100% mark (1 - 0.5/359 = 99.86%); a perfect score is drawn at
    the 100% edge, half an example of the larger set from 1."""
    fig = accuracy_figure({"train": [(1, 0.9), (2, 0.9993)], "test": [(1, 0.9), (2, 1.0)]}, "t",
                          {"train": 1438, "test": 359})
    ax = fig.axes[0]
    train, test = (line.get_ydata() for line in ax.lines)
    assert train[-1] == 0.9993 and test[-1] == 1 - 0.5 / 1438
    labels = {t.get_text() for t in ax.get_yticklabels()}
    assert "100%" in labels and "0%" in labels


def test_plot_accuracy_takes_one_size_or_one_per_curve(tmp_path):
    from matplotlib.image import imread
    curves = {"train": [(1, 0.5), (2, 0.99)], "test": [(1, 0.4), (2, 1.0)]}
    a = imread(plot_accuracy(tmp_path / "a.png", curves, "t", 100))
    b = imread(plot_accuracy(tmp_path / "b.png", curves, "t", {"train": 100, "test": 20}))
    assert a.shape == b.shape and np.array_equal(a, b)  # the larger set sets the edges


def test_centred_mean_has_no_lag():
    """On a straight stretch the centred mean is the curve itself, where a trailing mean runs
    above a falling one by half its window; the ends are their own means."""
    falling = np.linspace(10.0, 1.0, 50)
    np.testing.assert_allclose(centred_mean(falling, 9), falling)
    assert (smooth(falling, 9)[8:] > falling[8:] + 0.7).all()  # the trailing mean's lag
    values = np.array([4.0, 2.0, 6.0, 0.0, 8.0])
    np.testing.assert_allclose(centred_mean(values, 3), [4.0, 4.0, 8 / 3, 14 / 3, 8.0])
    np.testing.assert_allclose(centred_mean(values, 5), [4.0, 4.0, 4.0, 14 / 3, 8.0])
    np.testing.assert_array_equal(centred_mean(values, 1), values)
    assert centred_mean([], 5).shape == (0,)


def test_centred_mean_follows_an_exponential_fall_on_a_log_axis():
    """An exponentially falling loss (a straight line on the log axis): the centred mean stays
    within a few percent of it; the trailing mean of the same window runs far above."""
    loss = 2.3 * np.exp(-np.arange(200) / 20)
    ratio_centred = centred_mean(loss, 15) / loss
    ratio_trailing = smooth(loss, 15) / loss
    assert ratio_centred.max() < 1.03 and ratio_trailing.max() > 1.4
