"""Extending jaxcfl: a right-hand side, a scheme, a step-size controller and a correlation back-end
defined here, in the test, registered nowhere, and run through the public entry points
(``jaxcfl.sweep``, ``jaxcfl.integrate``, ``jaxcfl.empirical_bounds``, ``jaxcfl.theory``) against
closed forms. This is what keeps docs/architecture.md's "to add X, touch Y" table true.

The problem is the "even checkerboard": a 13 x 13 checkerboard with a 4 x 4 kernel. Its valid
correlation is ``(C K)(x) = s(x) <K, S>`` (``s`` the image's sign pattern, ``S`` the kernel-sized
one), so ``C^T C = M^2 w^2 p p^T`` with ``p = S / w`` (unit) and ``M = 10``: one eigenvalue
``1600``, fifteen zeros; and ``Ibar = C^T 1 = 0`` (``M`` is even).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcfl
from jaxcfl import theory
from jaxcfl.pde import CFLController, Model, Scheme, Setup, get_model, get_scheme

W, M = 4, 10
C_T_C = M * M * W * W  # the one nonzero eigenvalue of C^T C
A, BETA = -0.5, 1.0


def _image():
    return jaxcfl.checkerboard(13)


def _pattern():
    return np.asarray(jaxcfl.checkerboard(W), np.float64) / W  # p, unit norm


# --- a right-hand side: the linearised model of an activation with r'(x) ~ 1 + beta x ----------------

def steep_gradient(problem, kernel, hyper):
    """``G = c a (Ibar + beta W C^T C W K) + alpha K``: eq 20's form with ``r0 = r1 = 1``."""
    data = problem.window_sum + hyper.beta * jaxcfl.pde.normal_operator(problem, kernel)
    return problem.pool_scale * hyper.a * data + hyper.alpha * kernel


STEEP = Model("steep_linear", steep_gradient, linearised=True, constant_residual=True, slope=1.0, bend=1.0)
L_MIN = A * BETA * C_T_C  # -800: the windowed operator's eigenvalue on p; 0 on the other 15 modes


# --- a scheme: the heavy ball, K+ = K + mu (K - K-) - dt G(K) ----------------------------------------

def heavy_ball_step(state, grad_fn, hyper, dt):
    g = grad_fn(state.kernel, hyper)
    new = state.kernel + hyper.mu * (state.kernel - state.previous) - jaxcfl.scaled_update(dt, g, hyper.k)
    return dataclasses.replace(state, kernel=new, previous=state.kernel, iteration=state.iteration + 1)


def heavy_ball_factor(x, mu):
    """Spectral radius of ``z^2 - (mu + x) z + mu`` (``x = 1 - dt l``)."""
    p = mu + np.asarray(x, np.float64)
    disc = np.sqrt((p * p - 4.0 * mu).astype(np.complex128))
    return np.maximum(np.abs((p + disc) / 2), np.abs((p - disc) / 2))


HEAVY_BALL = Scheme("heavy_ball", heavy_ball_step, lambda dt, mu: float(dt), lambda mu: 2.0 * (1.0 + mu),
                    heavy_ball_factor, uses_momentum=True)
DT, MU = 1e-3, 0.5
ALPHA_MAX = 2.0 * (1.0 + MU) / DT  # 3000: dt alpha < 2 (1 + mu) for the modes of eigenvalue alpha


def _worst_factor(alpha):
    return max(float(theory.growth_factor(alpha + lam, DT, scheme=HEAVY_BALL, momentum=MU)) for lam in (L_MIN, 0.0))


def test_the_new_values_are_not_registered():
    assert STEEP.name not in jaxcfl.MODELS and HEAVY_BALL.name not in jaxcfl.SCHEMES
    with pytest.raises(ValueError, match="model"):
        get_model("steep_linear")
    with pytest.raises(ValueError, match="scheme"):
        get_scheme("heavy_ball")
    assert get_model(STEEP) is STEEP and get_scheme(HEAVY_BALL) is HEAVY_BALL
    assert f"{HEAVY_BALL} on {STEEP}" == "heavy_ball on steep_linear"


def test_the_theory_of_the_new_scheme_and_model_is_their_closed_form():
    assert theory.step_size(HEAVY_BALL, DT, MU) == DT
    assert theory.stability_limit(HEAVY_BALL, DT, MU) == pytest.approx(ALPHA_MAX, rel=1e-15)
    for lam in (-300.0, 700.0, 2900.0, 3100.0):
        roots = np.roots([1.0, -(1.0 + MU - DT * lam), MU])
        assert float(theory.growth_factor(lam, DT, scheme=HEAVY_BALL, momentum=MU)) == pytest.approx(
            np.abs(roots).max(), rel=1e-12)
    assert HEAVY_BALL.dt_limit(ALPHA_MAX, MU) == pytest.approx(DT, rel=1e-15)
    # The windowed operator L: the Jacobian of G at K = 0 (jax.jvp of steep_gradient), by Lanczos.
    spectrum = theory.windowed_spectrum(_image(), W, model=STEEP, a=A, beta=BETA)
    assert spectrum.minimum == pytest.approx(L_MIN, rel=1e-10) and abs(spectrum.maximum) < 1e-9
    lo, hi = theory.windowed_alpha_bounds(_image(), W, DT, scheme=HEAVY_BALL, momentum=MU, model=STEEP, a=A, beta=BETA)
    assert lo == pytest.approx(-L_MIN, rel=1e-10) and hi == pytest.approx(ALPHA_MAX, rel=1e-10)
    # The non-windowed symbol from the model's facts (r1 = 1): c a beta |I(w)|^2, eq 23's form.
    power = np.abs(np.fft.fft2(np.asarray(_image(), np.float64))) ** 2
    np.testing.assert_allclose(theory.symbol(_image(), model=STEEP, a=A, beta=BETA), A * BETA * power, rtol=1e-13)


def test_integrate_steps_the_new_scheme_on_the_new_model_as_the_scalar_recursion():
    prob = jaxcfl.make_problem(_image(), W, model=STEEP)
    p = _pattern()
    other = np.zeros((W, W))
    other[0, 0] = other[0, 1] = 1 / np.sqrt(2)  # orthogonal to p
    alpha, steps = 1500.0, 30
    traj = jaxcfl.integrate(prob, 2.0 * p + 3.0 * other, jaxcfl.make_hyper(DT, alpha, a=A, beta=BETA, mu=MU),
                            scheme=HEAVY_BALL, model=STEEP, steps=steps, record_every=steps)
    kernel = np.asarray(traj.state.kernel, np.float64)
    for coef, vec, lam in ((2.0, p, alpha + L_MIN), (3.0, other, alpha)):
        prev = cur = coef
        for _ in range(steps):
            prev, cur = cur, cur + MU * (cur - prev) - DT * lam * cur
        assert float(np.sum(kernel * vec)) == pytest.approx(cur, rel=2e-4, abs=1e-6)


def test_sweep_classifies_the_new_scheme_on_the_new_model_as_the_theory_says():
    alphas = np.array([500.0, 1500.0, 2900.0, 3100.0])
    setup = Setup(model=STEEP, scheme=HEAVY_BALL, momentum=MU, a=A, beta=BETA)
    res = jaxcfl.sweep(_image(), W, DT, alphas, setup=setup, steps=200, record_points=50, progress=False)
    stable = (alphas > -L_MIN) & (alphas < ALPHA_MAX)
    assert list(res.status[0]) == ["stable" if s else "divergent" for s in stable]
    for j in np.flatnonzero(~stable):  # the measured growth is the theory's spectral radius
        assert res.metrics["growth_rate"][0, j] == pytest.approx(np.log(_worst_factor(alphas[j])), rel=0.02)
    spec = res.spec.to_dict()
    assert (spec["scheme"], spec["model"]) == ("heavy_ball", "steep_linear") and "safety" not in spec
    assert res.spec.setup is setup
    # The keywords give the same set-up; both at once is refused.
    same = jaxcfl.sweep(_image(), W, DT, alphas, model=STEEP, scheme=HEAVY_BALL, momentum=MU, a=A, beta=BETA, steps=200,
                        record_points=50, progress=False)
    np.testing.assert_array_equal(same.status, res.status)
    with pytest.raises(TypeError, match="momentum"):
        jaxcfl.sweep(_image(), W, DT, alphas, setup=setup, momentum=0.8)


@pytest.mark.slow
def test_empirical_bounds_of_the_new_scheme_and_model_are_the_closed_form():
    setup = Setup(model=STEEP, scheme=HEAVY_BALL, momentum=MU, a=A, beta=BETA)
    b = jaxcfl.empirical_bounds(_image(), W, DT, setup=setup, steps=200, alpha_range=(10.0, 1e5), initial_points=16,
                                candidates=7, rtol=1e-2)
    assert b.alpha_min == pytest.approx(-L_MIN, rel=0.02) and b.alpha_max == pytest.approx(ALPHA_MAX, rel=0.02)
    assert b.windowed == pytest.approx((-L_MIN, ALPHA_MAX), rel=1e-10) and b.paper is None
    assert (b.scheme, b.model) == ("heavy_ball", "steep_linear")


# --- a step-size controller on the new scheme: the CFL guard ---------------------------------------

GUARDED_HEAVY_BALL = dataclasses.replace(HEAVY_BALL, name="guarded_heavy_ball", controller=CFLController())


def test_the_cfl_controller_guards_the_new_scheme():
    """Under the guard ``dt_n = min(dt, safety S / lambda_n)`` with ``S = 2 (1 + mu)``: the runs
    that are unstable at the nominal step are stable, and the step is the closed form."""
    alphas, safety = np.array([3100.0, 5000.0]), 0.9
    setup = Setup(model=STEEP, scheme=GUARDED_HEAVY_BALL, momentum=MU, a=A, beta=BETA, safety=safety)
    assert setup.guarded and setup.to_dict()["safety"] == safety
    assert all(_worst_factor(alpha) > 1.0 for alpha in alphas)  # unstable at the nominal step
    res = jaxcfl.sweep(_image(), W, DT, alphas, setup=setup, steps=120, record_points=30, progress=False)
    assert list(res.status[0]) == ["stable", "stable"]
    lam = res.metrics["guard_lambda"][0]
    np.testing.assert_allclose(lam, alphas, rtol=1e-4)  # the top eigenvalue of G's Jacobian: alpha
    np.testing.assert_allclose(res.metrics["guard_lr"][0], safety * 2.0 * (1.0 + MU) / lam, rtol=1e-6)


def test_the_cfl_controller_needs_a_step_of_dt():
    with pytest.raises(ValueError, match="CFL controller"):
        dataclasses.replace(get_scheme("nesterov"), name="guarded_nesterov", controller=CFLController())
    with pytest.raises(TypeError, match="controller"):
        dataclasses.replace(HEAVY_BALL, controller="cfl")


# --- a correlation back-end: direct sums, given to a problem as a value ------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DirectOperator:
    """``C K`` and ``C^T u`` as sums over the ``w^2`` kernel offsets."""

    name: ClassVar[str] = "direct"
    image: jax.Array
    kernel_size: int = dataclasses.field(metadata=dict(static=True))

    def _windows(self):
        w = self.kernel_size
        m0, m1 = self.image.shape[0] - w + 1, self.image.shape[1] - w + 1
        return [((z0, z1), self.image[z0:z0 + m0, z1:z1 + m1]) for z0 in range(w) for z1 in range(w)]

    def correlate(self, kernel):
        return sum(kernel[z] * shifted for z, shifted in self._windows())

    def adjoint(self, u):
        w = self.kernel_size
        return jnp.stack([jnp.sum(u * shifted) for _, shifted in self._windows()]).reshape(w, w)

    def normal(self, kernel):
        return self.adjoint(self.correlate(kernel))

    def map_batch(self, linearised):
        return None


def test_a_new_back_end_steps_like_the_fft_one():
    img = jnp.asarray(np.random.default_rng(0).standard_normal((11, 12)), jnp.float32)
    fft = jaxcfl.make_problem(img, W, operator="fft", pool="mean")
    direct = dataclasses.replace(fft, backend=DirectOperator(img, W))
    assert direct.operator == "direct" and direct.kernel_size == W
    k0 = jax.random.normal(jax.random.key(0), (W, W))
    hyper = jaxcfl.make_hyper(0.05, 1.0)
    runs = [jaxcfl.integrate(prob, k0, hyper, model="nonlinear", steps=25, record_every=5) for prob in (fft, direct)]
    np.testing.assert_allclose(runs[1].state.kernel, runs[0].state.kernel, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(runs[1].diagnostics.loss, runs[0].diagnostics.loss, rtol=1e-5)


# --- a step-size controller of one's own -------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class HalfStep:
    """``dt_n = dt / 2``: no state to keep, nothing to refresh."""

    adaptive: ClassVar[bool] = False

    def init(self, state, grad_fn, hyper):
        return state

    def refresh(self, state, grad_fn, hyper, iteration, each):
        return state

    def step_size(self, state, hyper, limit):
        return hyper.lr * 0.5, state

    def with_schedule(self, schedule):
        return self


def test_solve_takes_the_step_its_controller_gives():
    from jaxcfl.pde import _integration as integration

    prob = jaxcfl.make_problem(_image(), W, model=STEEP)
    state = jaxcfl.pde.init(jnp.asarray(_pattern() + 0.1, jnp.float32))
    hyper = jaxcfl.make_hyper(DT, 1500.0, a=A, beta=BETA, mu=MU)
    solve = lambda h, **kw: integration.solve(prob, state, h, scheme=HEAVY_BALL, model=STEEP, steps=20,
                                              save=integration.SaveAt(5), **kw)
    halved = solve(hyper, controller=HalfStep())
    plain = solve(dataclasses.replace(hyper, lr=hyper.lr * 0.5))  # dt / 2 is exact: the same run, bit for bit
    assert np.asarray(halved.state.kernel).tobytes() == np.asarray(plain.state.kernel).tobytes()
    half_ball = dataclasses.replace(HEAVY_BALL, name="half_ball", controller=HalfStep())
    again = integration.solve(prob, state, hyper, scheme=half_ball, model=STEEP, steps=20, save=integration.SaveAt(5))
    assert np.asarray(again.state.kernel).tobytes() == np.asarray(plain.state.kernel).tobytes()
