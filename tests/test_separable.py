"""The separable (low-rank image) correlation operator against the FFT one, NumPy and autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.lib.stride_tricks import sliding_window_view

import jaxcfl
from jaxcfl.pde import _operators as ops
def _low_rank(n0, n1, rank, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n0, rank)) @ rng.standard_normal((rank, n1))


def _np_correlate(image, kernel):
    return np.einsum("xyij,ij->xy", sliding_window_view(image, kernel.shape), kernel)


def _np_adjoint(image, u, w):
    return np.einsum("ijxy,xy->ij", sliding_window_view(image, u.shape)[:w, :w], u)


def test_checkerboard_factors_are_exact_and_rank_one():
    img = np.asarray(jaxcfl.checkerboard(64), np.float64)
    u, v = jaxcfl.pde.separable_factors(img)
    assert u.shape == (64, 1) and v.shape == (64, 1)
    np.testing.assert_array_equal(u @ v.T, img)  # integer image: exact
    prob = jaxcfl.make_problem(jaxcfl.checkerboard(256), 32)
    assert prob.operator == "separable" and prob.rank == 1
    assert prob.backend.toeplitz[0].shape == (1, 225, 32) and prob.backend.gram[0].shape == (1, 1, 32, 32)


@settings(max_examples=15, deadline=None)
@given(rank=st.integers(1, 5), n0=st.integers(8, 40), n1=st.integers(8, 40), seed=st.integers(0, 2**16))
def test_factors_recover_the_rank_of_a_random_low_rank_image(rank, n0, n1, seed):
    rank = min(rank, n0, n1)
    img = _low_rank(n0, n1, rank, seed)
    u, v = jaxcfl.pde.separable_factors(img, max_rank=8, dtype=np.float64)
    assert u.shape[1] == rank
    np.testing.assert_allclose(u @ v.T, img, rtol=0, atol=16 * np.finfo(np.float64).eps * np.abs(img).max())
    if rank > 1:
        assert jaxcfl.pde.separable_factors(img, max_rank=rank - 1) is None


def test_full_rank_and_zero_images():
    img = np.random.default_rng(0).standard_normal((30, 30))
    assert jaxcfl.pde.separable_factors(img, max_rank=8) is None
    assert jaxcfl.make_problem(img, 5).operator == "fft"  # auto falls back (it looks for <= 8 factors)
    assert jaxcfl.make_problem(img, 5, max_rank=30).rank == 30  # a full factorisation, when asked for
    u, v = jaxcfl.pde.separable_factors(np.zeros((6, 7)))
    assert u.shape == (6, 1) and not u.any() and not v.any()
    prob = jaxcfl.make_problem(np.zeros((6, 7)), 3, operator="separable")
    np.testing.assert_array_equal(jaxcfl.pde.correlate(prob, jnp.ones((3, 3))), 0.0)


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.slow_in_float64
def test_correlation_adjoint_and_normal_operator_match_numpy_and_fft(rank, dtype):
    img = _low_rank(27, 22, rank, seed=rank)
    w = 6
    sep = jaxcfl.make_problem(img.astype(dtype), w, operator="separable")
    fft = jaxcfl.make_problem(img.astype(dtype), w, operator="fft")
    assert sep.rank == rank and fft.operator == "fft"
    rng = np.random.default_rng(1)
    kernel = rng.standard_normal((w, w))
    u = rng.standard_normal(sep.output_shape)
    tol = 1e-4 if dtype == jnp.float32 else 1e-11
    scale = np.abs(img).max() * w * w
    corr = np.asarray(jaxcfl.pde.correlate(sep, jnp.asarray(kernel, dtype)))
    np.testing.assert_allclose(corr, _np_correlate(img, kernel), rtol=0, atol=tol * scale)
    adj = np.asarray(jaxcfl.pde.correlate_adjoint(sep, jnp.asarray(u, dtype)))
    np.testing.assert_allclose(adj, _np_adjoint(img, u, w), rtol=0, atol=tol * np.abs(img).max() * u.size)
    normal_sep = np.asarray(jaxcfl.pde.normal_operator(sep, jnp.asarray(kernel, dtype)))
    normal_fft = np.asarray(jaxcfl.pde.normal_operator(fft, jnp.asarray(kernel, dtype)))
    reference = _np_adjoint(img, _np_correlate(img, kernel), w)
    np.testing.assert_allclose(normal_sep, reference, rtol=0, atol=tol * np.abs(reference).max() * 10)
    np.testing.assert_allclose(normal_fft, normal_sep, rtol=0, atol=tol * np.abs(reference).max() * 10)
    np.testing.assert_allclose(sep.window_sum, fft.window_sum)  # built by FFT either way


@pytest.mark.parametrize("model", ["nonlinear", "linear"])
def test_trajectories_and_vmap_agree_with_the_fft_path(model):
    img = np.asarray(jaxcfl.checkerboard(32), np.float32)
    sep = jaxcfl.make_problem(img, 8, operator="separable")
    fft = jaxcfl.make_problem(img, 8, operator="fft")
    k0 = 0.01 * jax.random.normal(jax.random.key(3), (8, 8))
    hypers = jaxcfl.make_hyper(np.array([1e-5, 2e-5, 4e-5]), np.array([20.0, 100.0, 1e3]))
    runs = {}
    for name, prob in (("sep", sep), ("fft", fft)):
        runs[name] = jaxcfl.integrate_many(prob, k0, hypers, scheme="gd", model=model, steps=50, record_every=10)
    np.testing.assert_allclose(runs["sep"].state.kernel, runs["fft"].state.kernel, rtol=1e-5, atol=1e-7)
    one = jaxcfl.integrate(sep, k0, jax.tree.map(lambda x: x[1], hypers), scheme="gd", model=model, steps=50,
                           record_every=10)
    np.testing.assert_allclose(runs["sep"].state.kernel[1], one.state.kernel, rtol=1e-6, atol=1e-8)


def test_operator_choice_and_errors():
    img = np.asarray(jaxcfl.checkerboard(32))
    assert jaxcfl.make_problem(img, 8, operator="fft").rank is None
    assert jaxcfl.make_problem(img, 8, operator="separable").rank == 1
    dense = jaxcfl.make_problem(img, 8, operator="dense")
    assert dense.operator == "dense" and dense.rank is None  # the dense matrix over FFT correlations
    assert jaxcfl.make_problem(img, 8, model="linear").operator == "separable"  # w^4 > 2 r^2 w^3 at r = 1, w = 8
    assert jaxcfl.make_problem(img[:, :31] + np.eye(32)[:, :31], 8, model="linear").operator == "dense"
    assert jaxcfl.make_problem(img, 8, model="nonlinear").operator == "separable"
    with pytest.raises(ValueError, match="operator='dense' applies to the linearised models only"):
        jaxcfl.make_problem(img, 8, operator="dense", model="nonlinear")
    with pytest.raises(ValueError, match="unknown operator 'gpu'"):
        jaxcfl.make_problem(img, 8, operator="gpu")
    with pytest.raises(ValueError, match="unknown model"):
        jaxcfl.make_problem(img, 8, model="quadratic")
    with pytest.raises(ValueError, match="max_rank"):
        jaxcfl.make_problem(np.random.default_rng(0).standard_normal((16, 16)), 4, operator="separable", max_rank=2)
    with pytest.raises(ValueError, match="max_rank"):
        jaxcfl.make_problem(img, 8, max_rank=0)
    with pytest.raises(ValueError, match="max_rank"):
        jaxcfl.pde.separable_factors(img, max_rank=0)
    # A traced image cannot be factorised on the host: auto falls back to the FFT, "separable" refuses.
    auto = jax.jit(lambda im: jaxcfl.pde.correlate(jaxcfl.make_problem(im, 8), jnp.ones((8, 8))))(img)
    np.testing.assert_allclose(auto, _np_correlate(img, np.ones((8, 8))), atol=1e-4)
    with pytest.raises(ValueError, match="traced"):
        jax.jit(lambda im: jaxcfl.make_problem(im, 8, operator="separable").image)(img)
    with pytest.raises(ValueError, match="factors must be"):
        jaxcfl.pde.with_separable_operator(jaxcfl.make_problem(img, 8, operator="fft"), np.ones((31, 1)), np.ones((32, 1)))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(8, 512), w_frac=st.floats(0.05, 1.0), rank=st.integers(1, 20))
def test_separable_pays_is_monotone_in_rank(n, w_frac, rank):
    w = max(1, int(n * w_frac))
    if jaxcfl.pde.separable_pays((n, n), w, rank + 1):
        assert jaxcfl.pde.separable_pays((n, n), w, rank)
    assert ops._cheapest_rank((n, n), w) >= (1 if jaxcfl.pde.separable_pays((n, n), w, 1) else 0)


def test_auto_picks_separable_for_the_paper_sizes_and_new_values_do_not_recompile():
    img = np.asarray(jaxcfl.checkerboard(256))
    for w in (16, 32, 64):
        assert jaxcfl.make_problem(img, w).operator == "separable"
    prob = jaxcfl.make_problem(np.asarray(jaxcfl.checkerboard(32)), 8)
    traces = []

    @jax.jit
    @jax.vmap
    def grads(hyper):
        traces.append(1)
        return jaxcfl.pde.gradient(prob, jnp.full((8, 8), 1e-3), hyper, "nonlinear")

    assert grads(jaxcfl.make_hyper(np.array([1e-3, 2e-3]), np.array([1.0, 2.0]))).shape == (2, 8, 8)
    grads(jaxcfl.make_hyper(np.array([5e-3, 1e-2]), np.array([3.0, 0.5]), beta=2.0, k=3.0))
    assert len(traces) == 1
