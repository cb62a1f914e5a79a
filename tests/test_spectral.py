"""Lanczos (jaxcfl._core.spectral): what the residual bound covers, the rounding floor, and the work per
iteration (a restart only on breakdown, no copy of the basis). Accuracy against NumPy and the
breakdown on low-rank operators are in tests/test_theory.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.extend.core import jaxprs_in_params
from jax.tree_util import Partial

from jaxcfl._core import spectral as spectral
from jaxcfl._core.spectral import lanczos_extremes


def _operators(n: int) -> dict[str, np.ndarray]:
    """Symmetric matrices with known spectra: isolated extremes (a converged Ritz value whose
    ``s_m`` underflows in float32), a rank-one operator (breakdown), and a generic dense one."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    isolated = np.concatenate([[-50.0], rng.uniform(-1, 1, n - 2), [1000.0]])
    u = rng.standard_normal(n)
    g = rng.standard_normal((n, n))
    return {"isolated": (q * isolated) @ q.T, "rank_one": np.outer(u, u), "dense": (g + g.T) / 2}


@pytest.mark.parametrize("kind", ["isolated", "rank_one", "dense"])
@pytest.mark.parametrize("full", [True, False], ids=["iterations=n", "iterations<n"])
@pytest.mark.slow_in_float64
def test_eigenvalues_lie_within_residual_plus_rounding_floor(kind, full, dtype):
    n = 120
    mat = _operators(n)[kind]
    exact = np.linalg.eigvalsh(mat)
    ext = lanczos_extremes(Partial(jnp.dot, jnp.asarray(mat, dtype)),
                           jnp.asarray(np.random.default_rng(1).standard_normal(n), dtype),
                           iterations=n if full else 60)
    eps = float(jnp.finfo(dtype).eps)
    norm = float(np.abs(exact).max())
    assert 0 < ext.rounding_floor == pytest.approx(spectral.BREAKDOWN * eps * norm, rel=1.0)
    assert abs(ext.maximum - exact[-1]) <= ext.residual_max + ext.rounding_floor
    if kind != "dense" or full:  # the dense operator's smallest eigenvalue is not converged after 60
        assert abs(ext.minimum - exact[0]) <= ext.residual_min + ext.rounding_floor
    if full:
        # The whole space: the Krylov recurrence is exact, the bound is 0, and only rounding is left.
        assert ext.residual_min == ext.residual_max == 0.0
        assert abs(ext.maximum - exact[-1]) <= 16 * eps * norm  # measured: at most about 5.5 (docs/spectral.md)


def test_residual_bound_is_zero_in_float32_though_rounding_is_not():
    """Item 8's observation: an isolated, converged extreme has ``s_m`` below float32's range, so the
    bound comes back as exactly 0; the Ritz value is off by rounding, which ``rounding_floor`` covers."""
    n = 2000
    eig = np.concatenate([[-50.0], np.linspace(0, 1, n - 2), [100.0]])
    ext = lanczos_extremes(Partial(jnp.multiply, jnp.asarray(eig, jnp.float32)),
                           jnp.asarray(np.random.default_rng(0).standard_normal(n), jnp.float32), iterations=128)
    assert ext.residual_max == 0.0 and ext.residual_min == 0.0
    assert abs(ext.maximum - 100.0) > 0 or abs(ext.minimum + 50.0) > 0
    assert abs(ext.maximum - 100.0) <= ext.rounding_floor and abs(ext.minimum + 50.0) <= ext.rounding_floor


def _equations(jaxpr, inside=()) -> list[tuple[str, tuple[str, ...], list[tuple[int, ...]]]]:
    """Every equation of a jaxpr: its primitive, the primitives it is nested in, its operands' shapes."""
    found = []
    for eqn in jaxpr.eqns:
        found.append((eqn.primitive.name, inside, [getattr(x.aval, "shape", ()) for x in eqn.invars]))
        for sub in jaxprs_in_params(eqn.params):
            found += _equations(sub, inside + (eqn.primitive.name,))
    return found


def test_restart_direction_is_drawn_only_on_breakdown():
    """Random numbers are drawn and orthogonalised inside the breakdown branch (``cond``) only: the
    loop's unconditional work is the mat-vec and the re-orthogonalisation."""
    n, m = 50, 8
    matvec = Partial(jnp.multiply, jnp.arange(n, dtype=jnp.float32))
    closed = jax.make_jaxpr(lambda s, key: spectral._lanczos(matvec, s, key, m))(jnp.ones(n, jnp.float32),
                                                                                jax.random.key(0))
    eqns = _equations(closed.jaxpr)
    loops = ("while", "scan")  # fori_loop with static bounds lowers to scan
    random = [(p, path) for p, path, _ in eqns if "random" in p or "threefry" in p]
    assert random, "no random-number primitive found: the test no longer sees the restart"
    assert all(any(loop in path for loop in loops) and "cond" in path for _, path in random), random
    with_basis = [path for p, path, shapes in eqns if p == "dot_general" and (m + 1, n) in shapes]
    unconditional = [path for path in with_basis if any(loop in path for loop in loops) and "cond" not in path]
    assert len(unconditional) == 4  # two Gram-Schmidt passes of two products each
    assert len(with_basis) == 8  # and the same four for the restart direction, on breakdown only


def test_no_copy_of_the_basis_per_iteration():
    """The products with the basis use its stored layout: no transposed copy (XLA on CPU made one per
    pass and iteration for ``basis.T @ c``: up to 3.4x the time at n = 55,210)."""
    n, m = 1000, 16
    compiled = spectral._lanczos.lower(Partial(jnp.multiply, jnp.ones(n, jnp.float32)), jnp.ones(n, jnp.float32),
                                       jax.random.key(0), iterations=m).compile().as_text()
    assert f"f32[{n},{m + 1}]" not in compiled
    # nor for the Ritz vectors of top_eigenpairs (coefficients @ basis)
    compiled = spectral._lanczos_eigh.lower(Partial(jnp.multiply, jnp.ones(n, jnp.float32)), jnp.ones(n, jnp.float32),
                                            jax.random.key(0), iterations=m, k=3).compile().as_text()
    assert f"f32[{n},{m + 1}]" not in compiled and f"f32[{n},{m}]" not in compiled


def test_benchmark_numpy_baseline_is_the_same_algorithm():
    """benchmarks/lanczos.py times a NumPy loop as its baseline: it must compute what jaxcfl computes."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
    bench = pytest.importorskip("lanczos")
    n, m = 400, 40
    d = np.linspace(-1.0, 3.0, n).astype(np.float32)
    start = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    ritz, residuals = bench.numpy_lanczos(lambda v: d * v, start, m)
    ext = lanczos_extremes(Partial(jnp.multiply, jnp.asarray(d)), jnp.asarray(start), iterations=m)
    np.testing.assert_allclose([ritz[0], ritz[-1]], [ext.minimum, ext.maximum], rtol=1e-5)
    np.testing.assert_allclose([residuals[0], residuals[-1]], [ext.residual_min, ext.residual_max], rtol=1e-2)


# --- top-k eigenpairs (lanczos_eigh, top_eigenpairs) -------------------------------------------

def _separated(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A symmetric matrix whose three largest eigenvalues 10, 6, 4 stand apart from the rest in [-1, 1]."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eig = np.concatenate([rng.uniform(-1, 1, n - 3), [4.0, 6.0, 10.0]])
    return (q * eig) @ q.T, np.array([4.0, 2.0, 2.0])  # the matrix, and the gaps of its top three eigenvalues


@pytest.mark.parametrize("iterations", [80, 20, 12])
@pytest.mark.slow_in_float64
def test_top_eigenpairs_match_numpy_eigh_within_their_bounds(iterations, dtype):
    """Values within ``residual + rounding_floor`` of numpy's; vectors within the angle that bound allows
    (``sin <= (residual + floor) / gap``); the true residual ``||A y - value y||`` within the same bound."""
    n = 80
    mat, gap = _separated(n)
    exact, vecs = np.linalg.eigh(mat)
    pairs = spectral.top_eigenpairs(Partial(jnp.dot, jnp.asarray(mat, dtype)),
                                    jnp.asarray(np.random.default_rng(1).standard_normal(n), dtype),
                                    k=3, iterations=iterations)
    eps = float(jnp.finfo(dtype).eps)
    bound = pairs.residuals.astype(np.float64) + pairs.rounding_floor
    assert pairs.values.dtype == pairs.vectors.dtype == dtype and pairs.vectors.shape == (3, n)
    assert pairs.iterations == iterations and np.all(np.diff(pairs.values) < 0)  # descending
    assert np.all(np.abs(pairs.values - exact[::-1][:3]) <= bound)
    if iterations == n:
        assert np.all(np.abs(pairs.values - exact[::-1][:3]) <= 16 * eps * 10)  # rounding only
    y = pairs.vectors.astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=4 * eps)
    cos = np.abs(np.sum(y * vecs[:, ::-1][:, :3].T, axis=1))
    assert np.all(1 - cos <= (bound / gap) ** 2 + 4 * eps), 1 - cos  # sign is arbitrary: |<u, v>| ~ 1
    assert np.all(np.linalg.norm(y @ mat - pairs.values[:, None] * y, axis=1) <= bound)


@pytest.mark.parametrize("kind", ["isolated", "rank_one", "dense"])
def test_top_eigenpair_is_the_maximum_of_lanczos_extremes(kind):
    """One Lanczos core: ``k = 1`` gives the very Ritz value and residual of ``lanczos_extremes`` (same
    basis, same tridiagonal matrix), restarts on breakdown (rank one) included."""
    n, m = 60, 10
    matvec = Partial(jnp.dot, jnp.asarray(_operators(n)[kind], jnp.float32))
    start = jnp.asarray(np.random.default_rng(2).standard_normal(n), jnp.float32)
    ext = lanczos_extremes(matvec, start, iterations=m)
    pairs = spectral.top_eigenpairs(matvec, start, k=1, iterations=m)
    assert (pairs.values[0], pairs.residuals[0], pairs.rounding_floor) == (ext.maximum, ext.residual_max,
                                                                           ext.rounding_floor)


def test_lanczos_eigh_traces_once_under_jit():
    """Traced operators, starts and keys: new values of the same shapes reuse the compiled program."""
    traces = []

    @jax.jit
    def top2(diagonal, start, key):
        traces.append(1)
        return spectral.lanczos_eigh(lambda v: diagonal * v, start, key, iterations=12, k=2)

    rng = np.random.default_rng(3)
    for _ in range(3):
        diagonal = jnp.asarray(rng.permutation(np.linspace(-1.0, 5.0, 12)), jnp.float32)
        values, vectors, _, _ = top2(diagonal, jnp.asarray(rng.standard_normal(12), jnp.float32),
                                                 jax.random.key(int(rng.integers(100))))
        np.testing.assert_allclose(values, [5.0, np.linspace(-1.0, 5.0, 12)[-2]], rtol=1e-5)
        np.testing.assert_allclose(np.abs(vectors[0]), np.asarray(diagonal == diagonal.max(), np.float32), atol=1e-3)
    assert len(traces) == 1


def test_lanczos_eigh_under_vmap():
    """One operator per batch entry, each with its own eigenpairs."""
    diagonals = jnp.asarray([np.linspace(0.0, s, 12) for s in (1.0, 2.0, 3.0)], jnp.float32)
    batched = jax.jit(jax.vmap(lambda d, s: spectral.lanczos_eigh(lambda v: d * v, s, jax.random.key(0),
                                                                  iterations=12, k=2)))
    values, vectors, residuals, floor = batched(diagonals, jnp.ones((3, 12), jnp.float32))
    assert values.shape == (3, 2) and vectors.shape == (3, 2, 12) and residuals.shape == (3, 2) and floor.shape == (3,)
    np.testing.assert_allclose(values, diagonals[:, ::-1][:, :2], rtol=1e-5)


def test_lanczos_eigh_warm_started_inside_scan_converges():
    """The intended use in training: a few iterations per step, started from the previous top vector."""
    n = 200
    mat, _ = _separated(n, seed=4)
    matvec = Partial(jnp.dot, jnp.asarray(mat, jnp.float32))

    def step(vec, key):
        pairs = spectral.lanczos_eigh(matvec, vec, key, iterations=4, k=1)
        return pairs.vectors[0], pairs.values[0]

    start = jnp.asarray(np.random.default_rng(5).standard_normal(n), jnp.float32)
    vec, values = jax.jit(lambda s: lax.scan(step, s, jax.random.split(jax.random.key(0), 8)))(start)
    assert abs(float(values[-1]) - 10.0) < 1e-4 and values[0] < values[-1]
    top = np.linalg.eigh(mat)[1][:, -1]
    assert abs(float(np.dot(np.asarray(vec, np.float64), top))) > 1 - 1e-5


@pytest.mark.parametrize("start", [np.zeros(10), np.full(10, np.nan)], ids=["zero", "nan"])
def test_lanczos_eigh_replaces_a_useless_start(start):
    """A zero (e.g. a fresh optimiser state) or non-finite start is replaced by a random direction."""
    solve = jax.jit(lambda s: spectral.lanczos_eigh(lambda v: jnp.arange(1.0, 11.0) * v, s, jax.random.key(0),
                                                    iterations=10, k=2))
    values, vectors, _, _ = solve(jnp.asarray(start, jnp.float32))
    np.testing.assert_allclose(values, [10.0, 9.0], rtol=1e-5)
    assert np.all(np.isfinite(vectors))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k": 0}, "k must be an int in"),
        ({"k": 1.5}, "k must be an int in"),
        ({"k": True}, "k must be an int in"),
        ({"k": 11}, "k must be an int in"),
        ({"k": 5, "iterations": 4}, r"k must be an int in \[1, 4\]"),
        ({"iterations": 0}, "iterations must be an int in"),
        ({"iterations": 11}, r"iterations must be an int in \[1, 10\]"),
        ({"iterations": 4.0}, "iterations must be an int in"),
        ({"start": jnp.ones((2, 5))}, "start must be a non-empty flat vector"),
        ({"start": jnp.ones(0)}, "start must be a non-empty flat vector"),
    ],
)
def test_top_eigenpairs_rejects_bad_arguments_naming_them(kwargs, match):
    kwargs = {"start": jnp.ones(10), **kwargs}
    with pytest.raises(ValueError, match=match):
        spectral.top_eigenpairs(lambda v: v, kwargs.pop("start"), **kwargs)


def test_lanczos_eigh_rejects_bad_static_arguments_while_tracing():
    for kwargs, match in [({"iterations": 11, "k": 1}, "iterations"), ({"iterations": 4, "k": 5}, "k"),
                          ({"iterations": 4, "k": None}, "k")]:
        with pytest.raises(ValueError, match=match):
            jax.jit(lambda s, kw=kwargs: spectral.lanczos_eigh(lambda v: v, s, jax.random.key(0), **kw))(jnp.ones(10))
    with pytest.raises(ValueError, match="start must hold floating"):
        spectral.lanczos_eigh(lambda v: v, jnp.ones(10, jnp.int32), jax.random.key(0), iterations=4, k=1)


def test_a_traced_iteration_count_gives_the_fixed_counts_results_from_one_program():
    """``active`` runs that many iterations of a larger basis: the Ritz values, vectors and bounds
    of ``iterations=active``, one compiled program for every count, and a spectrum below zero
    (where the decoupled padding would otherwise win) handled too."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal((30, 30))
    traces = []

    @jax.jit
    def traced(m, matrix, start):
        traces.append(1)
        return spectral.lanczos_eigh(lambda v: matrix @ v, start, jax.random.key(0), iterations=16, k=2, active=m)

    fixed = jax.jit(lambda matrix, start, m: spectral.lanczos_eigh(lambda v: matrix @ v, start, jax.random.key(0),
                                                                   iterations=m, k=2), static_argnums=2)
    for shift in (0.0, -12.0):  # the second: every eigenvalue negative
        matrix = jnp.asarray((a + a.T) / 2 + shift * np.eye(30), jnp.float32)
        start = jnp.asarray(rng.standard_normal(30), jnp.float32)
        for m in (2, 5, 16):
            got, want = traced(m, matrix, start), fixed(matrix, start, m)
            np.testing.assert_allclose(got.values, want.values, rtol=2e-5, atol=2e-5)
            np.testing.assert_allclose(got.residuals, want.residuals, rtol=1e-3, atol=2e-5)
            np.testing.assert_allclose(np.abs(got.vectors @ want.vectors.T).diagonal(), 1.0, atol=1e-4)
            assert float(got.values[0]) <= float(np.linalg.eigvalsh(np.asarray(matrix))[-1]) + 1e-4
    assert len(traces) == 1  # one program for every count (and operator)
    with pytest.raises(ValueError, match="active"):
        spectral.lanczos_eigh(lambda v: v, jnp.ones(4), jax.random.key(0), iterations=3, k=1, active=2, unroll=True)
