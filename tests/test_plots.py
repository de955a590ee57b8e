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
