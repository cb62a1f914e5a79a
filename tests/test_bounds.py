import numpy as np
import pytest

import jaxcfl
from jaxcfl.pde import _theory as theory
from jaxcfl._core.search import Bracket, log_bisect


def test_log_bisect_finds_synthetic_transitions():
    lo_true, hi_true = 3.7e2, 4.2e5
    calls = []

    def ok(x):
        calls.append(x.size)
        return (x > lo_true) & (x < hi_true)

    brackets = [Bracket(1e2, 1e3, ok_lo=False), Bracket(1e5, 1e6, ok_lo=True)]
    out, rounds, evals = log_bisect(ok, brackets, candidates=9, rtol=1e-4)
    assert out[0].lo <= lo_true <= out[0].hi and out[0].width <= 1e-4
    assert out[1].lo <= hi_true <= out[1].hi and out[1].width <= 1e-4
    assert rounds == len(calls) and evals == sum(calls)
    assert all(c == 18 or c == 9 for c in calls)  # both brackets in one call per round


def test_log_bisect_keeps_the_edge_of_the_ok_region():
    # ok on [1, 2] and on [5, 10]: the bracket (0.5, 10) with ok at... lo=False side.
    ok = lambda x: ((x >= 1) & (x <= 2)) | ((x >= 5) & (x <= 10))
    out, _, _ = log_bisect(ok, [Bracket(8.0, 20.0, ok_lo=True)], candidates=5, rtol=1e-3)
    assert out[0].lo <= 10.0 <= out[0].hi


@pytest.mark.parametrize("scheme, lr", [("gd", 1e-4), ("nesterov", 0.01)])
def test_empirical_bounds_match_the_windowed_theory(scheme, lr):
    img = np.asarray(jaxcfl.checkerboard(32))
    res = jaxcfl.empirical_bounds(img, 8, lr, scheme=scheme, steps=1000, alpha_range=(1e2, 1e6), initial_points=24, candidates=15)
    lo, hi = theory.windowed_alpha_bounds(img, 8, lr, scheme=scheme)
    assert res.alpha_min == pytest.approx(lo, rel=2e-3)
    assert res.alpha_max == pytest.approx(hi, rel=2e-3)
    assert res.alpha_min_bracket[1] / res.alpha_min_bracket[0] - 1 <= 1e-3
    assert res.windowed == pytest.approx((lo, hi))
    assert abs(res.gap_windowed[0]) < 2e-3 and abs(res.gap_windowed[1]) < 2e-3
    assert res.paper is not None and res.gap_paper is not None
    assert not [n for n in res.notes if "range" in n or "interval" in n]
    d = res.to_dict()
    assert d["alpha_min"] == res.alpha_min and d["scheme"] == scheme


def test_misleading_screening_falls_back_to_full_runs():
    # Screening runs of 12 steps (the fewest that classify, jaxcfl._core.classify.MIN_STEPS) cannot see the slow
    # unstable mode; the full-length check must catch it.
    img = np.asarray(jaxcfl.checkerboard(32))
    res = jaxcfl.empirical_bounds(img, 8, 1e-5, scheme="gd", steps=1500, screen_steps=12, alpha_range=(1e2, 1e6),
                                  initial_points=24, candidates=15)
    lo, hi = theory.windowed_alpha_bounds(img, 8, 1e-5, scheme="gd")
    assert any("rescanned at full length" in n for n in res.notes)
    assert res.alpha_min == pytest.approx(lo, rel=2e-3)
    assert res.alpha_max == pytest.approx(hi, rel=2e-3)


@pytest.mark.slow
def test_empirical_bounds_for_the_nonlinear_model_and_unresolved_ends():
    img = np.random.default_rng(0).standard_normal((24, 24))
    # Full-length runs from the start (screen_steps = steps): one compiled program instead of two. The
    # screening and its verification are the tests above; they do not depend on the model.
    res = jaxcfl.empirical_bounds(img, 4, 0.05, model="nonlinear", pool="mean", steps=300, alpha_range=(1e-2, 1e3),
                                  initial_points=16, candidates=7, rtol=1e-2, screen_steps=300)
    assert np.isnan(res.alpha_min) and "lower end" in " ".join(res.notes)
    assert 10 < res.alpha_max < 1e3
    assert res.paper is None and res.windowed is not None


def test_empirical_bounds_bad_input():
    img = np.asarray(jaxcfl.checkerboard(16))
    with pytest.raises(ValueError, match="alpha_range"):
        jaxcfl.empirical_bounds(img, 4, 1e-4, alpha_range=(10.0, 1.0))
    with pytest.raises(ValueError, match="lr"):
        jaxcfl.empirical_bounds(img, 4, 0.0)
    with pytest.raises(ValueError, match="scheme"):
        jaxcfl.empirical_bounds(img, 4, 1e-4, scheme="adam")


def test_empirical_bounds_runs_a_guarded_scheme_with_its_safety_and_guard(monkeypatch):
    """The set-up that reaches the runs is the one given: keywords or ``setup=``, with the guarded
    scheme's ``safety`` and ``guard`` (once dropped, so that every guarded run had the defaults)."""
    from jaxcfl.pde import _bounds

    seen = []
    real = _bounds.run_configs

    def spy(*args, setup, **kw):
        seen.append((setup, np.asarray(args[2].safety)))
        return real(*args, setup=setup, **kw)

    monkeypatch.setattr(_bounds, "run_configs", spy)
    img = np.asarray(jaxcfl.checkerboard(16))
    schedule = jaxcfl.GuardSchedule(every=3, warmup=2)
    kw = dict(steps=20, alpha_range=(1.0, 1e3), initial_points=4, candidates=1, rtol=0.5, screen_steps=20, theory=False)
    by_keywords = jaxcfl.empirical_bounds(img, 4, 1e-2, scheme="guarded_gd", safety=0.5, guard=schedule, **kw)
    setup = seen[-1][0]
    assert setup.scheme.guarded and setup.safety == 0.5 and setup.guard == schedule and setup.controller.schedule == schedule
    assert np.all(seen[-1][1] == np.float32(0.5))  # the traced margin of every run
    seen.clear()
    by_setup = jaxcfl.empirical_bounds(img, 4, 1e-2, setup=setup, **kw)
    assert all(s is setup for s, _ in seen)
    np.testing.assert_array_equal([by_setup.alpha_min, by_setup.alpha_max], [by_keywords.alpha_min, by_keywords.alpha_max])
    assert by_setup.scheme == "guarded_gd"
    with pytest.raises(TypeError, match="safety"):
        jaxcfl.empirical_bounds(img, 4, 1e-2, setup=setup, safety=0.9, **kw)
    with pytest.raises(ValueError, match="safety"):
        jaxcfl.empirical_bounds(img, 4, 1e-2, scheme="guarded_gd", safety=1.5, **kw)
    with pytest.raises(TypeError, match="guard"):
        jaxcfl.empirical_bounds(img, 4, 1e-2, scheme="guarded_gd", guard=10, **kw)
