"""Lanczos (jaxcfl.spectral): what the residual bound covers, the rounding floor, and the work per
iteration (a restart only on breakdown, no copy of the basis). Accuracy against NumPy and the
breakdown on low-rank operators are in tests/test_theory.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params
from jax.tree_util import Partial

from jaxcfl import spectral
from jaxcfl.spectral import lanczos_extremes


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
