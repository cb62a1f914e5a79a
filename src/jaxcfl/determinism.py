"""Bit-level comparison of runs: fingerprints and the paper's divergence metric."""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike


def divergence(a: ArrayLike, b: ArrayLike) -> Array:
    """The paper's divergence ``2 mean(|a - b| / (|a| + |b|))`` between two weight arrays.

    Entries where both are zero contribute zero. The value lies in ``[0, 2]``:
    0 for identical arrays, order one once a perturbation has been amplified
    to the size of the weights (Section 4, Figure 2; Figure 4 right).
    """
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    num = jnp.abs(a - b)
    den = jnp.abs(a) + jnp.abs(b)
    ratio = jnp.where(den > 0, num / jnp.where(den > 0, den, 1), 0.0)
    return 2.0 * jnp.mean(ratio)


def fingerprint(tree) -> str:
    """A stable hex digest of the exact bytes, shapes and dtypes of a pytree (and its structure)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    digest = hashlib.sha256(str(treedef).encode())
    for leaf in leaves:
        arr = np.asarray(jax.device_get(leaf))
        digest.update(f"{arr.dtype.str}{arr.shape}".encode())
        digest.update(np.ascontiguousarray(arr).tobytes())
    return digest.hexdigest()
