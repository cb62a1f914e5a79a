import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

import jaxcfl


def _image(n0=20, n1=23, seed=0):
    return np.random.default_rng(seed).standard_normal((n0, n1))


def _np_correlate(image, kernel):
    windows = sliding_window_view(image, kernel.shape)
    return np.einsum("xyij,ij->xy", windows, kernel)


def _np_adjoint(image, u, w):
    windows = sliding_window_view(image, u.shape)  # (w, w, M0, M1) after slicing
    return np.einsum("ijxy,xy->ij", windows[:w, :w], u)


def test_correlation_matches_numpy_valid_correlation(dtype):
    img = _image()
    prob = jaxcfl.make_problem(img.astype(dtype), 5)
    kernel = np.random.default_rng(1).standard_normal((5, 5))
    out = np.asarray(jaxcfl.pde.correlate(prob, jnp.asarray(kernel, dtype)))
    assert out.shape == (16, 19) == prob.output_shape
    tol = 1e-4 if dtype == jnp.float32 else 1e-11
    np.testing.assert_allclose(out, _np_correlate(img, kernel), atol=tol * 10, rtol=tol)


def test_adjoint_matches_numpy_and_is_the_transpose(dtype):
    img = _image()
    prob = jaxcfl.make_problem(img.astype(dtype), 6)
    rng = np.random.default_rng(2)
    u = rng.standard_normal(prob.output_shape)
    kernel = rng.standard_normal((6, 6))
    adj = np.asarray(jaxcfl.pde.correlate_adjoint(prob, jnp.asarray(u, dtype)))
    tol = 1e-4 if dtype == jnp.float32 else 1e-11
    np.testing.assert_allclose(adj, _np_adjoint(img, u, 6), atol=tol * 10, rtol=tol)
    lhs = np.sum(np.asarray(jaxcfl.pde.correlate(prob, jnp.asarray(kernel, dtype))) * u)
    np.testing.assert_allclose(lhs, np.sum(kernel * adj), rtol=tol * 10)


def test_window_sum_is_adjoint_of_ones():
    img = _image()
    prob = jaxcfl.make_problem(img, 4)
    np.testing.assert_allclose(prob.window_sum, _np_adjoint(img, np.ones(prob.output_shape), 4), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("pool", ["sum", "mean"])
@pytest.mark.parametrize("image, operator", [("random", "fft"), ("checkerboard", "separable")])
@pytest.mark.slow_in_float64
def test_nonlinear_gradient_equals_autodiff_of_loss(pool, image, operator, dtype):
    img = _image(18, 18) if image == "random" else np.asarray(jaxcfl.checkerboard(18), np.float64)
    prob = jaxcfl.make_problem(img.astype(dtype), 7, pool=pool, operator=operator)
    kernel = jnp.asarray((0.1 if image == "random" else 0.05) * np.random.default_rng(0).standard_normal((7, 7)), dtype)
    hyper = jaxcfl.make_hyper(1e-3, 0.7, beta=1.3, bias=0.2, label=0.0, dtype=dtype)
    # Compiled: one program per function instead of one per operation (op by op, the first call of each
    # shape and dtype compiles about a hundred small programs).
    gradient = jax.jit(jaxcfl.pde.gradient, static_argnums=3)
    ours = gradient(prob, kernel, hyper, "nonlinear")
    auto = jax.jit(jax.grad(lambda k, p, h: jaxcfl.pde.loss(p, k, h)))(kernel, prob, hyper)
    rtol = 2e-4 if dtype == jnp.float32 else 1e-10
    atol = rtol * float(jnp.abs(auto).max())
    np.testing.assert_allclose(ours, auto, rtol=rtol, atol=atol)
    fft = jaxcfl.make_problem(img.astype(dtype), 7, pool=pool, operator="fft")
    np.testing.assert_allclose(ours, gradient(fft, kernel, hyper, "nonlinear"), rtol=rtol, atol=atol)


def test_loss_matches_numpy_forward():
    img = _image(12, 12)
    prob = jaxcfl.make_problem(img, 3)
    kernel = np.random.default_rng(3).standard_normal((3, 3)) * 0.2
    hyper = jaxcfl.make_hyper(1e-3, 0.5, beta=2.0, bias=-0.1, label=1.0)
    z = _np_correlate(img, kernel)
    swish = z / (1 + np.exp(-2.0 * z))
    yhat = 1 / (1 + np.exp(-(swish.sum() - 0.1)))
    expected = -np.log(yhat) + 0.25 * np.sum(kernel**2)
    np.testing.assert_allclose(jaxcfl.pde.loss(prob, jnp.asarray(kernel, jnp.float32), hyper), expected, rtol=1e-5)


def test_linear_models_are_the_linearisations_of_the_nonlinear_one():
    with jax.enable_x64(True):
        prob = jaxcfl.make_problem(_image(16, 16), 5, pool="mean")
        hyper = jaxcfl.make_hyper(1e-3, 0.3, beta=1.7, bias=0.4, label=1.0, dtype=jnp.float64)
        s_b = 1 / (1 + np.exp(-0.4))
        zero = jnp.zeros((5, 5))
        direction = jnp.asarray(np.random.default_rng(1).standard_normal((5, 5)), jnp.float64)
        # Compiled, one program per model (op by op, the first calls compile about a hundred small programs).
        gradient = jax.jit(jaxcfl.pde.gradient, static_argnums=3)
        jvp = jax.jit(lambda h, m: jax.jvp(lambda k: jaxcfl.pde.gradient(prob, k, h, m), (zero,), (direction,))[1],
                      static_argnums=1)
        # eq 29: the Jacobian of the nonlinear gradient at K = 0 is the nonconstant model's.
        jac = lambda m: jvp(hyper, m)
        np.testing.assert_allclose(jac("nonlinear"), jac("nonconstant"), rtol=1e-10, atol=1e-14)
        # eq 20 with a = s(b) - y is the nonconstant model without its rank-one term.
        h_lin = jaxcfl.make_hyper(1e-3, 0.3, beta=1.7, a=s_b - 1.0, bias=0.4, dtype=jnp.float64)
        c = prob.pool_scale
        rank_one = 0.25 * c * c * s_b * (1 - s_b) * prob.window_sum * jnp.sum(prob.window_sum * direction)
        np.testing.assert_allclose(jvp(h_lin, "linear") + rank_one, jac("nonconstant"), rtol=1e-10, atol=1e-14)
        # At K = 0 the constant term of every linearisation is the nonlinear gradient.
        for model in ("linear", "nonconstant"):
            hyp = h_lin if model == "linear" else hyper
            np.testing.assert_allclose(gradient(prob, zero, hyp, model), gradient(prob, zero, hyper, "nonlinear"), rtol=1e-12)


def test_activated_regime_matches_the_nonlinear_gradient_for_large_positive_response():
    # With K * I >> 0 everywhere, r'(K*I) = 1 and the nonlinear data term is c (yhat - y) Ibar (eq 34).
    with jax.enable_x64(True):
        img = np.abs(_image(10, 10)) + 1.0
        prob = jaxcfl.make_problem(img, 3)
        kernel = jnp.full((3, 3), 5.0)
        hyper = jaxcfl.make_hyper(1e-3, 0.0, beta=5.0, label=1.0)
        g = jaxcfl.pde.gradient(prob, kernel, hyper, "nonlinear")
        yhat = jax.nn.sigmoid(jaxcfl.pde._rhs.logit(prob, kernel, hyper))
        np.testing.assert_allclose(g, (yhat - 1.0) * prob.window_sum, rtol=1e-8)


def test_linear_gradient_closed_form_on_checkerboard():
    # For the checkerboard, C^T C K = M^2 <P, K> P with P the kernel-sized checkerboard.
    prob = jaxcfl.make_problem(jaxcfl.checkerboard(12, dtype=jnp.float32), 4)
    m = prob.output_shape[0]
    pattern = np.asarray(jaxcfl.checkerboard(4))
    kernel = np.random.default_rng(4).standard_normal((4, 4)).astype(np.float32)
    got = np.asarray(jaxcfl.pde._problem.normal_operator(prob, jnp.asarray(kernel)))
    np.testing.assert_allclose(got, m * m * np.sum(pattern * kernel) * pattern, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    "image, match",
    [
        (np.zeros(5), "2-D"),
        (np.zeros((3, 3, 3)), "2-D"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), "finite"),
        (np.array([[1.0, np.inf], [0.0, 1.0]]), "finite"),
    ],
)
def test_bad_images_are_rejected(image, match):
    with pytest.raises(ValueError, match=f"image.*{match}|{match}.*image"):
        jaxcfl.make_problem(image, 1)


def test_kernel_larger_than_image_is_rejected():
    with pytest.raises(ValueError, match="kernel_size"):
        jaxcfl.make_problem(np.zeros((8, 10)), 9)


def test_unknown_pool_and_model_are_rejected():
    with pytest.raises(ValueError, match="pool"):
        jaxcfl.make_problem(np.zeros((8, 8)), 2, pool="max")
    with pytest.raises(ValueError, match="model"):
        jaxcfl.pde.gradient_fn("quadratic")


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(lr=-1.0, alpha=1.0), "lr"),
        (dict(lr=0.0, alpha=1.0), "lr"),
        (dict(lr=float("nan"), alpha=1.0), "lr"),
        (dict(lr=float("inf"), alpha=1.0), "lr"),
        (dict(lr=[1e-3, -1e-3], alpha=1.0), "lr"),
        (dict(lr=1e-3, alpha=-1.0), "alpha"),
        (dict(lr=1e-3, alpha=1.0, k=0.0), "k"),
        (dict(lr=1e-3, alpha=1.0, k=-3.0), "k"),
        (dict(lr=1e-3, alpha=1.0, mu=1.0), "mu"),
        (dict(lr=1e-3, alpha=1.0, mu=-0.1), "mu"),
        (dict(lr=1e-3, alpha=1.0, beta=float("nan")), "beta"),
    ],
)
def test_bad_hyperparameters_are_rejected(kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        jaxcfl.make_hyper(**kwargs)


def test_hyper_broadcasts_fields():
    h = jaxcfl.make_hyper(jnp.array([1e-3, 2e-3]), 1.0, k=3.0)
    assert h.lr.shape == h.alpha.shape == h.k.shape == (2,)


def test_wrong_kernel_shape_is_rejected():
    prob = jaxcfl.make_problem(np.zeros((8, 8)), 3)
    with pytest.raises(ValueError, match="kernel"):
        jaxcfl.integrate(prob, np.zeros((4, 4)), jaxcfl.make_hyper(1e-3, 1.0), steps=2)
