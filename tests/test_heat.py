"""Tests for jaxcfl.pde._heat: the 1-D heat equation of Section 3 of Sun et al. (2024)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcfl.pde import _heat as heat
N = 31
EPS32 = float(np.finfo(np.float32).eps)
EPS64 = float(np.finfo(np.float64).eps)


# ---------------------------------------------------------------------------
# an independent NumPy reference


def np_tent(dtype) -> np.ndarray:
    """The paper's tent for 31 nodes, written out from Section 3."""
    return np.array([i / 10 if i < 15 else (30 - i) / 10 for i in range(N)]).astype(dtype)


def np_euler(u0: np.ndarray, dt: float, steps: int, dx: float = 1.0) -> np.ndarray:
    """Plain forward-Euler loop, in the dtype of ``u0``, ends held fixed."""
    dtype = u0.dtype.type
    r = dtype(dt) / (dtype(dx) * dtype(dx))
    u = u0.copy()
    for _ in range(steps):
        new = u.copy()
        for i in range(1, len(u) - 1):
            new[i] = u[i] + r * ((u[i + 1] - 2 * u[i]) + u[i - 1])
        u = new
    return u


def iteration_matrix_radius(dt: float, n: int = N, dx: float = 1.0) -> float:
    """Spectral radius of the forward-Euler matrix on the n - 2 interior nodes."""
    m = n - 2
    lap = -2 * np.eye(m) + np.eye(m, k=1) + np.eye(m, k=-1)
    a = np.eye(m) + dt / dx**2 * lap
    return float(np.max(np.abs(np.linalg.eigvalsh(a))))


# ---------------------------------------------------------------------------
# tent, step, solve


def test_tent_matches_paper():
    np.testing.assert_array_equal(np.asarray(heat.tent()), np_tent(np.float32))
    assert heat.tent().dtype == jnp.float32
    assert heat.tent().shape == (N,)
    assert float(heat.tent()[15]) == pytest.approx(1.5)
    # general n: i/10 for i < n//2, (n-1-i)/10 otherwise
    np.testing.assert_allclose(np.asarray(heat.tent(6)), [0.0, 0.1, 0.2, 0.2, 0.1, 0.0], rtol=1e-6)


def test_tent_dtype_x64():
    with jax.enable_x64(True):
        u = heat.tent()
        assert u.dtype == jnp.float64
        np.testing.assert_array_equal(np.asarray(u), np_tent(np.float64))
        assert heat.tent(dtype=jnp.float32).dtype == jnp.float32


@pytest.mark.parametrize("dt", [0.4, 0.8])
def test_step_matches_numpy_and_jits(dt):
    u0 = np_tent(np.float32)
    got = heat.step(u0, dt)
    np.testing.assert_allclose(np.asarray(got), np_euler(u0, dt, 1), rtol=0, atol=2 * EPS32 * 1.5)
    jitted = jax.jit(heat.step)(jnp.asarray(u0), jnp.float32(dt))
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(got), rtol=0, atol=2 * EPS32 * 1.5)


def test_step_batched_last_axis():
    u = jnp.stack([heat.tent(), 2 * heat.tent()])
    got = heat.step(u, 0.4)
    np.testing.assert_allclose(np.asarray(got[1]), 2 * np.asarray(heat.step(heat.tent(), 0.4)), rtol=1e-6)


@pytest.mark.parametrize(("dt", "t_end", "steps"), [(0.4, 0.8, 2), (0.4, 2.4, 6), (0.4, 4.0, 10), (0.8, 0.8, 1), (0.8, 2.4, 3), (0.8, 4.0, 5)])
def test_solve_float32_matches_numpy(dt, t_end, steps):
    assert round(t_end / dt) == steps
    ref = np_euler(np_tent(np.float32), dt, steps)
    got = np.asarray(heat.solve(dt, t_end))
    assert got.dtype == np.float32
    # rounding level, allowing for the (unstable) amplification of dt = 0.8
    growth = max(1.0, heat.von_neumann_factor(dt)) ** steps
    np.testing.assert_allclose(got, ref, rtol=0, atol=4 * steps * growth * EPS32 * 1.5)


@pytest.mark.parametrize(("dt", "t_end", "steps"), [(0.4, 4.0, 10), (0.8, 2.4, 3), (0.8, 4.0, 5)])
def test_solve_float64_matches_numpy(dt, t_end, steps):
    with jax.enable_x64(True):
        got = heat.solve(dt, t_end)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), np_euler(np_tent(np.float64), dt, steps), rtol=1e-12, atol=1e-12)


def test_solve_step_counts():
    """round(t_end / dt) steps: 2.4 / 0.8 -> 3 and 4.0 / 0.4 -> 10."""
    u0 = np_tent(np.float32)
    for dt, t_end, k in [(0.8, 2.4, 3), (0.4, 4.0, 10)]:
        got = np.asarray(heat.solve(dt, t_end))
        ref = np_euler(u0, dt, k)
        tol = 1e-5
        np.testing.assert_allclose(got, ref, atol=tol)
        # and not one step fewer or more
        assert np.max(np.abs(got - np_euler(u0, dt, k - 1))) > 10 * tol
        assert np.max(np.abs(got - np_euler(u0, dt, k + 1))) > 10 * tol
    np.testing.assert_array_equal(np.asarray(heat.solve(0.4, 0.0)), u0)


def test_ends_stay_fixed():
    for dt in (0.4, 0.8):
        u = heat.solve(dt, 4.0)
        assert float(u[0]) == 0.0 and float(u[-1]) == 0.0
    u0 = jnp.linspace(1.0, 3.0, N) + heat.tent()  # nonzero ends
    u = heat.solve(0.8, 8.0, u0=u0)
    assert float(u[0]) == float(u0[0]) and float(u[-1]) == float(u0[-1])


def test_stable_bounded_unstable_grows():
    """Figure 1 of Section 3: dt = 0.4 is damped, dt = 0.8 blows up."""
    u0_max = float(jnp.max(heat.tent()))
    stable = heat.snapshots(0.4, times=tuple(0.4 * k for k in range(1, 51)))
    assert float(jnp.max(jnp.abs(stable))) <= u0_max * (1 + 4 * EPS32)
    unstable = heat.solve(0.8, 4.0)  # 5 steps
    assert float(jnp.max(jnp.abs(unstable))) > u0_max


def test_snapshots_rows_equal_solve():
    for dt in (0.4, 0.8):
        snaps = heat.snapshots(dt)
        assert snaps.shape == (3, N)
        for row, t in zip(snaps, heat.PAPER_TIMES):
            np.testing.assert_allclose(np.asarray(row), np.asarray(heat.solve(dt, t)), rtol=0, atol=EPS32)
    # any order, and t = 0 gives u0
    snaps = heat.snapshots(0.8, times=(4.0, 0.0, 0.8))
    np.testing.assert_array_equal(np.asarray(snaps[1]), np.asarray(heat.tent()))
    np.testing.assert_allclose(np.asarray(snaps[0]), np.asarray(heat.solve(0.8, 4.0)), atol=EPS32)


@settings(max_examples=25, deadline=None)
@given(
    dt=st.floats(0.01, 0.5),
    u0=st.lists(st.floats(-1.0, 1.0, width=32), min_size=N, max_size=N),
)
def test_stable_maximum_principle(dt, u0):
    """For dt <= 1/2 each step is a convex combination: max |u| cannot grow."""
    u0 = np.asarray(u0, dtype=np.float32)
    got = np.asarray(heat.solve(dt, 8 * dt, u0=u0))  # always 8 steps: one compile
    assert np.max(np.abs(got)) <= np.max(np.abs(u0)) * (1 + 8 * EPS32) + 1e-30
    np.testing.assert_allclose(got, np_euler(u0, dt, 8), rtol=0, atol=32 * EPS32)


# ---------------------------------------------------------------------------
# dt is traced: no retrace when only dt changes


def test_dt_change_does_not_recompile():
    # round(1.0 / 0.3) == round(1.0 / 0.35) == 3
    a = heat.solve(0.3, 1.0)
    size = heat._run._cache_size()
    b = heat.solve(0.35, 1.0)
    assert heat._run._cache_size() == size
    assert not np.array_equal(np.asarray(a), np.asarray(b))  # dt reached the loop
    heat.solve(0.3, 0.3 * 23)  # 23 steps (used nowhere else): a new static step count compiles
    assert heat._run._cache_size() == size + 1

    snaps = heat.snapshots(0.3, times=(0.3, 0.9))
    size = heat._run_record._cache_size()
    heat.snapshots(0.35, times=(0.35, 1.0))
    assert heat._run_record._cache_size() == size
    assert snaps.shape == (2, N)


def test_dt_change_trace_counter(monkeypatch):
    """A Python-side counter in the step body runs once per trace only."""
    traces = []
    real_step = heat._step

    def counting_step(u, r):
        traces.append(1)
        return real_step(u, r)

    monkeypatch.setattr(heat, "_step", counting_step)
    u0 = jnp.arange(17, dtype=jnp.float32)  # a shape no other test uses: must trace
    heat.solve(0.3, 2.1, u0=u0)  # 7 steps
    assert len(traces) == 1
    heat.solve(0.31, 2.1, u0=u0)  # round(6.77) = 7 steps
    heat.solve(0.29, 2.1, u0=u0)  # round(7.24) = 7 steps
    assert len(traces) == 1


# ---------------------------------------------------------------------------
# von Neumann factor


@pytest.mark.parametrize("dt", [0.1, 0.25, 0.4, 0.49, 0.5, 0.51, 0.8, 1.3])
def test_von_neumann_matches_iteration_matrix(dt):
    assert heat.von_neumann_factor(dt) == pytest.approx(iteration_matrix_radius(dt), rel=1e-12)
    assert heat.von_neumann_factor(dt, dx=2.0, n=11) == pytest.approx(iteration_matrix_radius(dt, n=11, dx=2.0), rel=1e-12)


def test_von_neumann_paper_values():
    assert heat.von_neumann_factor(0.4) == pytest.approx(0.99562, abs=1e-5)  # slow j = 1 mode
    assert heat.von_neumann_factor(0.8) == pytest.approx(2.19124, abs=1e-5)  # j = 29 mode


def test_von_neumann_continuous_and_cfl_boundary():
    theta = np.linspace(0.0, np.pi, 100001)
    for dt in (0.1, 0.4, 0.5, 0.6, 0.8):
        brute = np.max(np.abs(1 - 4 * dt * np.sin(theta / 2) ** 2))
        assert heat.von_neumann_factor(dt, n=None) == pytest.approx(brute, rel=1e-12)
        assert heat.von_neumann_factor(dt, n=None) == pytest.approx(max(1.0, abs(1 - 4 * dt)))
    # dt = dx^2/2 is the boundary: continuous bound is 1 (the theta = 0 mode) below it, > 1 above
    assert heat.von_neumann_factor(0.499, n=None) <= 1.0
    assert heat.von_neumann_factor(0.5, n=None) == 1.0
    assert heat.von_neumann_factor(0.501, n=None) > 1.0
    # the 31-node grid carries no theta = 0 mode: strictly < 1 just below, > 1 just above
    assert heat.von_neumann_factor(0.49) < 1.0
    assert heat.von_neumann_factor(0.51) > 1.0
    assert heat.von_neumann_factor(0.5, dx=1.0, n=None) == heat.von_neumann_factor(2.0, dx=2.0, n=None)


# ---------------------------------------------------------------------------
# last-bit perturbations


def test_perturbation_unstable_float32():
    g = heat.perturbation_growth(0.8, 30)
    assert isinstance(g, heat.PerturbationGrowth)
    assert g.delta.shape == (31,)
    assert float(g.delta[0]) == float(np.spacing(np.float32(1.5)))  # one ulp at the peak
    assert g.von_neumann == pytest.approx(2.1912, abs=1e-4)
    assert abs(g.factor / g.von_neumann - 1) < 0.05
    assert float(g.delta[-1]) > 1e-3


def test_perturbation_stable_float32():
    g = heat.perturbation_growth(0.4, 30)
    bound = 4 * EPS32 * float(jnp.max(heat.tent()))
    assert float(g.delta[-1]) <= bound
    assert float(jnp.max(g.delta)) <= bound
    assert math.isnan(g.factor) or g.factor <= 1.05


def test_perturbation_float64():
    with jax.enable_x64(True):
        bad = heat.perturbation_growth(0.8, 60)
        good = heat.perturbation_growth(0.4, 30)
        assert bad.delta.dtype == jnp.float64
    assert float(bad.delta[0]) == float(np.spacing(1.5))
    assert abs(bad.factor / bad.von_neumann - 1) < 0.05
    assert float(bad.delta[-1]) > 1e-3
    assert np.max(np.asarray(good.delta)) <= 4 * EPS64 * 1.5
    assert math.isnan(good.factor) or good.factor <= 1.05


def test_perturbation_index_and_factor_definition():
    g = heat.perturbation_growth(0.8, 10, index=1)
    d = np.asarray(g.delta, dtype=np.float64)
    assert d[0] == float(np.spacing(np.float32(0.1)))
    ratios = d[6:] / d[5:-1]  # last half of 10 steps
    assert g.factor == pytest.approx(float(np.exp(np.mean(np.log(ratios)))), rel=1e-12)
    assert heat.perturbation_growth(0.4, 3, n=5).delta.shape == (4,)


# ---------------------------------------------------------------------------
# input checks


@pytest.mark.parametrize("dt", [0.0, -0.4, math.nan, math.inf])
def test_bad_dt(dt):
    with pytest.raises(ValueError, match="dt"):
        heat.solve(dt, 1.0)
    with pytest.raises(ValueError, match="dt"):
        heat.step(heat.tent(), dt)
    with pytest.raises(ValueError, match="dt"):
        heat.snapshots(dt)
    with pytest.raises(ValueError, match="dt"):
        heat.von_neumann_factor(dt)
    with pytest.raises(ValueError, match="dt"):
        heat.perturbation_growth(dt, 5)


@pytest.mark.parametrize("t_end", [-1.0, math.nan, math.inf])
def test_bad_t_end(t_end):
    with pytest.raises(ValueError, match="t_end"):
        heat.solve(0.4, t_end)


def test_bad_steps():
    with pytest.raises(ValueError, match="steps"):
        heat.perturbation_growth(0.8, 0)
    with pytest.raises(TypeError, match="steps"):
        heat.perturbation_growth(0.8, 2.5)
    with pytest.raises(TypeError, match="steps"):
        heat.perturbation_growth(0.8, True)


def test_bad_n_index_and_others():
    for call in (
        lambda: heat.tent(2),
        lambda: heat.solve(0.4, 1.0, n=2),
        lambda: heat.von_neumann_factor(0.4, n=2),
        lambda: heat.perturbation_growth(0.4, 3, n=1),
    ):
        with pytest.raises(ValueError, match=r"^n must"):
            call()
    for index in (0, 30):
        with pytest.raises(ValueError, match="index"):
            heat.perturbation_growth(0.4, 3, index=index)
    with pytest.raises(ValueError, match="dx"):
        heat.solve(0.4, 1.0, dx=0.0)
    with pytest.raises(ValueError, match="u0"):
        heat.solve(0.4, 1.0, u0=jnp.zeros(2))
    with pytest.raises(ValueError, match="times"):
        heat.snapshots(0.4, times=(0.8, -1.0))
    with pytest.raises(ValueError, match="times"):
        heat.snapshots(0.4, times=())
