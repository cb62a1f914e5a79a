"""Spreads with bootstrap intervals, churn and crossings on small tables with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from jaxcfl._core import statistics as stats
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


# --- Summers & Dinneen's protocol ----------------------------------------------------------------


def test_std_interval_is_the_population_std_of_the_runs():
    values = np.array([97.0, 97.5, 96.8, 98.1, 97.2])
    iv = stats.std_interval(values, resamples=500, seed=4)
    assert iv.estimate == pytest.approx(np.std(values))  # ddof=0, as spread
    assert iv == stats.bootstrap_spread(values[None, :], 1, resamples=500, seed=4)
    assert 0 <= iv.low <= iv.estimate <= iv.high
    # Two runs {0, 1}: the interval of test_two_values_bootstrap_distribution_is_known.
    two = stats.std_interval([0.0, 1.0], resamples=4000)
    assert two.estimate == 0.5 and two.low == 0.0 and two.high == pytest.approx(np.sqrt(0.5))
    with pytest.raises(ValueError, match="values holds 1 NaN"):
        stats.std_interval([97.0, np.nan, 96.0])
    with pytest.raises(ValueError, match="values needs at least 2"):
        stats.std_interval([97.0])


def test_pairwise_correlation_known_tables():
    a = np.arange(12.0).reshape(4, 3)
    same = stats.pairwise_correlation(np.stack([a, 2 * a + 1, a]))  # positive affine copies
    assert same.pairs == 3 and same.mean == pytest.approx(1.0, abs=1e-12) and same.min == pytest.approx(1.0, abs=1e-12)
    anti = stats.pairwise_correlation(np.stack([a, -a]))
    assert anti.pairs == 1 and anti.mean == -1.0  # exactly, as identical runs give exactly 1
    # Against NumPy's corrcoef of the flattened runs.
    x = np.random.default_rng(5).normal(size=(4, 6, 3))
    r = np.corrcoef(x.reshape(4, -1))[np.triu_indices(4, 1)]
    s = stats.pairwise_correlation(x)
    assert (s.mean, s.min, s.max, s.pairs) == pytest.approx((r.mean(), r.min(), r.max(), 6))
    with pytest.raises(ValueError, match=r"run\(s\) \[1\] are constant"):
        stats.pairwise_correlation(np.stack([a, np.ones_like(a)]))
    with pytest.raises(ValueError, match="constant"):  # 0.1 three times: its rounded mean is not 0.1
        stats.pairwise_correlation(np.array([[0.1, 0.1, 0.1], [1.0, 2.0, 3.0]]))


@settings(max_examples=30, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(2, 4), st.integers(2, 5)), elements=st.floats(-1e6, 1e6)))
def test_pairwise_correlation_is_symmetric_and_bounded(x):
    if np.any(np.ptp(x, axis=1) == 0):
        with pytest.raises(ValueError, match="constant"):
            stats.pairwise_correlation(x)
        return
    s = stats.pairwise_correlation(x)
    assert -1.0 <= s.min <= s.mean <= s.max <= 1.0 and s.pairs == len(x) * (len(x) - 1) // 2
    assert stats.pairwise_correlation(x[::-1]).to_dict() == pytest.approx(s.to_dict())  # order of the runs
    assert stats.pairwise_correlation(np.stack([x[0], x[0]])).mean == 1.0


def test_pairwise_disagreement_is_the_churn_of_every_pair():
    p = np.array([[0, 0, 0, 0], [0, 0, 1, 1], [1, 0, 1, 1]])
    s = stats.pairwise_disagreement(p)  # pairs: 0.5, 0.75, 0.25
    assert s == stats.PairwiseSummary(pytest.approx(0.5), 0.25, 0.75, 3)
    assert stats.ChurnSummary is stats.PairwiseSummary
    assert isinstance(stats.pairwise_churn(p[None], 1), stats.ChurnSummary)
    with pytest.raises(ValueError, match="predictions must be integer"):
        stats.pairwise_disagreement(p.astype(float))
    with pytest.raises(ValueError, match="predictions must have shape"):
        stats.pairwise_disagreement(p[:1])


def test_ensemble_gain_of_two_runs_with_known_probabilities():
    # Two examples, two classes, labels (0, 0). Run 1: p(class 0) = (0.9, 0.4); run 2: (0.3, 0.8).
    p1, p2 = np.array([0.9, 0.4]), np.array([0.3, 0.8])
    logits = np.stack([np.stack([np.log(p), np.log(1 - p)], axis=-1) for p in (p1, p2)])  # (2, 2, 2)
    g = stats.ensemble_gain(logits, np.array([0, 0]))
    # Each run is right on one example of two; the ensemble's p(class 0) = (0.6, 0.6): right on both.
    assert g.mean_accuracy == 0.5 and g.ensemble_accuracy == 1.0 and g.accuracy_gain == 0.5
    assert g.mean_loss == pytest.approx(-(np.log(0.9) + np.log(0.4) + np.log(0.3) + np.log(0.8)) / 4)
    assert g.ensemble_loss == pytest.approx(-np.log(0.6))
    assert g.loss_gain == pytest.approx(g.mean_loss + np.log(0.6)) and g.runs == 2
    # Huge logits: the softmax is shifted, the loss stays finite (true label's probability e^-1000).
    big = stats.ensemble_gain(np.array([[[1000.0, 0.0]], [[1000.0, 0.0]]]), np.array([1]))
    assert big.ensemble_loss == pytest.approx(1000.0) and big.mean_loss == pytest.approx(1000.0)
    assert set(g.to_dict()) == {"ensemble_accuracy", "mean_accuracy", "accuracy_gain", "ensemble_loss", "mean_loss",
                                "loss_gain", "runs"}
    with pytest.raises(ValueError, match="labels must lie"):
        stats.ensemble_gain(logits, np.array([0, 2]))
    with pytest.raises(ValueError, match="labels must have shape"):
        stats.ensemble_gain(logits, np.array([0]))
    with pytest.raises(ValueError, match="outputs holds NaN"):
        stats.ensemble_gain(np.full((1, 2, 2), np.nan), np.array([0, 0]))


@settings(max_examples=30, deadline=None)
@given(arrays(np.int64, st.tuples(st.integers(1, 5), st.integers(2, 4)), elements=st.integers(-20, 20)),
       st.integers(1, 4), st.data())
def test_ensemble_of_identical_runs_gains_nothing_and_loss_gain_is_nonnegative(logits, runs, data):
    examples, classes = logits.shape
    labels = np.array(data.draw(st.lists(st.integers(0, classes - 1), min_size=examples, max_size=examples)))
    same = stats.ensemble_gain(np.repeat(logits[None].astype(float), runs, axis=0), labels)
    assert same.accuracy_gain == 0.0 and same.loss_gain == pytest.approx(0.0, abs=1e-12)
    other = data.draw(arrays(np.float64, (runs, examples, classes), elements=st.floats(-30, 30)))
    assert stats.ensemble_gain(other, labels).loss_gain >= -1e-12  # Jensen: -log of a mean <= mean of -log


def test_divergence_summary_of_a_doubling_curve():
    t = np.arange(1, 31)
    curve = 1e-7 * 2.0 ** t
    s = stats.divergence_summary(curve)
    # 1e-7 2^t passes 1e-3 at 2^14 = 16384 > 1e4, 1e-2 at 2^17 > 1e5, 1e-1 at 2^20 > 1e6.
    assert s.first_step == {1e-3: 14, 1e-2: 17, 1e-1: 20}
    assert s.growth.slope == pytest.approx(np.log(2)) and s.growth.stderr == pytest.approx(0, abs=1e-9)
    assert s.growth.points == 19  # below SATURATION = 0.1
    assert s.final == s.max == 1e-7 * 2.0 ** 30 and s.amplified
    # Amplified inside the first 10 steps (the next 10 are 1024 times larger): the first step's injection.
    assert s.first_divergence == pytest.approx(2e-7)
    assert s.accumulation_bound == pytest.approx(s.first_divergence * 30)
    d = s.to_dict()
    assert d["first_step"] == {"0.001": 14, "0.01": 17, "0.1": 20} and d["growth"]["points"] == 19
    json.dumps(d, allow_nan=False)


def test_the_injection_is_the_first_windows_median_unless_the_window_is_already_amplified():
    steps = 400
    # A transient (the rounding level settles 30 times above the first step's) and a creep: the median.
    settled = np.concatenate([[1e-10, 1e-9], np.full(steps - 2, 3e-9)]) * np.linspace(1, 5, steps)
    calm = stats.amplification(settled)
    assert calm["first_divergence"] == pytest.approx(np.median(settled[:stats.INJECTION_WINDOW]))
    assert not calm["amplified"]
    # Figure 2's lr 0.3: 4e-9 at step 1, 5e-3 at step 6, then on to order one. The median of the first
    # 10 is already amplified (about 3e-3) and would put the bound above the peak; the first step's
    # value does not.
    early = np.minimum(4e-9 * np.exp(2.8 * np.minimum(np.arange(steps), 20)), 0.05 + 0.001 * np.arange(steps))
    fast = stats.amplification(early)
    assert fast["first_divergence"] == pytest.approx(4e-9) and fast["amplified"]
    window = np.median(early[:stats.INJECTION_WINDOW])
    assert fast["peak_divergence"] < stats.BEYOND_ACCUMULATION * window * steps  # what the median would say


def test_divergence_summary_flat_linear_and_blown_up_curves():
    flat = stats.divergence_summary(np.full(200, 1e-7))  # the rounding level, never amplified
    assert not flat.amplified and flat.ratio_to_bound == pytest.approx(1 / 200)
    assert flat.first_step == {1e-3: None, 1e-2: None, 1e-1: None} and flat.growth.slope == pytest.approx(0, abs=1e-12)
    linear = stats.divergence_summary(1e-7 * np.arange(1, 201))  # coherent accumulation: within the bound
    assert not linear.amplified and linear.ratio_to_bound <= stats.BEYOND_ACCUMULATION
    zero = stats.divergence_summary(np.zeros(5))
    assert zero.growth is None and not zero.amplified and zero.to_dict()["ratio_to_bound"] is None
    blown = stats.divergence_summary(np.array([1e-7, 1e-3, np.inf, np.nan]), levels=[1e-2])
    assert blown.amplified and blown.first_step == {1e-2: 3}
    d = blown.to_dict()
    assert d["max"] is None and d["final"] is None and d["ratio_to_bound"] is None
    json.dumps(d, allow_nan=False)
    with pytest.raises(ValueError, match="curve must be >= 0"):
        stats.divergence_summary(np.array([1e-7, -1.0]))
    with pytest.raises(ValueError, match="levels"):
        stats.divergence_summary(np.ones(3), levels=[0.0])


def test_amplification_scale_is_the_steps_per_unit():
    grown = np.minimum(1e-9 * 1.1 ** np.arange(200), 0.5)
    per_step, per_four = stats.amplification(grown), stats.amplification(grown, scale=4)
    assert per_four["slope"] == pytest.approx(4 * per_step["slope"]) and per_step["slope"] == pytest.approx(np.log(1.1))
    rest = [{k: x for k, x in d.items() if "slope" not in k} for d in (per_four, per_step)]
    assert rest[0] == rest[1]
    with pytest.raises(ValueError, match="scale"):
        stats.amplification(grown, scale=0)
    with pytest.raises(ValueError, match="curve"):
        stats.amplification(np.zeros((2, 2)))


def test_verdict_sentence():
    numerics, order = stats.Interval(0.54, 0.35, 0.68, 0.95), stats.Interval(0.77, 0.47, 0.99, 0.95)
    assert stats.verdict_sentence("numerics vs order", numerics, order, "points") == (
        "numerics vs order: same size (std 0.54 [0.35, 0.68] vs 0.77 [0.47, 0.99] points)")
    small = stats.Interval(0.0123, 0.0, 0.02, 0.95)
    assert stats.verdict_sentence("one bit vs init", small, order, "") == (
        "one bit vs init: smaller (std 0.012 [0, 0.02] vs 0.77 [0.47, 0.99])")
    assert stats.compare_sources(order, small) == "larger"
    with pytest.raises(ValueError, match="reference"):
        stats.compare_sources(order, 0.5)
