"""Input images: the paper's checkerboard and the checks every image passes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import DTypeLike

from jaxcfl._validate import check_int


def checkerboard(n: int, *, dtype: DTypeLike | None = None) -> Array:
    """The paper's ``n x n`` checkerboard: ``I[m, l] = -1`` where ``m + l`` is even, ``+1`` otherwise.

    Args:
      n: side length (the paper uses 256).
      dtype: floating dtype; defaults to JAX's default float (float32, or
        float64 under ``jax.enable_x64``).

    Returns:
      An ``(n, n)`` array of +-1.

    References:
      Sun et al. (2024), Section 5 / appendix E: the input of the one-layer CNN.

    Example:
      >>> import jaxcfl
      >>> jaxcfl.checkerboard(3).tolist()
      [[-1.0, 1.0, -1.0], [1.0, -1.0, 1.0], [-1.0, 1.0, -1.0]]
    """
    n = check_int("n", n, minimum=1)
    idx = jnp.arange(n)
    parity = (idx[:, None] + idx[None, :]) % 2
    dtype = jax.dtypes.canonicalize_dtype(dtype if dtype is not None else float)
    return jnp.where(parity == 0, -1.0, 1.0).astype(dtype)
