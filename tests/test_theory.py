"""Theory against closed forms, dense NumPy spectra, the paper, and the steppers themselves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

import jaxcfl
from jaxcfl.pde import _theory as theory
from jaxcfl._core.spectral import lanczos_extremes

CHECKER = np.asarray(jaxcfl.checkerboard(256), np.float64)


# --- the paper's own numbers (appendix E, Table 5) ---------------------------------------

def test_paper_bounds_reproduce_table5_theory_columns():
    lo, hi = theory.alpha_bounds(CHECKER, 1e-4, a=-0.5, beta=1.0, scheme="nesterov", momentum=0.9)
    assert lo == pytest.approx(1.07e9, rel=5e-3)  # paper: alpha_min = 1.07e9
    assert hi == pytest.approx(1.33e8, rel=5e-3)  # paper: alpha_max = 1.33e8
    lo, hi = theory.alpha_bounds(CHECKER, 1e-8, scheme="gd")
    assert lo == pytest.approx(0.25 * 256.0**4)
    assert hi == pytest.approx(2e8)


@pytest.mark.parametrize(
    "w, paper_min",
    [(16, 3.9e6), (32, 1.3e7), pytest.param(64, 3.9e7, marks=pytest.mark.slow)],
)
def test_windowed_bounds_match_table5_empirical_columns(w, paper_min):
    # The paper found these by trial: alpha_min 3.9e6 / 1.3e7 / 3.9e7, alpha_max 1.42e8.
    lo, hi = theory.windowed_alpha_bounds(CHECKER, w, 1e-4, scheme="nesterov", momentum=0.9)
    assert lo == pytest.approx(paper_min, rel=0.06)
    assert hi == pytest.approx(1.42e8, rel=0.01)
    # Closed form for the checkerboard: C^T C is rank one with eigenvalue (N - w + 1)^2 w^2.
    assert lo == pytest.approx(0.25 * (256 - w + 1) ** 2 * w**2, rel=1e-9)
    assert hi == pytest.approx(4.0 / (2.8 * 1e-8), rel=1e-9)


# --- spectra against dense NumPy ---------------------------------------------------------------

def _dense_operator(img, w, model, a=-0.5, beta=1.0, label=1.0, bias=0.0, pool="sum"):
    windows = sliding_window_view(img, (w, w)).reshape(-1, w * w)
    c = 1.0 if pool == "sum" else 1.0 / windows.shape[0]
    ibar = windows.sum(axis=0)
    s_b = 1 / (1 + np.exp(-bias))
    ctc = windows.T @ windows
    if model == "linear":
        return 0.5 * c * a * beta * ctc
    if model == "activated":
        return 0.5 * c * c * s_b * (1 - s_b) * np.outer(ibar, ibar)
    return 0.5 * c * (s_b - label) * beta * ctc + 0.25 * c * c * s_b * (1 - s_b) * np.outer(ibar, ibar)


@pytest.mark.parametrize("model, pool", [
    ("linear", "sum"), ("nonconstant", "mean"), ("activated", "sum"), ("nonlinear", "mean"), ("nonlinear", "sum"),
    *(pytest.param(m, p, marks=pytest.mark.slow) for m, p in [("linear", "mean"), ("nonconstant", "sum"),
                                                               ("activated", "mean")])])
def test_windowed_spectrum_matches_dense_eigenvalues(model, pool):
    img = np.random.default_rng(0).standard_normal((15, 13))
    ext = theory.windowed_spectrum(img, 4, model=model, a=-0.7, beta=1.3, bias=0.3, label=1.0, pool=pool)
    eig = np.linalg.eigvalsh(_dense_operator(img, 4, model, a=-0.7, beta=1.3, bias=0.3, pool=pool))
    scale = np.abs(eig).max()
    assert ext.minimum == pytest.approx(eig[0], abs=1e-9 * scale)
    assert ext.maximum == pytest.approx(eig[-1], abs=1e-9 * scale)


def test_lanczos_against_numpy_and_its_residual_bound():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((80, 80)))
    eig = np.concatenate([[-5.0], np.linspace(-1, 1, 78), [7.0]])
    mat = (q * eig) @ q.T
    with jax.enable_x64(True):
        matvec = jax.tree_util.Partial(jnp.dot, jnp.asarray(mat))
        start = jnp.asarray(rng.standard_normal(80))
        exact = lanczos_extremes(matvec, start, iterations=80)
        assert exact.minimum == pytest.approx(-5.0, abs=1e-10) and exact.maximum == pytest.approx(7.0, abs=1e-10)
        partial = lanczos_extremes(matvec, start, iterations=12)
        assert abs(partial.maximum - 7.0) <= partial.residual_max + 1e-12
        assert abs(partial.minimum + 5.0) <= partial.residual_min + 1e-12


def test_lanczos_handles_breakdown_on_low_rank_operators():
    v = np.zeros(30)
    v[3] = 2.0
    with jax.enable_x64(True):
        matvec = jax.tree_util.Partial(lambda u, x: u * jnp.dot(u, x), jnp.asarray(v))
        ext = lanczos_extremes(matvec, jnp.ones(30), iterations=30)
    assert ext.maximum == pytest.approx(4.0) and ext.minimum == pytest.approx(0.0, abs=1e-12)


def test_lanczos_rejects_bad_arguments():
    with pytest.raises(ValueError, match="iterations"):
        lanczos_extremes(lambda x: x, jnp.ones(4), iterations=5)
    with pytest.raises(ValueError, match="start"):
        lanczos_extremes(lambda x: x, jnp.ones((2, 2)))


# --- amplifiers and growth factors ---------------------------------------------------------------

def test_amplifier_is_eq23():
    img = np.random.default_rng(2).standard_normal((8, 8))
    amp = theory.amplifier(img, 1e-3, 4.0, a=-0.5, beta=2.0)
    np.testing.assert_allclose(amp, 1 - 1e-3 * (4.0 - 0.5 * np.abs(np.fft.fft2(img)) ** 2))


def test_nesterov_growth_factor_is_the_companion_spectral_radius():
    lam = np.linspace(-50.0, 3000.0, 101)
    dt, mu = 0.03, 0.8
    got = theory.growth_factor(lam, dt, scheme="nesterov", momentum=mu)
    h = (1 + mu) * dt * dt / 2
    for value, g in zip(lam, got):
        x = 1 - h * value
        comp = np.array([[x * (1 + mu), -x * mu], [1.0, 0.0]])
        assert g == pytest.approx(np.abs(np.linalg.eigvals(comp)).max(), rel=1e-10)
    limit = theory.stability_limit("nesterov", dt, mu)
    assert np.all((got < 1) == ((lam > 0) & (lam < limit)))


def test_paper_dt_bound_is_where_the_amplifier_crosses_one():
    img = np.random.default_rng(3).standard_normal((16, 16))
    alpha = 1.2 * theory.alpha_bounds(img, 1.0, a=-0.5, beta=1.0).alpha_min
    dt = theory.dt_bound(img, alpha, a=-0.5, beta=1.0)
    assert np.abs(theory.amplifier(img, dt * 0.999, alpha)).max() < 1
    assert np.abs(theory.amplifier(img, dt * 1.001, alpha)).max() > 1
    assert theory.dt_bound(img, 0.0, a=-0.5) == 0.0  # below the lower bound no dt is stable
    dt_n = theory.dt_bound(img, alpha, scheme="nesterov")
    lo, hi = theory.alpha_bounds(img, dt_n, scheme="nesterov")
    assert hi == pytest.approx(alpha, rel=1e-9)


def test_nonconstant_symbol_eq31():
    img = np.random.default_rng(4).standard_normal((6, 6)) + 0.5
    sym = theory.symbol(img, model="nonconstant", beta=2.0, bias=0.0, label=1.0)
    power = np.abs(np.fft.fft2(img)) ** 2
    expected = 0.5 * (0.5 - 1.0) * 2.0 * power
    expected[0, 0] += 0.25 * 0.25 * power[0, 0] * 36
    np.testing.assert_allclose(sym, expected)


def test_activated_bounds_agree_with_the_windowed_spectrum():
    img = np.random.default_rng(5).standard_normal((12, 12)) + 0.2
    for scheme in ("gd", "nesterov"):
        lo, hi = theory.activated_alpha_bounds(img, 1e-2, kernel_size=4, scheme=scheme, bias=0.3)
        wlo, whi = theory.windowed_alpha_bounds(img, 4, 1e-2, model="activated", scheme=scheme, bias=0.3)
        assert hi == pytest.approx(whi, rel=1e-10)
        assert wlo == pytest.approx(0.0, abs=1e-6 * abs(lo))  # modes orthogonal to Ibar need alpha > 0
        assert lo < 0
    lo, hi = theory.activated_alpha_bounds(CHECKER[:8, :8] + 1.0, 0.1)
    assert hi == pytest.approx(20.0 - 0.125 * 64 * 64.0**2)


def test_multilayer_bound_eq51():
    assert theory.multilayer_lr_bound(100.0) == pytest.approx(0.02)
    assert theory.multilayer_lr_bound(100.0, 50.0) == pytest.approx(2 / 150)
    with pytest.raises(ValueError, match="alpha"):
        theory.multilayer_lr_bound(0.0)


# --- the bounds against the steppers: just inside is stable, just outside is not -------------

def _growth(prob, kernels, hyper, scheme, model, steps):
    """||K_n - K'_n|| / ||K_0 - K'_0|| for two initial kernels, per configuration of ``hyper``."""
    run = lambda h, k: jaxcfl.integrate(prob, k, h, scheme=scheme, model=model, steps=steps, record_every=steps).state.kernel
    both = jax.vmap(lambda h: jax.vmap(lambda k: run(h, k))(kernels))(hyper)
    diff = np.asarray(both[:, 0] - both[:, 1], np.float64)
    ratio = np.linalg.norm(diff.reshape(len(diff), -1), axis=1) / float(jnp.linalg.norm(kernels[0] - kernels[1]))
    return np.where(np.isfinite(ratio), ratio, np.inf)


def _step_for(scheme, alpha_min, momentum=0.9):
    # lr putting the stability limit S/h at three times alpha_min.
    target = 3.0 * alpha_min
    return 2.0 / target if scheme == "gd" else float(np.sqrt(4.0 / ((1 + 2 * momentum) * target)))


# Every pair of (dtype, image, scheme) values runs by default (a half fraction of the 2 x 2 x 2 design:
# each scheme on each image, each image and each scheme in each dtype); -m slow adds the other half.
@pytest.mark.parametrize(
    "dtype, image, scheme",
    [("float32", "checkerboard", "gd"), ("float32", "random", "nesterov"), ("float64", "checkerboard", "nesterov"),
     ("float64", "random", "gd"),
     pytest.param("float32", "checkerboard", "nesterov", marks=pytest.mark.slow),
     pytest.param("float32", "random", "gd", marks=pytest.mark.slow),
     pytest.param("float64", "checkerboard", "gd", marks=pytest.mark.slow),
     pytest.param("float64", "random", "nesterov", marks=pytest.mark.slow)],
    indirect=["dtype"],
)
def test_windowed_bounds_separate_stable_from_unstable_runs(scheme, image, dtype):
    if image == "checkerboard":
        img, w = np.asarray(jaxcfl.checkerboard(32), np.float64), 8
    else:
        img, w = np.random.default_rng(6).standard_normal((24, 24)), 5
    spectrum = theory.windowed_spectrum(img, w)
    lr = _step_for(scheme, -spectrum.minimum)
    lo, hi = theory.windowed_alpha_bounds(img, w, lr, scheme=scheme)
    eps = 0.05
    alphas = np.array([lo * (1 + eps), lo * (1 - eps), hi * (1 - eps), hi * (1 + eps)])
    prob = jaxcfl.make_problem(img.astype(dtype), w)
    kernels = jnp.asarray(np.random.default_rng(0).standard_normal((2, w, w)), dtype)  # NumPy: no sampler to compile
    ratio = _growth(prob, kernels, jaxcfl.make_hyper(lr, alphas, dtype=dtype), scheme, "linear", steps=400)
    inside, outside = ratio[[0, 2]], ratio[[1, 3]]
    assert np.all(inside < 0.05), (lo, hi, ratio)
    assert np.all(outside > 20.0), (lo, hi, ratio)


def test_activated_upper_bound_separates_stable_from_unstable_runs(dtype):
    img = np.random.default_rng(7).standard_normal((16, 16)) + 0.3
    w = 4
    q = -theory.activated_alpha_bounds(img, 1.0, kernel_size=w).alpha_min
    lr = 2.0 / (3.0 * q)  # stability limit 2/lr = 3q: alpha_max = 2q
    lo, hi = theory.windowed_alpha_bounds(img, w, lr, model="activated")
    assert hi == pytest.approx(2 * q, rel=1e-9)
    prob = jaxcfl.make_problem(img.astype(dtype), w)
    kernels = jnp.stack([jnp.zeros((w, w), dtype), jnp.asarray(np.random.default_rng(1).standard_normal((w, w)), dtype)])
    ratio = _growth(prob, kernels, jaxcfl.make_hyper(lr, [hi * 0.97, hi * 1.03], dtype=dtype), "gd", "activated", 400)
    assert ratio[0] < 0.05 and ratio[1] > 20.0, ratio


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: theory.alpha_bounds(CHECKER, -1.0), "lr"),
        (lambda: theory.alpha_bounds(CHECKER, float("nan")), "lr"),
        (lambda: theory.alpha_bounds(CHECKER, 1e-4, scheme="adam"), "scheme"),
        (lambda: theory.alpha_bounds(CHECKER, 1e-4, scheme="nesterov", momentum=1.0), "momentum"),
        (lambda: theory.alpha_bounds(np.zeros(5), 1e-4), "image"),
        (lambda: theory.windowed_alpha_bounds(CHECKER[:8, :8], 9, 1e-4), "kernel_size"),
        (lambda: theory.windowed_alpha_bounds(CHECKER[:8, :8], 3, 1e-4, model="quadratic"), "model"),
        (lambda: theory.windowed_alpha_bounds(CHECKER[:8, :8], 3, 1e-4, pool="max"), "pool"),
        (lambda: theory.amplifier(CHECKER, 0.0, 1.0), "lr"),
    ],
)
def test_theory_rejects_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- the scheme's and the model's facts, not their names (issue 21) ---------------------------

def test_dt_bound_of_the_guarded_scheme_is_forward_eulers():
    img = np.random.default_rng(3).standard_normal((16, 16))
    alpha = 1.2 * theory.alpha_bounds(img, 1.0, a=-0.5, beta=1.0).alpha_min
    gd = theory.dt_bound(img, alpha, scheme="gd")
    guarded = theory.dt_bound(img, alpha, scheme="guarded_gd")
    nesterov = theory.dt_bound(img, alpha, scheme="nesterov")
    assert guarded == gd == theory.dt_bound(img, alpha, scheme="euler")
    assert guarded != pytest.approx(nesterov, rel=1e-3)
    # eq 25: dt < 2 / (alpha + max l), and eq 45 for Nesterov: dt < 2 / sqrt(3 (alpha + max l)).
    top = alpha + theory.symbol(img, a=-0.5, beta=1.0).max()
    assert gd == pytest.approx(2.0 / top, rel=1e-12)
    assert nesterov == pytest.approx(2.0 / np.sqrt(3.0 * top), rel=1e-12)
    assert theory.dt_bound(img, 0.0, scheme="guarded_gd") == 0.0
    # The paper's alpha bounds: forward Euler's for the guarded scheme too.
    assert theory.alpha_bounds(img, 1e-3, scheme="guarded_gd") == theory.alpha_bounds(img, 1e-3, scheme="gd")
    with pytest.raises(ValueError, match="scheme"):
        theory.dt_bound(img, alpha, scheme="adam")


@pytest.mark.parametrize("scheme", ["gd", "nesterov", "guarded_gd"])
@pytest.mark.parametrize("mu", [0.0, 0.9])
def test_dt_limit_is_the_root_of_the_stability_limit(scheme, mu):
    from jaxcfl.pde._schemes import get_scheme

    sch, lam = get_scheme(scheme), 3.7e4
    dt = sch.dt_limit(lam, mu)
    assert sch.step_size(dt, mu) * lam == pytest.approx(sch.limit(mu), rel=1e-12)
    assert theory.stability_limit(scheme, dt, mu) == pytest.approx(lam, rel=1e-12)


def test_symbol_of_every_model_matches_its_closed_form():
    img = np.random.default_rng(4).standard_normal((6, 7)) + 0.5
    power = np.abs(np.fft.fft2(img)) ** 2
    a, beta, label, bias = -0.3, 2.0, 1.0, 0.4
    s_b = 1.0 / (1.0 + np.exp(-bias))
    delta = np.zeros_like(power)
    delta[0, 0] = img.size
    rank_one = 0.25 * s_b * (1 - s_b) * power[0, 0] * delta
    sym = lambda model: theory.symbol(img, model=model, a=a, beta=beta, label=label, bias=bias)
    np.testing.assert_allclose(sym("linear"), 0.5 * a * beta * power, rtol=1e-13)  # eq 23
    np.testing.assert_allclose(sym("nonconstant"), 0.5 * (s_b - label) * beta * power + rank_one, rtol=1e-13)  # eq 31
    np.testing.assert_allclose(sym("activated"), 2.0 * rank_one, rtol=1e-13, atol=0)  # eq 35
    np.testing.assert_array_equal(sym("nonlinear"), sym("nonconstant"))  # its linearisation at K = 0


def test_the_theory_takes_scheme_and_model_values_as_their_names():
    from jaxcfl.pde import get_model, get_scheme

    img = np.asarray(jaxcfl.checkerboard(16), np.float64)
    for scheme in jaxcfl.SCHEMES:
        sch = get_scheme(scheme)
        assert theory.stability_limit(sch, 1e-3, 0.8) == theory.stability_limit(scheme, 1e-3, 0.8)
        assert theory.alpha_bounds(img, 1e-4, scheme=sch) == theory.alpha_bounds(img, 1e-4, scheme=scheme)
        assert theory.dt_bound(img, 1e3, scheme=sch) == theory.dt_bound(img, 1e3, scheme=scheme)
    for model in jaxcfl.MODELS:
        np.testing.assert_array_equal(theory.symbol(img, model=get_model(model)), theory.symbol(img, model=model))
    by_value = theory.windowed_alpha_bounds(img, 4, 1e-4, scheme=get_scheme("nesterov"), model=get_model("nonconstant"))
    assert by_value == theory.windowed_alpha_bounds(img, 4, 1e-4, scheme="nesterov", model="nonconstant")
