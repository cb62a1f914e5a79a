"""Functions that tests/test_determinism.py runs in child processes (importable via PYTHONPATH)."""

import os

import jax
import jax.numpy as jnp
import numpy as np


def conv_and_matmul(seed: int, size: int = 64):
    """A small network-like computation: deterministic for a fixed seed.

    The inputs come from NumPy: eager ``jax.random`` calls would compile the PRNG
    kernels in every child process (about 3 s each), and only the convolution and
    the matrix product are under test.
    """
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((4, size, size, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 3, 8)), jnp.float32)
    m = jnp.asarray(rng.standard_normal((size * size * 8 // 16, 32)), jnp.float32)
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return {"conv": y, "dense": jnp.tanh(y.reshape(4, -1, 16).sum(-1) @ m)}


def process_dependent():
    """Differs from process to process: the pid enters the result."""
    return jnp.asarray([os.getpid()], jnp.int32)


def fails():
    raise RuntimeError("boom from the child")


def holds_a_path():
    """A result with a ``Path`` leaf: once hashed by its pointer, so that two processes never agreed."""
    from pathlib import Path

    return {"out": Path("results"), "value": jnp.ones(2)}
