"""Matrix-free extreme eigenvalues of a symmetric operator (Lanczos).

One solver serves every spectral question in jaxcfl: the windowed stability
bounds (operator ``W C^T C W`` and its relatives, mat-vecs by FFT) and the
sharpness of a loss (Hessian-vector products). Only mat-vecs are used; no
matrix is ever formed.
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


@dataclasses.dataclass(frozen=True)
class Extremes:
    """Extreme Ritz values of a Lanczos run.

    Attributes:
      minimum, maximum: smallest and largest Ritz value (estimates of the
        extreme eigenvalues; exact when ``iterations`` equals the dimension).
      residual_min, residual_max: Lanczos residual bounds ``|beta_m s_m|`` of
        those Ritz pairs; an eigenvalue lies within this distance of each.
      iterations: Krylov dimension used.
    """

    minimum: float
    maximum: float
    residual_min: float
    residual_max: float
    iterations: int


@functools.partial(jax.jit, static_argnames=("iterations",))
def _lanczos(matvec: Partial, start: Array, key: Array, iterations: int):
    n = start.shape[0]
    dtype = start.dtype
    eps = jnp.finfo(dtype).eps
    basis = jnp.zeros((iterations + 1, n), dtype).at[0].set(start / jnp.linalg.norm(start))

    def orthogonalise(vec, basis):
        # Two passes of classical Gram-Schmidt against all stored vectors
        # (rows not yet filled are zero and contribute nothing).
        for _ in range(2):
            vec = vec - basis.T @ (basis @ vec)
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
        broke = beta <= 64 * eps * scale

        def restart(_):
            fresh = orthogonalise(jax.random.normal(jax.random.fold_in(key, j), (n,), dtype), basis)
            return fresh / jnp.linalg.norm(fresh)

        nxt = lax.cond(broke, restart, lambda _: w / beta, None)
        basis = basis.at[j + 1].set(nxt)
        return basis, alphas.at[j].set(alpha), betas.at[j].set(jnp.where(broke, 0.0, beta)), scale

    alphas = jnp.zeros(iterations, dtype)
    betas = jnp.zeros(iterations, dtype)
    basis, alphas, betas, _ = lax.fori_loop(0, iterations, body, (basis, alphas, betas, jnp.zeros((), dtype)))
    tri = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    ritz, vecs = jnp.linalg.eigh(tri)
    residuals = jnp.abs(betas[-1] * vecs[-1, :])
    return ritz, residuals


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
      :class:`Extremes`.
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
    ritz, residuals = _lanczos(matvec, start, key, iterations)
    ritz, residuals = jax.device_get((ritz, residuals))
    return Extremes(
        minimum=float(ritz[0]),
        maximum=float(ritz[-1]),
        residual_min=float(residuals[0]),
        residual_max=float(residuals[-1]),
        iterations=iterations,
    )
