"""Figures a reader can read: the stability map's learning-rate ticks."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from jaxcfl import plot


def _labels(lo: float, hi: float) -> list[str]:
    fig, ax = plot.pyplot().subplots()
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    plot._readable_log_ticks(ax.xaxis, np.array([lo, hi]))
    fig.canvas.draw()
    inside = [lo <= x <= hi for x in ax.xaxis.get_majorticklocs()]
    labels = [t.get_text() for t, shown in zip(ax.get_xticklabels(), inside) if shown and t.get_text()]
    plot.pyplot().close(fig)
    return labels


def test_a_short_log_axis_labels_a_few_round_values_not_every_tick():
    # Table 5's map: 3e-5 .. 3e-4, less than a decade; matplotlib alone labels 3, 4, 5, 6 x 10^-5 side by side.
    assert _labels(2.9e-5, 3.1e-4) == ["$3\\times10^{-5}$", "$5\\times10^{-5}$", "$10^{-4}$", "$2\\times10^{-4}$",
                                       "$3\\times10^{-4}$"]


@pytest.mark.parametrize("lo, hi, most", [(1e-4, 1e-1, 8), (1e-8, 1e0, 9)])
def test_a_long_log_axis_keeps_few_labels(lo, hi, most):
    labels = _labels(lo, hi)
    assert 2 <= len(labels) <= most, labels


def test_the_main_jobs_map_has_the_resolution_a_reader_expects():
    from jaxcfl.experiments import table5

    assert table5.MAP_LRS >= 24 and table5.MAP_ALPHAS >= 16
