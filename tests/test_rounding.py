"""The perturbation primitive is IEEE-exact after compilation (checked against NumPy)."""

import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import jaxcfl
from jaxcfl._core.rounding import rounded_mul, scaled_update, true_divide

K_VALUES = [1.0, 3.0, 5.0, 7.0, 0.3, 2.0, 8.0]


def _np_update(lr, g, k, dtype):
    lr, k = dtype(lr), dtype(k)
    g = np.asarray(g, dtype)
    return dtype(lr * k) * (g / k)


def _data(dtype, n=20000, seed=0):
    return np.random.default_rng(seed).standard_normal(n).astype(dtype)


@pytest.mark.parametrize("k", K_VALUES)
def test_scaled_update_bit_exact_traced(k, dtype):
    np_dtype = np.dtype(dtype).type
    g = _data(np_dtype)
    got = np.asarray(jax.jit(scaled_update)(np_dtype(0.1), g, np_dtype(k)))
    np.testing.assert_array_equal(got, _np_update(0.1, g, k, np_dtype))


@pytest.mark.parametrize("k", K_VALUES)
def test_scaled_update_bit_exact_with_constant_lr_and_k(k, dtype):
    np_dtype = np.dtype(dtype).type
    g = _data(np_dtype, seed=1)
    got = np.asarray(jax.jit(lambda g: scaled_update(0.1, g, k))(g))
    np.testing.assert_array_equal(got, _np_update(0.1, g, k, np_dtype))


def test_scaled_update_bit_exact_under_vmap_over_k(dtype):
    np_dtype = np.dtype(dtype).type
    g = _data(np_dtype, n=4096, seed=2)
    ks = np.array([1.0, 3.0, 5.0, 7.0], np_dtype)
    got = np.asarray(jax.jit(jax.vmap(lambda k: scaled_update(np_dtype(0.05), g, k)))(ks))
    for row, k in zip(got, ks):
        np.testing.assert_array_equal(row, _np_update(0.05, g, k, np_dtype))


def test_update_is_not_fused_into_the_subtraction(dtype):
    # p - fl(fl(lr k) fl(g/k)): two roundings, never one fused multiply-add.
    np_dtype = np.dtype(dtype).type
    p, g = _data(np_dtype, seed=3), _data(np_dtype, seed=4)
    got = np.asarray(jax.jit(lambda p, g, lr, k: p - scaled_update(lr, g, k))(p, g, np_dtype(0.37), np_dtype(3)))
    np.testing.assert_array_equal(got, p - _np_update(0.37, g, 3.0, np_dtype))


def test_rounded_mul_and_true_divide_bit_exact(dtype):
    np_dtype = np.dtype(dtype).type
    a, b, c = _data(np_dtype, seed=5), _data(np_dtype, seed=6), _data(np_dtype, seed=7)
    got = np.asarray(jax.jit(lambda a, b, c: c + rounded_mul(a, b))(a, b, c))
    np.testing.assert_array_equal(got, c + a * b)
    got = np.asarray(jax.jit(lambda a: true_divide(a, 3.0))(a))
    np.testing.assert_array_equal(got, a / np_dtype(3.0))


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_powers_of_two_are_bit_identical_and_odd_k_differ(n, dtype):
    np_dtype = np.dtype(dtype).type
    g = _data(np_dtype, seed=8)
    update = jax.jit(scaled_update)
    base = np.asarray(update(np_dtype(0.1), g, np_dtype(3.0)))
    np.testing.assert_array_equal(np.asarray(update(np_dtype(0.1), g, np_dtype(3.0 * 2**n))), base)
    np.testing.assert_array_equal(np.asarray(update(np_dtype(0.1), g, np_dtype(2.0**n))), np.asarray(update(np_dtype(0.1), g, np_dtype(1.0))))
    assert np.any(base != np.asarray(update(np_dtype(0.1), g, np_dtype(1.0))))


@settings(max_examples=60, deadline=None)
@given(
    g=st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32).filter(lambda x: abs(x) > 1e-30 or x == 0),
    lr=st.floats(min_value=2.0**-20, max_value=10.0, width=32),
    k=st.sampled_from([1.0, 3.0, 5.0, 7.0, 9.0, 11.0]),
    n=st.integers(min_value=1, max_value=6),
)
def test_property_power_of_two_invariance_and_numpy_agreement(g, lr, k, n):
    gs = np.array([g], np.float32)
    f = _jit_update()
    out_k = np.asarray(f(np.float32(lr), gs, np.float32(k)))
    out_k2n = np.asarray(f(np.float32(lr), gs, np.float32(k * 2**n)))
    np.testing.assert_array_equal(out_k, out_k2n)
    np.testing.assert_array_equal(out_k, _np_update(lr, gs, k, np.float32))


@functools.lru_cache(maxsize=None)
def _jit_update():
    return jax.jit(scaled_update)


# --- the schemes' arithmetic, given a fixed gradient --------------------------------

def _fixed_grad(g):
    return lambda kernel, hyper: g


@pytest.mark.parametrize("k", [1.0, 3.0, 4.0])
def test_euler_step_is_exactly_the_reference_arithmetic(k, dtype):
    np_dtype = np.dtype(dtype).type
    rng = np.random.default_rng(9)
    kern, g = rng.standard_normal((2, 32, 32)).astype(np_dtype)
    hyper = jaxcfl.make_hyper(0.013, 1.0, k=k, dtype=dtype)
    step = jax.jit(lambda s, g, h: jaxcfl.pde.euler_step(s, _fixed_grad(g), h))
    new = step(jaxcfl.pde.init(kern), g, hyper)
    np.testing.assert_array_equal(np.asarray(new.kernel), kern - _np_update(np_dtype(0.013), g, k, np_dtype))
    assert int(new.iteration) == 1


@pytest.mark.parametrize("k", [1.0, 3.0, 8.0])
def test_nesterov_step_is_exactly_the_reference_arithmetic(k, dtype):
    np_dtype = np.dtype(dtype).type
    rng = np.random.default_rng(10)
    kern, prev, g = rng.standard_normal((3, 32, 32)).astype(np_dtype)
    dt, mu = np_dtype(0.07), np_dtype(0.9)
    hyper = jaxcfl.make_hyper(dt, 1.0, k=k, mu=mu, dtype=dtype)
    state = jaxcfl.pde.State(kernel=jnp.asarray(kern), previous=jnp.asarray(prev), iteration=jnp.zeros((), jnp.int32))
    new = jax.jit(lambda s, g, h: jaxcfl.pde.nesterov_step(s, _fixed_grad(g), h))(state, g, hyper)
    lookahead = kern + mu * (kern - prev)
    h = (np_dtype(1.0) + mu) * (dt * dt) * np_dtype(0.5)
    np.testing.assert_array_equal(np.asarray(new.kernel), lookahead - _np_update(h, g, k, np_dtype))
    np.testing.assert_array_equal(np.asarray(new.previous), kern)
