"""The CFL guard on the PDE (issue 13, item 2): the ``guarded_gd`` scheme in ``integrate`` and
``sweep``, and ``jaxcfl reproduce pde-guard`` at a small size (the full set-up is slow)."""

from __future__ import annotations

import contextlib
import io

import _strict_json as strict_json
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcfl
from jaxcfl import cli
from jaxcfl.pde import _integration as integration
from jaxcfl.pde import _theory as theory
from jaxcfl.experiments import EXPERIMENTS, pde_guard
from jaxcfl._core.stability import guarded_step_size
from jaxcfl.pde._schemes import GuardSchedule

IMAGE = np.asarray(jaxcfl.checkerboard(32), np.float64)
W = 8


def _kernel(w: int = W, seed: int = 0):
    return jax.random.normal(jax.random.key(seed), (w, w))


@pytest.fixture(scope="module")
def linear():
    """The linear model with ``a > 0`` (``L`` positive semi-definite), its spectrum in float64."""
    a = 0.5
    problem = jaxcfl.make_problem(IMAGE, W, operator="fft")
    spectrum = theory.windowed_spectrum(IMAGE, W, model="linear", a=a)
    return problem, a, spectrum


STEPS, EVERY = 60, 20  # one compiled program per scheme for every linear test (new numbers never recompile)


def _run(problem, scheme, hyper, kernel=None):
    return jaxcfl.integrate(problem, _kernel() if kernel is None else kernel, hyper, scheme=scheme, steps=STEPS,
                            record_every=EVERY)


def test_the_estimate_is_the_theory_top_eigenvalue_on_the_linear_model(linear):
    # The Jacobian of the linear model's gradient is L + alpha everywhere: lambda_n = alpha + l_max(L),
    # the number jaxcfl.pde._theory computes (float64 Lanczos from K = 0) for the windowed bounds.
    problem, a, spectrum = linear
    alpha = 3.0
    hyper = jaxcfl.make_hyper(1e-4, alpha, a=a)
    traj = _run(problem, "guarded_gd", hyper)
    curvature = np.asarray(traj.diagnostics.curvature)
    np.testing.assert_allclose(curvature, alpha + spectrum.maximum, rtol=2e-5)


def test_the_guarded_step_is_the_limit_times_safety_and_stabilises_beyond_the_cfl_bound(linear):
    problem, a, spectrum = linear
    alpha = 3.0
    lam = alpha + spectrum.maximum
    lr = 1.5 * 2 / lam  # beyond the CFL bound: forward Euler diverges
    run = lambda scheme, lr, safety: _run(problem, scheme, jaxcfl.make_hyper(lr, alpha, a=a, safety=safety))
    plain = run("gd", lr, 0.9)
    update = np.asarray(plain.diagnostics.update_norm)
    assert update[-1] > 1e6 * update[1]  # |1 - lr lambda| = 2: the top mode doubles every step
    for safety in (0.5, 0.9, 1.0):
        guarded = run("guarded_gd", lr, safety)
        step = float(guarded.diagnostics.step_size[-1])
        assert step == pytest.approx(safety * 2 / float(guarded.diagnostics.curvature[-1]), rel=1e-6)
        assert step == pytest.approx(safety * 2 / lam, rel=2e-5)
        if safety < 1:  # strictly inside: it is forward Euler at that step, and stable
            reference = run("gd", step, 0.9)
            np.testing.assert_allclose(guarded.state.kernel, reference.state.kernel, rtol=1e-4, atol=1e-6)
            assert np.all(np.diff(np.asarray(guarded.diagnostics.update_norm)[1:]) < 0)  # the deviation decays


def test_a_step_inside_the_limit_is_bit_identical_to_forward_euler(linear):
    problem, a, spectrum = linear
    hyper = jaxcfl.make_hyper(0.5 / (3.0 + spectrum.maximum), 3.0, a=a)
    plain = _run(problem, "gd", hyper)
    guarded = _run(problem, "guarded_gd", hyper)
    assert np.asarray(plain.state.kernel).tobytes() == np.asarray(guarded.state.kernel).tobytes()
    assert np.all(np.asarray(guarded.diagnostics.step_size)[1:] == np.float32(hyper.lr))


def test_guarded_step_size_is_min_of_lr_and_the_limit_and_ignores_unknown_curvature():
    assert float(guarded_step_size(1.0, 4.0, 1.8)) == pytest.approx(0.45)
    assert float(guarded_step_size(0.1, 4.0, 1.8)) == pytest.approx(0.1)
    for lam in (np.nan, np.inf, 0.0, -2.0):
        assert float(guarded_step_size(0.3, lam, 1.8)) == pytest.approx(0.3)


@pytest.fixture(scope="module")
def nonlinear():
    """Figure 4's model (nonlinear, mean pooling) on the small image, and an lr the guard lowers at alpha = 20."""
    return jaxcfl.make_problem(IMAGE, W, pool="mean", model="nonlinear"), _kernel(), jaxcfl.make_hyper(0.15, 20.0, label=1.0)


def test_k_2n_stays_bit_identical_under_the_guard(nonlinear):
    problem, kernel, hyper = nonlinear
    traj = jaxcfl.integrate(problem, kernel, hyper, scheme="guarded_gd", model="nonlinear", steps=60, record_every=20,
                            compare_k=4.0)
    assert np.all(np.asarray(traj.divergence) == 0)
    assert float(traj.diagnostics.step_size[-1]) < 0.15  # the guard acted


@pytest.mark.slow  # by default a continued run is tested on the unguarded schemes (tests/test_schemes.py)
def test_a_continued_run_equals_one_run(nonlinear):
    problem, kernel, hyper = nonlinear
    run = lambda start, steps: jaxcfl.integrate(problem, start, hyper, scheme="guarded_gd", model="nonlinear",
                                                steps=steps, record_every=steps)
    whole = run(kernel, 60)
    half = run(kernel, 30)
    assert half.state.direction is not None and half.state.curvature is not None
    resumed = run(half.state, 30)
    np.testing.assert_allclose(resumed.state.kernel, whole.state.kernel, rtol=1e-6, atol=1e-9)
    assert int(resumed.state.iteration) == 60
    # continued without the guard, the state drops it
    plain = jaxcfl.integrate(problem, half.state, hyper, scheme="gd", model="nonlinear", steps=30, record_every=30)
    assert plain.state.curvature is None and plain.diagnostics.step_size is None


def test_new_numbers_do_not_recompile(linear):
    problem, a, _ = linear
    _run(problem, "guarded_gd", jaxcfl.make_hyper(1e-3, 1.0, a=a))
    before = integration._integrate._cache_size()
    for lr, alpha, safety in [(2e-2, 5.0, 0.5), (0.3, 7.0, 1.0)]:
        _run(problem, "guarded_gd", jaxcfl.make_hyper(lr, alpha, a=a, safety=safety))
    assert integration._integrate._cache_size() == before


def test_the_refresh_stays_a_branch_under_vmap(linear):
    # The refresh predicate is the iteration count, the same for every configuration: under vmap the
    # lax.cond must not turn into a select (which would estimate lambda at every step).
    problem, a, _ = linear
    state = jaxcfl.pde.init(jnp.asarray(_kernel()))
    hypers = jaxcfl.make_hyper(jnp.array([1e-3, 1e-2]), 2.0, a=a)
    run = lambda h: integration.solve(problem, state, h, scheme="guarded_gd", model="linear", steps=20,
                                      save=integration.SaveAt(10), guard=GuardSchedule(every=5, warmup=0))
    text = str(jax.make_jaxpr(jax.vmap(run))(hypers))
    assert "cond[" in text


@pytest.mark.slow
def test_the_sweep_command_records_the_guard_and_resumes(tmp_path, linear):
    _, a, spectrum = linear
    alpha = [1.0, 3.0]
    lr = [x * 2 / (3.0 + spectrum.maximum) for x in (0.5, 3.0)]
    argv = ["sweep", "--size", "32", "--kernel-size", "8", "--lr", ",".join(map(repr, lr)), "--alpha", "1,3",
            "--a", "0.5", "--operator", "fft", "--scheme", "guarded_gd", "--safety", "0.8", "--every", "5",
            "--steps", "100", "--compare-k", "3", "--no-theory", "--out", str(tmp_path / "o"), "--json"]

    def run():
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
            assert cli.main(argv) == 0
        return strict_json.loads(stdout.getvalue())

    payload = run()
    assert payload["spec"]["safety"] == 0.8
    assert payload["spec"]["guard"] == dict(every=5, warmup=20, iterations=4, first_iterations=30)
    assert payload["counts"]["stable"] == 4
    for row in payload["runs"]:
        assert row["guard_lambda"] == pytest.approx(row["alpha"] + spectrum.maximum, rel=2e-5)
        assert row["guard_lr"] == pytest.approx(min(row["lr"], 0.8 * 2 / row["guard_lambda"]), rel=1e-5)
        assert row["guard_lr_min"] <= row["guard_lr"]
    again = run()  # every chunk from disk
    assert again["chunks_on_disk"] == again["chunks"] and again["runs"] == payload["runs"]
    # an unguarded set-up keeps the manifest it had before the guard existed
    assert set(jaxcfl.Setup().to_dict()) == {"model", "scheme", "pool", "beta", "a", "label", "bias", "momentum"}


@pytest.mark.parametrize("call, name", [
    (lambda: jaxcfl.make_hyper(0.1, 1.0, safety=0.0), "safety"),
    (lambda: jaxcfl.make_hyper(0.1, 1.0, safety=1.5), "safety"),
    (lambda: jaxcfl.make_hyper(0.1, 1.0, safety=float("nan")), "safety"),
    (lambda: jaxcfl.Setup(scheme="guarded_gd", safety=2.0), "safety"),
    (lambda: GuardSchedule(every=0), "every"),
    (lambda: GuardSchedule(iterations=0), "iterations"),
    (lambda: GuardSchedule(warmup=-1), "warmup"),
    (lambda: jaxcfl.sweep(IMAGE, W, 0.1, 1.0, scheme="guarded_gd", safety=0.0, steps=20), "safety"),
])
def test_bad_guard_input_is_named(call, name):
    with pytest.raises(ValueError, match=name):
        call()


@pytest.mark.parametrize("call", [
    lambda: jaxcfl.Setup(scheme="guarded_gd", guard=10),
    lambda: jaxcfl.sweep(IMAGE, W, 0.1, 1.0, scheme="guarded_gd", guard=dict(every=2), steps=20),
    lambda: jaxcfl.integrate(jaxcfl.make_problem(IMAGE, W), _kernel(), jaxcfl.make_hyper(0.1, 1.0),
                             scheme="guarded_gd", guard=5),
])
def test_a_guard_that_is_not_a_schedule_is_a_type_error(call):
    with pytest.raises(TypeError, match="guard"):
        call()


# --- jaxcfl reproduce pde-guard -------------------------------------------------------------

SMALL_ARGS = ["--size", "64", "--kernel-size", "16", "--steps", "300", "--lr", "0.01", "0.09", "0.13", "--map-lr",
              "--chunk-size", "4"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("pde-guard") / "out"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(["reproduce", "pde-guard", *SMALL_ARGS, "--out", str(out), "--json"])
    assert code == 0, stderr.getvalue()
    return strict_json.loads(stdout.getvalue()), out


def test_registered():
    assert EXPERIMENTS["pde-guard"][0] == "jaxcfl.experiments.pde_guard"


def test_the_restrained_run_becomes_stable_at_the_stable_runs_loss(small):
    payload, out = small
    rows = {r["lr"]: r for r in payload["rows"]}
    assert [rows[x]["status"] for x in (0.01, 0.09, 0.13)] == ["stable", "restrained", "divergent"]
    assert all(r["guarded_status"] == "stable" for r in payload["rows"])
    claims = payload["claims"]
    assert claims["restrained_without_guard"] == [0.09]
    assert claims["all_become_stable"] and claims["divergence_at_rounding_level"] and claims["same_loss"]
    assert rows[0.09]["guarded_divergence"] <= claims["rounding_level"]
    assert rows[0.09]["guarded_final_loss"] == pytest.approx(rows[0.01]["final_loss"], rel=1e-3)
    # the guard lowered the step where lr broke the local limit, and only there
    assert rows[0.01]["guard_lr_min"] == pytest.approx(0.01)
    assert rows[0.09]["guard_lr"] == pytest.approx(0.9 * 2 / rows[0.09]["guard_lambda"], rel=1e-5)
    assert payload["map"] is None
    for name in ("pde_guard.png", "pde_guard.csv", "pde_guard.json", "pde_guard_curves.npz"):
        assert (out / name).stat().st_size > 0


def test_render_states_the_claims(small):
    payload, _ = small
    text = pde_guard.render(payload)
    assert "all stable with it: yes" in text and "restrained without the guard: lr 0.09" in text


@pytest.mark.slow
def test_the_map_at_a_small_size(tmp_path):
    payload = pde_guard.run(size=64, kernel_size=16, steps=300, lr=(0.01, 0.09), map_lr=(0.01, 0.05, 0.2),
                            map_alpha=(5.0, 20.0), chunk_size=8, out=tmp_path / "o", log=lambda _: None)
    m = payload["map"]
    assert m["counts"]["guarded_gd"]["stable"] == 6
    assert m["counts"]["gd"]["stable"] < 6
    assert len(m["local_limit"]["lr"]) == 2 and all(x > 0 for x in m["local_limit"]["lr"])
    chex.assert_trees_all_equal(sum(m["transitions"].values()), 6)


# --- the guard as a step-size controller --------------------------------------------------------

def test_guarded_gd_is_forward_euler_under_the_cfl_controller(nonlinear):
    """``guarded_gd`` is the value ``gd`` with :class:`CFLController`: given to ``solve`` as a
    controller, forward Euler under the guard is the guarded scheme bit for bit."""
    from jaxcfl.pde import CFLController, ConstantStep, get_scheme

    gd, guarded = get_scheme("gd"), get_scheme("guarded_gd")
    assert guarded.step is gd.step and guarded.limit is gd.limit and isinstance(guarded.controller, CFLController)
    assert isinstance(gd.controller, ConstantStep) and not gd.guarded and guarded.guarded
    problem, kernel, hyper = nonlinear
    # the run of test_k_2n_stays_bit_identical_under_the_guard (compiled once), by name and by controller
    by_name = jaxcfl.integrate(problem, kernel, hyper, scheme="guarded_gd", model="nonlinear", steps=60, record_every=20,
                               compare_k=4.0)
    by_controller = integration._integrate(problem, jaxcfl.pde.init(kernel), hyper, jnp.float32(4.0), scheme=gd,
                                           model=jaxcfl.pde.get_model("nonlinear"), steps=60, record_every=20,
                                           compare=True, controller=CFLController())
    chex.assert_trees_all_equal(by_name, by_controller)
    assert float(by_name.diagnostics.step_size[-1]) < float(hyper.lr)  # the guard acted
    schedule = GuardSchedule(every=4, warmup=3)
    # A guarded set-up's controller carries its schedule.
    setup = jaxcfl.Setup(scheme="guarded_gd", guard=schedule)
    assert setup.controller == CFLController(schedule) and jaxcfl.Setup().controller == ConstantStep()


@pytest.mark.parametrize("bad", ["cfl", GuardSchedule(), object()])
def test_a_controller_that_is_not_one_is_a_type_error(bad, nonlinear):
    problem, kernel, hyper = nonlinear
    with pytest.raises(TypeError, match="controller"):
        integration.solve(problem, jaxcfl.pde.init(kernel), hyper, scheme="gd", model="nonlinear", steps=2,
                          save=integration.SaveAt(1), controller=bad)
