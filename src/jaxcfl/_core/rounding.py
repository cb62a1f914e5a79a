"""The last-bit perturbation primitive: ``fl(lr k) * fl(g / k)`` (paper-notes section 2).

Multiplying the step by ``k`` and the gradient by ``1/k`` is the identity in exact
arithmetic; in floating point it changes only the rounding of the update. For
``k = 2^n`` both roundings are exact, so ``k`` and ``k 2^n`` give bit-identical
runs (appendix B, Table 2); odd ``k`` perturb the last bit.

XLA does not evaluate this arithmetic literally unless told not to:

* ``g / broadcast(k)`` is rewritten as ``g * (1/k)`` (a different rounding), even
  when ``k`` is a traced value. An ``optimization_barrier`` around the broadcast
  divisor keeps a true IEEE division.
* A multiply feeding an add or subtract is contracted into a fused multiply-add
  (one rounding instead of two) by the CPU and GPU code generators. Adding an
  opaque zero (a zero hidden behind ``optimization_barrier``) to the product
  materialises its rounding first; ``x + 0`` is exact for every ``x`` except that
  ``-0`` becomes ``+0``.

Every function here is checked bit for bit against NumPy in ``tests/test_rounding.py``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import Array, lax
from jax.typing import ArrayLike

__all__ = ["rounded_mul", "true_divide", "scaled_update"]


def _opaque_zero(dtype) -> Array:
    return lax.optimization_barrier(jnp.zeros((), dtype))


def rounded_mul(a: ArrayLike, b: ArrayLike) -> Array:
    """``fl(a * b)``, rounded on its own even when the result feeds an add (no FMA)."""
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    dtype = jnp.result_type(a, b)
    return a * b + _opaque_zero(dtype)


def true_divide(g: ArrayLike, k: ArrayLike) -> Array:
    """``fl(g / k)`` as an IEEE division, never a multiplication by ``fl(1/k)``."""
    g = jnp.asarray(g)
    k = jnp.asarray(k, g.dtype)
    return g / lax.optimization_barrier(jnp.broadcast_to(k, g.shape))


def scaled_update(lr: ArrayLike, g: ArrayLike, k: ArrayLike = 1.0) -> Array:
    """The perturbed update ``fl(fl(lr k) * fl(g / k))``, in the dtype of ``g``.

    Args:
      lr: step size (scalar, possibly traced).
      g: the direction (gradient plus weight decay, after any momentum).
      k: perturbation factor, ``k > 0``; ``k = 1`` is the plain ``fl(lr * g)``.

    Returns:
      The update, to be *subtracted* from the parameters.

    References:
      Sun et al. (2024), Section 4 "perturbed SGD" and appendix B.
    """
    g = jnp.asarray(g)
    lr = jnp.asarray(lr, g.dtype)
    k = jnp.asarray(k, g.dtype)
    return rounded_mul(lr * k, true_divide(g, k))
