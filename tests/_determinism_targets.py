"""Functions that tests/test_determinism.py runs in child processes (importable via PYTHONPATH)."""

import os

import jax
import jax.numpy as jnp


def conv_and_matmul(seed: int, size: int = 64):
    """A small network-like computation: deterministic for a fixed seed."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k1, (4, size, size, 3))
    w = jax.random.normal(k2, (3, 3, 3, 8))
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    m = jax.random.normal(k3, (size * size * 8 // 16, 32))
    return {"conv": y, "dense": jnp.tanh(y.reshape(4, -1, 16).sum(-1) @ m)}


def process_dependent():
    """Differs from process to process: the pid enters the result."""
    return jnp.asarray([os.getpid()], jnp.int32)


def fails():
    raise RuntimeError("boom from the child")
