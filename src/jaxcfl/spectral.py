"""Matrix-free extreme eigenvalues of a symmetric operator (Lanczos).

One solver serves every spectral question in jaxcfl: the windowed stability
bounds (operator ``W C^T C W`` and its relatives, mat-vecs by FFT) and the
sharpness of a loss (Hessian-vector products). Only mat-vecs are used; no
matrix is ever formed.

Cost: per iteration, one mat-vec and the re-orthogonalisation (two classical
Gram-Schmidt passes, four products with the ``(iterations + 1) x n`` basis, in
its stored layout); a restart direction is drawn only on breakdown.
``benchmarks/lanczos.py`` measures the time against the iteration count.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import Array, lax
from jax.tree_util import Partial
from jax.typing import ArrayLike


BREAKDOWN = 64
"""A residual norm ``beta <= BREAKDOWN * eps * scale`` counts as rounding: the Krylov space is
invariant (breakdown). ``scale`` is the running maximum of ``|alpha_j| + beta_j``, an estimate of
``||A||`` (it lies between ``||A|| / 2``, once converged, and ``2 ||A||``)."""


@dataclasses.dataclass(frozen=True)
class Extremes:
    """Extreme Ritz values of a Lanczos run.

    Attributes:
      minimum, maximum: smallest and largest Ritz value (estimates of the
        extreme eigenvalues; exact to rounding when ``iterations`` equals the dimension).
      residual_min, residual_max: Lanczos residual bounds ``|beta_m s_m|`` of
        those Ritz pairs: in exact arithmetic of the Krylov recurrence, an
        eigenvalue lies within this distance of each. They do not cover
        rounding: they are exactly 0 when the Krylov space became invariant at
        the last step (always when ``iterations`` equals the dimension, and for
        low-rank operators), and when ``s_m`` underflows (a converged,
        well-separated Ritz value in float32).
      iterations: Krylov dimension used.
      rounding_floor: ``BREAKDOWN * eps * scale`` (:data:`BREAKDOWN`): the
        smallest residual this run can tell from rounding, in the start
        vector's precision. With it, an eigenvalue lies within
        ``residual + rounding_floor`` of each Ritz value, provided the mat-vec
        itself is accurate to about ``eps ||A||`` (a mat-vec computed less
        accurately, e.g. a Hessian-vector product through a deep network in
        float32, adds its own error, which Lanczos cannot see). Errors measured
        on known spectra (dense and diagonal, n up to 3000) were at most
        ``5.5 eps ||A||`` (``docs/spectral.md``, ``tests/test_spectral.py``).
    """

    minimum: float
    maximum: float
    residual_min: float
    residual_max: float
    iterations: int
    rounding_floor: float = 0.0


@functools.partial(jax.jit, static_argnames=("iterations",))
def _lanczos(matvec: Partial, start: Array, key: Array, iterations: int):
    n = start.shape[0]
    dtype = start.dtype
    eps = jnp.finfo(dtype).eps
    basis = jnp.zeros((iterations + 1, n), dtype).at[0].set(start / jnp.linalg.norm(start))

    def orthogonalise(vec, basis):
        # Two passes of classical Gram-Schmidt against all stored vectors
        # (rows not yet filled are zero and contribute nothing). ``coeffs @ basis``,
        # not ``basis.T @ coeffs``: XLA's CPU backend copies the transposed basis
        # before the product, every pass of every iteration (1.3-3.4x the time at
        # 64-256 iterations, n = 55,210: benchmarks/README.md).
        for _ in range(2):
            vec = vec - (basis @ vec) @ basis
        return vec

    def body(j, carry):
        basis, alphas, betas, scale = carry
        q = basis[j]
        w = matvec(q)
        alpha = jnp.vdot(q, w)
        w = orthogonalise(w, basis)
        beta = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, jnp.abs(alpha) + beta)
        # Breakdown: the Krylov space is invariant. Continue from a fresh random
        # direction orthogonal to it (T becomes block diagonal, still exact). Drawn and
        # orthogonalised only on breakdown (lax.cond; under vmap both branches run).
        broke = beta <= BREAKDOWN * eps * scale

        def restart(_):
            fresh = orthogonalise(jax.random.normal(jax.random.fold_in(key, j), (n,), dtype), basis)
            return fresh / jnp.linalg.norm(fresh)

        nxt = lax.cond(broke, restart, lambda _: w / beta, None)
        basis = basis.at[j + 1].set(nxt)
        return basis, alphas.at[j].set(alpha), betas.at[j].set(jnp.where(broke, 0.0, beta)), scale

    alphas = jnp.zeros(iterations, dtype)
    betas = jnp.zeros(iterations, dtype)
    basis, alphas, betas, scale = lax.fori_loop(0, iterations, body, (basis, alphas, betas, jnp.zeros((), dtype)))
    tri = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    ritz, vecs = jnp.linalg.eigh(tri)
    residuals = jnp.abs(betas[-1] * vecs[-1, :])
    return ritz, residuals, BREAKDOWN * eps * scale


def lanczos_extremes(
    matvec: Callable[[Array], Array],
    start: ArrayLike,
    *,
    iterations: int | None = None,
    key: Array | None = None,
) -> Extremes:
    """Smallest and largest eigenvalue of the symmetric operator ``matvec``.

    Lanczos with full re-orthogonalisation (two Gram-Schmidt passes) and
    restart on breakdown, so that low-rank operators (e.g. the checkerboard's
    rank-one ``C^T C``) are handled exactly.

    Args:
      matvec: ``v -> A v`` on flat vectors, ``A`` symmetric. Pass a
        ``jax.tree_util.Partial`` of a module-level function to reuse the
        compiled solver across operators with different data.
      start: a flat start vector (its dtype sets the working precision).
      iterations: Krylov dimension; defaults to ``min(n, 128)`` (extreme Ritz
        values converge first; check the residuals). With
        ``iterations == n`` the result is exact to rounding.
      key: PRNG key for restart directions.

    Returns:
      :class:`Extremes`. Its residual bounds hold in exact arithmetic of the
      Krylov recurrence; add ``rounding_floor`` to cover rounding.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxcfl.spectral import lanczos_extremes
      >>> diagonal = jnp.arange(1.0, 11.0)
      >>> ext = lanczos_extremes(lambda v: diagonal * v, jnp.ones(10))
      >>> round(ext.minimum, 4), round(ext.maximum, 4), ext.iterations
      (1.0, 10.0, 10)
      >>> ext.residual_max, ext.rounding_floor > 0  # the full space: only rounding is left
      (0.0, True)
    """
    start = jnp.asarray(start)
    if start.ndim != 1 or start.shape[0] < 1:
        raise ValueError(f"start must be a non-empty flat vector, got shape {start.shape}")
    n = start.shape[0]
    iterations = min(n, 128) if iterations is None else int(iterations)
    if not 1 <= iterations <= n:
        raise ValueError(f"iterations must lie in [1, {n}] (the dimension), got {iterations}")
    key = jax.random.key(0) if key is None else key
    if not isinstance(matvec, Partial):
        matvec = Partial(matvec)
    ritz, residuals, floor = jax.device_get(_lanczos(matvec, start, key, iterations))
    return Extremes(
        minimum=float(ritz[0]),
        maximum=float(ritz[-1]),
        residual_min=float(residuals[0]),
        residual_max=float(residuals[-1]),
        iterations=iterations,
        rounding_floor=float(floor),
    )
