"""Spreads with bootstrap intervals, churn and crossings on small tables with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from jaxcfl import statistics as stats


def test_spread_is_the_mean_population_std():
    t = np.array([[1.0, 10.0], [3.0, 10.0], [5.0, 13.0]])  # rows k, columns seeds
    assert stats.spread(t, 0) == pytest.approx(np.mean([np.std([1, 3, 5]), np.std([10, 10, 13])]))
    assert stats.spread(t, 1) == pytest.approx(np.mean([4.5, 3.5, 4.0]))


def test_constant_table_has_a_zero_interval():
    iv = stats.bootstrap_spread(np.full((6, 5), 97.25), 0)
    assert (iv.estimate, iv.low, iv.high) == (0.0, 0.0, 0.0)


def test_row_effect_only():
    """Rows that differ by a constant: no spread across seeds at all, and the exact std across k."""
    a = np.array([95.0, 96.0, 97.0, 98.0])
    t = np.repeat(a[:, None], 5, axis=1)
    over_seeds = stats.bootstrap_spread(t, 1)
    assert (over_seeds.estimate, over_seeds.low, over_seeds.high) == (0.0, 0.0, 0.0)
    over_k = stats.bootstrap_spread(t, 0)
    assert over_k.estimate == pytest.approx(np.std(a))
    assert 0 <= over_k.low <= over_k.high <= np.ptp(a) / 2 * np.sqrt(4 / 3)


def test_two_values_bootstrap_distribution_is_known():
    """One group {0, 1}: a resample is (0,0) or (1,1) with std 0, or mixed with std 0.5, each with
    probability 1/2; times the resampling correction sqrt(2/1), the 95% interval is exactly [0, sqrt(0.5)]."""
    iv = stats.bootstrap_spread(np.array([[0.0], [1.0]]), 0, resamples=4000)
    assert iv.estimate == 0.5 and iv.low == 0.0 and iv.high == pytest.approx(np.sqrt(0.5))


def test_intervals_are_reproducible_and_shrink_with_size():
    rng = np.random.default_rng(1)
    small, large = rng.normal(0, 1, (6, 5)), rng.normal(0, 1, (60, 50))
    a, b = stats.bootstrap_spread(small, 0, seed=3), stats.bootstrap_spread(small, 0, seed=3)
    assert a == b
    wide, narrow = stats.bootstrap_spread(small, 0), stats.bootstrap_spread(large, 0)
    assert narrow.high - narrow.low < (wide.high - wide.low) / 3
    assert narrow.low < 1.0 < narrow.high  # sigma = 1
    assert narrow.low <= narrow.estimate <= narrow.high


def test_compare_spreads():
    rng = np.random.default_rng(2)
    same = rng.normal(0, 1, (30, 30))
    scaled = same * np.linspace(1, 4, 30)[None, :]  # seeds with growing scale: a wide spread across k
    assert stats.compare_spreads(stats.bootstrap_spread(same, 0), stats.bootstrap_spread(same.T, 0)) == "same size"
    k = stats.Interval(0.1, 0.05, 0.2, 0.95)
    s = stats.Interval(1.0, 0.6, 1.5, 0.95)
    assert stats.compare_spreads(k, s) == "smaller" and stats.compare_spreads(s, k) == "larger"
    assert stats.bootstrap_spread(scaled, 0).estimate > stats.bootstrap_spread(same, 0).estimate


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(2, 6), st.integers(2, 6)), elements=st.floats(-100, 100)))
def test_interval_brackets_zero_spread_and_estimate_is_the_spread(t):
    for axis in (0, 1):
        iv = stats.bootstrap_spread(t, axis, resamples=200)
        assert iv.estimate == pytest.approx(stats.spread(t, axis))
        assert 0 <= iv.low <= iv.high
        # No resample can spread more than half the largest range (times the resampling correction).
        n = t.shape[axis]
        assert iv.high <= np.ptp(t, axis=axis).max() / 2 * np.sqrt(n / (n - 1)) + 1e-9


def test_churn_and_pairwise_churn():
    assert stats.churn([1, 2, 3, 4], [1, 2, 0, 0]) == 0.5
    base = np.zeros(10, int)
    one = base.copy(); one[:2] = 1          # 2 of 10 differ from base
    two = base.copy(); two[1:6] = 2         # 5 differ from base, 5 from one (positions 0..5 except none equal)
    p = np.stack([np.stack([base, base]), np.stack([one, base]), np.stack([two, base])])  # (k=3, seeds=2, 10)
    over_k = stats.pairwise_churn(p, 0)
    # seed 0: (base, one) 0.2, (base, two) 0.5, (one, two) 0.6; seed 1: three identical pairs, 0.
    assert over_k.pairs == 6
    assert over_k.mean == pytest.approx((0.2 + 0.5 + 0.6) / 6) and over_k.min == 0 and over_k.max == pytest.approx(0.6)
    over_seeds = stats.pairwise_churn(p, 1)
    assert over_seeds.pairs == 3 and over_seeds.mean == pytest.approx((0 + 0.2 + 0.5) / 3)


def test_first_crossing_and_divergence_curve():
    curve = np.array([0, 1e-8, 5e-4, 2e-3, 1e-3, 0.5, np.nan])
    assert stats.first_crossing(curve, [1e-3, 1e-2, 1e-1, 1.0]) == {1e-3: 4, 1e-2: 6, 1e-1: 6, 1.0: 7}
    assert stats.first_crossing(np.zeros(3), [1e-3]) == {1e-3: None}
    a = np.array([[1.0, 2.0, 0.0], [1.0, -1.0, 0.0]], np.float32)
    b = np.array([[1.0, 2.0, 0.0], [3.0, 1.0, 0.0]], np.float32)
    np.testing.assert_allclose(stats.divergence_curve(a, b), [0.0, 2 * (0.5 + 1.0 + 0.0) / 3])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: stats.spread(np.zeros(3), 0), "2-D"),
        (lambda: stats.spread(np.zeros((2, 2)), 2), "axis"),
        (lambda: stats.spread([[1.0, np.nan]], 0), "NaN"),
        (lambda: stats.bootstrap_spread(np.zeros((2, 2)), 0, level=1.5), "level"),
        (lambda: stats.bootstrap_spread(np.zeros((2, 2)), 0, resamples=0), "resamples"),
        (lambda: stats.churn([1, 2], [1]), "predictions"),
        (lambda: stats.pairwise_churn(np.zeros((1, 3, 4)), 0), "at least 2"),
        (lambda: stats.divergence_curve(np.zeros((2, 3)), np.zeros((3, 2))), "shape"),
        (lambda: stats.first_crossing(np.zeros((2, 2)), [1.0]), "1-D"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_log_slope_recovers_an_exponential_and_its_error():
    x = np.arange(50) / 10.0
    fit = stats.log_slope(x, 1e-8 * np.exp(2.5 * x))
    assert fit.slope == pytest.approx(2.5) and fit.stderr == pytest.approx(0, abs=1e-9) and fit.points == 50
    noisy = 1e-8 * np.exp(2.5 * x + np.random.default_rng(0).normal(0, 0.3, x.size))
    fit = stats.log_slope(x, noisy)
    assert abs(fit.slope - 2.5) < 4 * fit.stderr and 0.015 < fit.stderr < 0.045  # sd 0.3 / sqrt(sum dx^2) = 0.029
    # Zeros and saturated points are left out; too few points give None.
    y = np.where(x < 1, 0.0, np.minimum(1e-8 * np.exp(2.5 * x), 0.5))
    capped = stats.log_slope(x, y, cap=0.1)
    assert capped.slope == pytest.approx(2.5) and capped.points == int(((y > 0) & (y < 0.1)).sum())
    assert stats.log_slope(x, np.zeros_like(x)) is None
    with pytest.raises(ValueError, match="1-D"):
        stats.log_slope(x, x[:3])
