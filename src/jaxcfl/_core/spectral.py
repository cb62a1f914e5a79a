"""Matrix-free extreme eigenvalues and top eigenpairs of a symmetric operator (Lanczos).

One solver serves every spectral question in jaxcfl: the windowed stability
bounds (operator ``W C^T C W`` and its relatives, mat-vecs by FFT) and the
sharpness of a loss and its top Hessian eigenvectors (Hessian-vector products).
Only mat-vecs are used; no matrix is ever formed. One loop (``_krylov``) builds
the Krylov basis and the tridiagonal matrix for all of :func:`lanczos_extremes`
(extreme Ritz values), :func:`top_eigenpairs` (the ``k`` largest, with vectors)
and :func:`lanczos_eigh` (the same, pure: for use inside ``jit``/``vmap``/``scan``).

Cost: per iteration, one mat-vec and the re-orthogonalisation (two classical
Gram-Schmidt passes, four products with the ``(iterations + 1) x n`` basis, in
its stored layout); a restart direction is drawn only on breakdown.
``benchmarks/lanczos.py`` measures the time against the iteration count.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax
from jax.tree_util import Partial
from jax.typing import ArrayLike

from jaxcfl._core import validate as v

__all__ = ["BREAKDOWN", "Extremes", "RitzPairs", "lanczos_eigh", "lanczos_extremes", "Eigenpairs",
    "top_eigenpairs"]
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


def _krylov(matvec: Callable[[Array], Array], start: Array, key: Array, iterations: int, unroll: bool = False,
            active: Array | None = None):
    """The Lanczos recurrence, the one loop of this module: ``(basis, alphas, betas, rounding_floor)``.

    ``unroll=True`` unrolls the loop in the compiled program (see :func:`lanczos_eigh`).
    ``active`` (traced, in ``[1, iterations]``): run that many steps only; the rest of
    ``basis``, ``alphas`` and ``betas`` stays zero.

    ``basis`` is ``(iterations + 1) x n``, orthonormal rows (the last one is the next
    direction); ``alphas`` and ``betas`` are the diagonal and off-diagonal of the
    tridiagonal matrix ``T = Q^T A Q`` (``betas[-1]`` is the residual norm of the last step).
    """
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
    steps = iterations if active is None else active
    basis, alphas, betas, scale = lax.fori_loop(0, steps, body, (basis, alphas, betas, jnp.zeros((), dtype)),
                                                unroll=bool(unroll) if active is None else 1)
    return basis, alphas, betas, BREAKDOWN * eps * scale


def _ritz(alphas: Array, betas: Array, active: Array | None = None) -> tuple[Array, Array, Array]:
    """Eigenpairs of the tridiagonal matrix, ascending: ``(ritz, coefficients, residuals)``.

    ``coefficients[:, i]`` is the ``i``-th Ritz vector in the Krylov basis; ``residuals``
    are the bounds ``|beta_m s_m|``. With ``active = m`` (traced) only the leading ``m x m``
    block is the Lanczos matrix: the rest is decoupled and its diagonal set below every
    eigenvalue of that block (its Gershgorin bound, less one), so the padding sorts first.
    """
    if active is None:
        tri = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
        ritz, vecs = jnp.linalg.eigh(tri)
        return ritz, vecs, jnp.abs(betas[-1] * vecs[-1, :])
    index = jnp.arange(alphas.shape[0])
    inside = index < active
    couple = jnp.where(index[:-1] < active - 1, betas[:-1], 0)
    radius = jnp.abs(jnp.pad(couple, (0, 1))) + jnp.abs(jnp.pad(couple, (1, 0)))
    lower = jnp.min(jnp.where(inside, alphas - radius, jnp.inf))
    below = lower - 1 - jnp.abs(lower)
    diagonal = jnp.where(inside, alphas, below)
    tri = jnp.diag(diagonal) + jnp.diag(couple, 1) + jnp.diag(couple, -1)
    ritz, vecs = jnp.linalg.eigh(tri)
    last = lax.dynamic_index_in_dim(vecs, active - 1, axis=0, keepdims=False)
    return ritz, vecs, jnp.abs(lax.dynamic_index_in_dim(betas, active - 1, keepdims=False) * last)


@functools.partial(jax.jit, static_argnames=("iterations",))
def _lanczos(matvec: Partial, start: Array, key: Array, iterations: int):
    """All Ritz values (ascending), their residual bounds and the rounding floor (compiled)."""
    _, alphas, betas, floor = _krylov(matvec, start, key, iterations)
    ritz, _, residuals = _ritz(alphas, betas)
    return ritz, residuals, floor


class RitzPairs(NamedTuple):
    """What :func:`lanczos_eigh` returns: JAX arrays, a pytree (it passes through ``jit``, ``vmap``, ``scan``).

    Attributes:
      values: the ``k`` largest Ritz values, descending.
      vectors: ``(k, n)``, the matching Ritz vectors (unit norm, rows).
      residuals: ``(k,)``, the residual bounds ``|beta_m s_m|`` (as in :class:`Extremes`).
      rounding_floor: scalar, as in :class:`Extremes`.
    """

    values: Array
    vectors: Array
    residuals: Array
    rounding_floor: Array


def lanczos_eigh(
    matvec: Callable[[Array], Array],
    start: Array,
    key: Array,
    *,
    iterations: int,
    k: int,
    unroll: bool = False,
    active: ArrayLike | None = None,
) -> RitzPairs:
    """The ``k`` largest eigenpairs of the symmetric operator ``matvec``: pure, for use inside ``jit``/``vmap``/``scan``.

    The Lanczos of :func:`lanczos_extremes` (full re-orthogonalisation, restart on
    breakdown) with Ritz vectors: ``y_i = Q^T s_i`` for the basis ``Q`` and the
    eigenvectors ``s_i`` of the tridiagonal matrix. Every operand may be traced;
    ``iterations`` and ``k`` are static (new values of the same shapes never retrace).
    Warm starts (``start`` = the previous top vector, as when the sharpness is tracked
    along training, Cohen et al. 2021) converge in a few iterations. A zero or
    non-finite ``start`` is replaced by a random direction drawn from ``key``.

    Accuracy: in exact arithmetic of the recurrence, ``||A y_i - values[i] y_i||`` equals
    ``residuals[i]``; an eigenvalue lies within ``residuals[i] + rounding_floor`` of
    ``values[i]`` (see :class:`Extremes`), and the angle between ``y_i`` and the
    eigenvector satisfies ``sin <= (residuals[i] + rounding_floor) / gap``, ``gap``
    the distance from ``values[i]`` to the rest of the spectrum (Davis-Kahan).
    Interior eigenpairs converge more slowly than the largest: check the residuals.

    Args:
      matvec: ``v -> A v`` on flat vectors, ``A`` symmetric; any traceable function.
      start: flat start vector of length ``n``; its dtype sets the working precision.
      key: PRNG key for restart directions (used only on breakdown or a zero ``start``).
      iterations: Krylov dimension, in ``[1, n]`` (static).
      k: how many eigenpairs, in ``[1, iterations]`` (static).
      unroll: unroll the ``iterations`` steps in the compiled program (static). Rarely worth
        it: the compile time grows with ``iterations``, and the loop runs as fast once the
        mat-vec's convolutions are in the form XLA's CPU backend runs fast inside a loop body:
        wrap a convolutional mat-vec in :func:`jaxcfl.canonical_convs`, as the
        CFL guard and :func:`jaxcfl.sharpness` do (without it, a conv-net Hessian-vector
        product ran 4-12x slower in the loop). The guard's first estimate (20 iterations)
        compiled 3.3-7.1x faster as a loop than unrolled, and ran up to 1.4x longer
        (``benchmarks/guard_compile.py``, ``benchmarks/README.md``).
      active: run only this many iterations, ``1 <= active <= iterations`` (traced: one
        compiled program serves every count, ``iterations`` being its capacity; the CFL guard
        runs its first estimate and its refreshes so). ``k`` must not exceed it. Not with
        ``unroll``. The same results as ``iterations=active`` up to rounding (the tridiagonal
        eigenproblem is solved at full size, its padding decoupled and below the spectrum).

    Returns:
      :class:`RitzPairs` ``(values, vectors, residuals, rounding_floor)``: ``values``
      descending, ``vectors`` of shape ``(k, n)`` in ``start``'s dtype, each signed so
      that its inner product with ``start`` is non-negative.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxcfl import spectral
      >>> @jax.jit
      ... def top2(diagonal, start):
      ...     return spectral.lanczos_eigh(lambda v: diagonal * v, start, jax.random.key(0), iterations=10, k=2)
      >>> values, vectors, residuals, floor = top2(jnp.arange(1.0, 11.0), jnp.ones(10))
      >>> values.round(4).tolist(), jnp.abs(vectors).argmax(axis=1).tolist()
      ([10.0, 9.0], [9, 8])
    """
    if jnp.ndim(start) != 1 or jnp.shape(start)[0] < 1:
        raise ValueError(f"start must be a non-empty flat vector, got shape {jnp.shape(start)}")
    if not jnp.issubdtype(jnp.result_type(start), jnp.floating):
        raise ValueError(f"start must hold floating values (its dtype sets the precision), got {jnp.result_type(start)}")
    n = jnp.shape(start)[0]
    iterations = v.check_count("iterations", iterations, n, "the Krylov dimension, at most the dimension n")
    k = v.check_count("k", k, iterations, "at most iterations")
    start = jnp.asarray(start)
    norm = jnp.linalg.norm(start)
    start = lax.cond(jnp.isfinite(norm) & (norm > 0), lambda: start,
                     lambda: jax.random.normal(jax.random.fold_in(key, iterations), (n,), start.dtype))
    if active is not None:
        if unroll:
            raise ValueError("lanczos_eigh: active (a traced count) cannot be unrolled; pass one or the other")
        active = jnp.clip(jnp.asarray(active, jnp.int32), k, iterations)
    basis, alphas, betas, floor = _krylov(matvec, start, key, iterations, unroll, active)
    ritz, coeffs, residuals = _ritz(alphas, betas, active)
    top = coeffs[:, ::-1][:, :k].T  # (k, iterations), largest first
    # ``top @ basis`` with the basis in its stored layout (no transposed copy); its last row,
    # the next direction, gets a zero coefficient.
    vectors = jnp.concatenate([top, jnp.zeros((k, 1), top.dtype)], axis=1) @ basis
    vectors = vectors / jnp.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors * jnp.where(vectors @ start < 0, -1.0, 1.0).astype(vectors.dtype)[:, None]
    return RitzPairs(ritz[::-1][:k], vectors, residuals[::-1][:k], floor)


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
      >>> from jaxcfl import lanczos_extremes
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


@dataclasses.dataclass(frozen=True, eq=False)
class Eigenpairs:
    """The largest eigenpairs of a symmetric operator (:func:`top_eigenpairs`).

    Attributes:
      values: ``(k,)`` Ritz values, descending (largest first).
      vectors: ``(k, n)`` unit Ritz vectors, one per row; the sign of each is arbitrary
        (non-negative inner product with the start vector).
      residuals: ``(k,)`` residual bounds ``|beta_m s_m|`` (exact arithmetic of the
        recurrence; see :class:`Extremes` and :func:`lanczos_eigh` for rounding and
        the accuracy of the vectors).
      iterations: Krylov dimension used.
      rounding_floor: as in :class:`Extremes`.
      unravel: for the Hessian of a loss (:func:`jaxcfl.hessian_eigenpairs`),
        the map from a flat vector to a pytree shaped like ``params``; else ``None``.
    """

    values: np.ndarray
    vectors: np.ndarray
    residuals: np.ndarray
    iterations: int
    rounding_floor: float
    unravel: Callable[[Array], Any] | None = None

    def vector_tree(self, i: int = 0) -> Any:
        """The ``i``-th vector shaped like ``params`` (needs ``unravel``)."""
        if self.unravel is None:
            raise ValueError("these eigenpairs have no unravel (they were not computed on a pytree)")
        return self.unravel(jnp.asarray(self.vectors[i]))


_lanczos_eigh = jax.jit(lanczos_eigh, static_argnames=("iterations", "k"))


def top_eigenpairs(
    matvec: Callable[[Array], Array],
    start: ArrayLike,
    *,
    k: int = 1,
    iterations: int | None = None,
    key: Array | None = None,
) -> Eigenpairs:
    """The ``k`` largest eigenvalues and eigenvectors of the symmetric operator ``matvec``.

    :func:`lanczos_eigh`, compiled (one program per shape, ``k`` and ``iterations``)
    and brought to the host. Memory: ``(iterations + 1) n`` numbers for the basis.

    Args:
      matvec, start, key: as in :func:`lanczos_extremes` (pass a
        ``jax.tree_util.Partial`` to reuse the compiled solver).
      k: how many eigenpairs, an int in ``[1, iterations]``.
      iterations: Krylov dimension in ``[k, n]``; default ``min(n, max(128, 2 k))``.
        The largest pairs converge first: check ``residuals``.

    Returns:
      :class:`Eigenpairs` (NumPy arrays, values descending).

    Raises:
      ValueError: naming the argument: ``start`` not a non-empty flat floating vector,
        ``iterations`` outside ``[1, n]``, ``k`` not an int in ``[1, iterations]``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxcfl import top_eigenpairs
      >>> diagonal = jnp.arange(1.0, 11.0)
      >>> pairs = top_eigenpairs(lambda v: diagonal * v, jnp.ones(10), k=3)
      >>> pairs.values.round(4).tolist(), pairs.vectors.shape, pairs.iterations
      ([10.0, 9.0, 8.0], (3, 10), 10)
    """
    start = jnp.asarray(start)
    if start.ndim != 1 or start.shape[0] < 1:
        raise ValueError(f"start must be a non-empty flat vector, got shape {start.shape}")
    n = start.shape[0]
    k = v.check_count("k", k, n, "at most the dimension n")
    if iterations is None:
        iterations = min(n, max(128, 2 * k))
    iterations = v.check_count("iterations", iterations, n, "the Krylov dimension, at most the dimension n")
    k = v.check_count("k", k, iterations, "at most iterations")
    key = jax.random.key(0) if key is None else key
    if not isinstance(matvec, Partial):
        matvec = Partial(matvec)
    values, vectors, residuals, floor = jax.device_get(_lanczos_eigh(matvec, start, key, iterations=iterations, k=k))
    return Eigenpairs(values=values, vectors=vectors, residuals=residuals, iterations=iterations,
                      rounding_floor=float(floor))
