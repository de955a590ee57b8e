"""calib_jax.plots: figures with the expected artists, no NaN drawn."""

import matplotlib
import numpy as np
import pytest

from calib_jax import metrics, plots


def toy_bins(adaptive=False):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((300, 5)) * 3).astype(np.float32)
    labels = rng.integers(0, 5, 300)
    return metrics.reliability_bins(logits, labels, adaptive=adaptive), float(
        metrics.ece(logits, labels))


@pytest.mark.parametrize("adaptive", [False, True])
def test_reliability_diagram(adaptive):
    bins, ece = toy_bins(adaptive)
    fig = plots.reliability_diagram(bins, title="toy", ece=ece)
    assert isinstance(fig, matplotlib.figure.Figure)
    ax = fig.axes[0]
    nonempty = int(np.sum(np.asarray(bins.count) > 0))
    assert len(ax.patches) == 2 * nonempty  # accuracy bars + gap bars
    heights = [p.get_height() for p in ax.patches]
    assert np.all(np.isfinite(heights))
    assert f"{100 * ece:.2f}%" in ax.get_title()
    assert len(ax.texts) == nonempty  # bin counts


def test_reliability_panel():
    bins, ece = toy_bins()
    fig = plots.reliability_panel([("a", bins, ece), ("b", bins, None), ("c", bins, ece)],
                                  columns=2)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 3
    with pytest.raises(ValueError, match="`entries`"):
        plots.reliability_panel([])


def test_confidence_histogram():
    rng = np.random.default_rng(1)
    conf = rng.uniform(0.2, 1.0, 400)
    correct = rng.random(400) < conf
    fig = plots.confidence_histogram(conf, correct, title="toy")
    ax = fig.axes[0]
    heights = np.array([p.get_height() for p in ax.patches])
    assert len(heights) == 15 and np.isclose(heights.sum(), 1.0) and np.all(np.isfinite(heights))
    assert len(ax.lines) == 2  # accuracy and mean-confidence lines
    assert "accuracy" in ax.get_legend_handles_labels()[1][0]
    # Each of these drew a figure that silently left samples out of its bars.
    for args, kwargs, match in [((conf, correct[:-1]), {}, "one length"),
                                ((conf[:0], correct[:0]), {}, "non-empty"),
                                ((conf * 3, correct), {}, r"probabilities in \[0, 1\]"),
                                ((conf, correct), {"num_bins": 0}, "`num_bins`")]:
        with pytest.raises(ValueError, match=match):
            plots.confidence_histogram(*args, **kwargs)


def test_roc_and_temperature_curves():
    from calib_jax import calibration, ood
    rng = np.random.default_rng(2)
    z_in = rng.standard_normal((100, 4)).astype(np.float32) * 4
    z_out = rng.standard_normal((80, 4)).astype(np.float32)
    curve = ood.roc_curve(z_in, z_out)
    fig = plots.roc_curves({"T = 1": (curve, float(ood.auroc(z_in, z_out)))})
    ax = fig.axes[0]
    assert len(ax.lines) == 2 and "AUROC" in ax.get_legend_handles_labels()[1][0]
    assert all(np.all(np.isfinite(line.get_ydata())) for line in ax.lines)
    with pytest.raises(ValueError, match="`curves` is empty"):
        plots.roc_curves({})
    labels = rng.integers(0, 4, 100)
    search = calibration.temperature_grid_search(z_in, labels)
    fig = plots.temperature_curves(search)
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert np.all(np.isfinite(ax.lines[0].get_ydata())) and len(ax.lines[0].get_xdata()) == 100
