"""The CFL guard (issue 13): its step is the stability limit times ``safety``, it keeps a run
stable where the curvature grows, it composes with the perturbations, and it never recompiles."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcfl._core.determinism import fingerprint
from jaxcfl.nn._guard import CFLGuardState, cfl_guard, guard_state, guarded_lr, refresh_due
from jaxcfl.nn._perturb import perturb_update, perturbed_sgd
from jaxcfl._core.stability import momentum_limit
from jaxcfl.pde._schemes import get_scheme

SPECTRUM = np.array([10.0, 3.0, 1.0, 0.5], np.float32)
SCHEMES = [(0.0, False), (0.9, False), (0.5, True), (0.9, True)]
SCHEME_IDS = ["gd", "heavy ball", "nesterov 0.5", "nesterov 0.9"]
SLOW_SCHEMES = {"nesterov 0.5"}
"""Run with -m slow only: Nesterov's limit is checked at mu = 0.9 by default."""
SCHEME_PARAMS = [pytest.param(*s, id=i, marks=[pytest.mark.slow] if i in SLOW_SCHEMES else []) for s, i in zip(SCHEMES, SCHEME_IDS)]


def _quadratic(params, spectrum=SPECTRUM):
    return 0.5 * jnp.sum(spectrum * params["w"] ** 2)


def _run(opt, loss, params, steps):
    """``steps`` steps of ``opt`` on ``loss`` (compiled once per optimiser); returns params and state."""

    def body(carry, _):
        p, s = carry
        u, s = opt.update(jax.grad(loss)(p), s, p, value_fn=loss)
        return (optax.apply_updates(p, u), s), None

    (p, s), _ = jax.jit(lambda p, s: jax.lax.scan(body, (p, s), None, length=steps))(params, opt.init(params))
    return p, s


@pytest.mark.parametrize("mu,nesterov", SCHEMES, ids=SCHEME_IDS)
def test_the_limit_is_exact_for_each_momentum_scheme(mu, nesterov):
    """Below ``S / l`` the optimiser converges on a 1-D quadratic, above it it grows."""
    limit = float(momentum_limit(mu, nesterov))
    loss = lambda p: 0.5 * 4.0 * jnp.sum(p["w"] ** 2)  # noqa: E731
    norms = []
    for factor in (0.98, 1.02):
        sgd = perturbed_sgd(factor * limit / 4.0, momentum=mu, nesterov=nesterov)
        p, _ = _run(sgd, loss, {"w": jnp.ones(1)}, 500)
        norms.append(float(jnp.abs(p["w"][0])))
    assert norms[0] < 1e-3 and not norms[1] <= 1e3


def test_momentum_limits_are_the_schemes_limits():
    assert momentum_limit(0.0) == get_scheme("gd").limit(0.0) == 2.0
    assert momentum_limit(0.9) == pytest.approx(3.8)
    assert momentum_limit(0.9, nesterov=True) == get_scheme("nesterov").limit(0.9) == pytest.approx(3.8 / 2.8)


@pytest.mark.parametrize("mu,nesterov", SCHEME_PARAMS)
def test_the_guarded_step_is_the_limit_times_safety(mu, nesterov):
    lr = 1.0  # far beyond every limit: lr * 10 > 2 (1 + mu)
    safeties = jnp.array([0.5, 0.9, 1.0])

    def run(safety):  # one compiled program for the three margins (safety is traced)
        opt = optax.chain(perturbed_sgd(lr, momentum=mu, nesterov=nesterov),
                          cfl_guard(lr, momentum=mu, nesterov=nesterov, safety=safety, every=1, iterations=4))
        p, state = _run(opt, _quadratic, {"w": jnp.ones(4)}, 200)
        return _quadratic(p), guard_state(state)

    final, g = jax.vmap(run)(safeties)
    assert isinstance(g, CFLGuardState) and np.all(np.asarray(g.count) == 200)
    np.testing.assert_allclose(np.asarray(g.lambda_max), SPECTRUM.max(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g.lr) * np.asarray(g.lambda_max),
                               np.asarray(safeties) * float(momentum_limit(mu, nesterov)), rtol=1e-6)
    assert np.all(np.asarray(g.base_lr) == lr)
    assert np.all(np.asarray(final)[:2] < 1e-6)  # strictly inside the region (safety < 1): the run converges


@pytest.mark.parametrize("mu,nesterov", SCHEME_PARAMS)
def test_a_step_inside_the_region_is_left_alone_bit_for_bit(mu, nesterov):
    lr = 0.05  # 0.05 * 10 = 0.5 < safety * S for every scheme here
    plain = perturbed_sgd(lr, momentum=mu, nesterov=nesterov)
    guarded = optax.chain(plain, cfl_guard(lr, momentum=mu, nesterov=nesterov, every=3))
    p_plain, _ = _run(plain, _quadratic, {"w": jnp.ones(4)}, 50)
    p_guard, state = _run(guarded, _quadratic, {"w": jnp.ones(4)}, 50)
    assert fingerprint(p_plain) == fingerprint(p_guard)
    assert float(guard_state(state).lr) == np.float32(lr)


@pytest.mark.parametrize("every", [1, 4])
def test_growing_curvature_diverges_unguarded_and_stays_bounded_guarded(every):
    """The curvature grows from 1 to 200 during the run (it is the step count, fed through the
    data); plain GD at lr = 0.1 diverges once ``l > 20``, the guard follows the curvature."""
    steps = 400
    lr = 0.1

    def run(guarded):
        tx = optax.chain(perturbed_sgd(lr), cfl_guard(lr, every=every, iterations=2)) if guarded else perturbed_sgd(lr)

        def body(carry, t):
            p, s = carry
            curvature = 1.0 + 199.0 * t / steps
            loss = lambda q: 0.5 * curvature * jnp.sum(q ** 2) + jnp.sum(jnp.cos(q))  # noqa: E731
            u, s = tx.update(jax.grad(loss)(p), s, p, value_fn=loss)
            return (optax.apply_updates(p, u), s), jnp.max(jnp.abs(p))

        _, sizes = jax.lax.scan(body, (jnp.full(3, 0.5), tx.init(jnp.zeros(3))), jnp.arange(steps, dtype=jnp.float32))
        return np.asarray(sizes)

    plain, guarded = run(False), run(True)
    assert not np.all(np.isfinite(plain)) or plain.max() > 1e6
    assert np.all(np.isfinite(guarded)) and guarded.max() <= 0.5 + 1e-6


def _mlp_loss(params, x, y):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] - y) ** 2)


@pytest.fixture(scope="module")
def mlp():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((32, 5)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((32, 1)), jnp.float32)
    params = {"w1": jnp.asarray(rng.standard_normal((5, 8)), jnp.float32), "b1": jnp.zeros(8),
              "w2": jnp.asarray(rng.standard_normal((8, 1)) * 0.3, jnp.float32)}
    return params, x, y


@pytest.mark.parametrize("where", [pytest.param("perturbed_sgd before", marks=pytest.mark.slow), "perturb_update after"])
def test_guarded_runs_can_be_perturbed_powers_of_two_are_bit_identical(mlp, where):
    params, x, y = mlp
    loss = lambda p: _mlp_loss(p, x, y)  # noqa: E731
    lr = 2.0  # large enough that the guard acts

    def opt(k):
        guard = cfl_guard(lr, momentum=0.9, weight_decay=1e-3, every=2, iterations=6, first_iterations=6)
        if where == "perturbed_sgd before":
            return optax.chain(perturbed_sgd(lr, k, momentum=0.9, weight_decay=1e-3), guard)
        return optax.chain(perturbed_sgd(lr, momentum=0.9, weight_decay=1e-3), guard, perturb_update(k))

    def final(k):  # k traced: one compiled program for the four copies
        p, state = _run(opt(k), loss, params, 60)
        return p, guard_state(state)

    ks = (1.0, 2.0, 4.0, 3.0)
    ps, g = jax.vmap(final)(jnp.array(ks))
    prints = [fingerprint(jax.tree.map(lambda a, i=i: a[i], ps)) for i in range(len(ks))]
    assert prints[0] == prints[1] == prints[2] != prints[3]
    lr_eff, lam = float(g.lr[0]), float(g.lambda_max[0])
    assert lr_eff < lr  # the guard acted
    assert lr_eff * lam <= 0.9 * float(momentum_limit(0.9)) * (1 + 1e-6)


def test_new_numbers_do_not_recompile(mlp):
    params, x, y = mlp

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, numbers):
        lr, k, mu, wd, safety, every = numbers
        opt = optax.chain(perturbed_sgd(lr, k, momentum=mu, weight_decay=wd),
                          cfl_guard(lr, momentum=mu, weight_decay=wd, safety=safety, every=every, iterations=4,
                                    first_iterations=4))
        loss = lambda p: _mlp_loss(p, x, y)  # noqa: E731
        state = opt.init(params)
        u, state = opt.update(jax.grad(loss)(params), state, params, value_fn=loss)
        return optax.apply_updates(params, u), guard_state(state).lr

    chex.clear_trace_counter()
    f32 = lambda *a: tuple(jnp.asarray(b, jnp.float32) if i != 5 else jnp.asarray(b, jnp.int32)  # noqa: E731
                           for i, b in enumerate(a))
    _, lr1 = step(params, f32(1.0, 1.0, 0.9, 1e-3, 0.9, 5))
    _, lr2 = step(params, f32(0.5, 3.0, 0.5, 0.0, 0.5, 2))
    assert float(lr1) != float(lr2)


def test_guarded_lr_and_the_state_of_a_chain():
    assert float(guarded_lr(1.0, 10.0)) == pytest.approx(0.18)
    assert float(guarded_lr(0.01, 10.0)) == pytest.approx(0.01)
    for unknown in (float("nan"), float("inf"), 0.0, -3.0):
        assert float(guarded_lr(0.5, unknown)) == 0.5
    assert guard_state(optax.sgd(0.1).init({"w": jnp.ones(2)})) is None


@pytest.mark.slow  # the perturbation tests above run under vmap too
def test_it_runs_under_vmap_over_copies(mlp):
    params, x, y = mlp
    loss = lambda p: _mlp_loss(p, x, y)  # noqa: E731

    def final(k):
        opt = optax.chain(perturbed_sgd(2.0, k), cfl_guard(2.0, every=2, iterations=4, first_iterations=4))
        p, s = _run(opt, loss, params, 10)
        return p, guard_state(s).lr

    ps, lrs = jax.vmap(final)(jnp.array([1.0, 2.0, 3.0]))
    one, lr_one = final(1.0)
    assert fingerprint(jax.tree.map(lambda a: a[1], ps)) == fingerprint(jax.tree.map(lambda a: a[0], ps))
    np.testing.assert_allclose(np.asarray(lrs), float(lr_one), rtol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    ({"safety": 0.0}, "safety"),
    ({"safety": 1.5}, "safety"),
    ({"safety": float("nan")}, "safety"),
    ({"every": 0}, "every"),
    ({"every": 2.5}, "every"),
    ({"iterations": 0}, "iterations"),
    ({"momentum": 1.0}, "momentum"),
    ({"weight_decay": -1.0}, "weight_decay"),
    ({"nesterov": True}, "nesterov"),
])
def test_bad_numbers_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cfl_guard(0.1, **kwargs)
    with pytest.raises(ValueError, match="learning_rate"):
        cfl_guard(-0.1)


def test_a_missing_objective_or_params_is_named():
    opt = cfl_guard(0.1)
    p = {"w": jnp.ones(2)}
    state = opt.init(p)
    with pytest.raises(ValueError, match="value_fn"):
        opt.update(p, state, p)
    with pytest.raises(ValueError, match="params"):
        opt.update(p, state, value_fn=_quadratic)


@pytest.mark.slow
def test_a_host_side_refresh_follows_the_same_schedule(mlp):
    """``update(..., refresh=refresh_due(step, every))`` (no branch in the program) gives the run
    that the in-program schedule gives."""
    params, x, y = mlp
    loss = lambda p: _mlp_loss(p, x, y)  # noqa: E731
    opt = optax.chain(perturbed_sgd(2.0, momentum=0.9),
                      cfl_guard(2.0, momentum=0.9, every=3, iterations=4, first_iterations=4))
    steps = {flag: jax.jit(lambda p, s, flag=flag: opt.update(jax.grad(loss)(p), s, p, value_fn=loss, refresh=flag))
             for flag in (None, "first", True, False)}
    runs = {}
    for mode in ("program", "host"):
        p, s, lrs = params, opt.init(params), []
        for i in range(9):
            u, s = steps[None if mode == "program" else refresh_due(i, 3)](p, s)
            p = optax.apply_updates(p, u)
            lrs.append(float(guard_state(s).lr))
        runs[mode] = (p, lrs)
    np.testing.assert_allclose(runs["host"][1], runs["program"][1], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(runs["host"][0]), jax.tree.leaves(runs["program"][0])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert min(runs["host"][1]) < 2.0  # the guard acted
    with pytest.raises(TypeError, match="refresh"):
        opt.update(params, opt.init(params), params, value_fn=loss, refresh=jnp.array(True))


def test_the_guard_defaults_have_one_source():
    """cfl_guard, guarded_lr, TrainConfig and open-question take their defaults from jaxcfl.nn._guard.DEFAULTS."""
    import inspect

    from jaxcfl.experiments import open_question
    from jaxcfl.nn._guard import DEFAULTS, cfl_guard, guarded_lr
    from jaxcfl.nn._preset import TrainConfig

    params = inspect.signature(cfl_guard).parameters
    assert {name: params[name].default for name in DEFAULTS._fields} == DEFAULTS._asdict()
    assert inspect.signature(guarded_lr).parameters["safety"].default == DEFAULTS.safety
    config = TrainConfig()
    assert {name: getattr(config, f"guard_{name}") for name in DEFAULTS._fields} == DEFAULTS._asdict()
    options = open_question.Options()
    assert {name: getattr(options, name) for name in DEFAULTS._fields} == DEFAULTS._asdict()


def test_the_guard_refuses_an_optimiser_whose_limit_it_does_not_know():
    """After Adam it would keep lr * sharpness below SGD's limit, which is not Adam's: refused, named."""
    import jax.numpy as jnp
    import optax

    from jaxcfl.nn._guard import cfl_guard, check_guarded
    from jaxcfl.nn._lockstep import Copies, Lockstep
    from jaxcfl.nn._perturb import perturb_update, perturbed_sgd

    params = {"w": jnp.zeros(3)}
    for ok in (optax.chain(optax.sgd(0.1, momentum=0.9, nesterov=True), cfl_guard(0.1, momentum=0.9, nesterov=True)),
               optax.chain(perturbed_sgd(0.1, 3.0, momentum=0.9, weight_decay=1e-4),
                           cfl_guard(0.1, momentum=0.9, weight_decay=1e-4), perturb_update(2.0)),
               optax.chain(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), cfl_guard(0.1)),
               optax.adam(1e-3)):
        check_guarded(ok.init(params))
    with pytest.raises(ValueError, match="ScaleByAdamState"):
        check_guarded(optax.chain(optax.adamw(1e-3), cfl_guard(1e-3)).init(params))
    with pytest.raises(ValueError, match="last stateful"):
        check_guarded(optax.chain(optax.sgd(0.1), cfl_guard(0.1), optax.trace(0.9)).init(params))

    def init(key):
        return {"w": jnp.zeros((4, 2))}

    engine = Lockstep((init, lambda p, x: x @ p["w"]), optax.chain(optax.adam(1e-3), cfl_guard(1e-3)))
    with pytest.raises(ValueError, match="does not know"):
        engine.init(Copies())


def test_the_guard_runs_lanczos_as_a_loop_of_canonical_convolutions():
    """Its Hessian-vector products run in a compiled loop (not unrolled), every convolution in the
    form XLA's CPU backend runs fast there (``_core/canonical.py``): none of the forms that
    forward-mode derivatives of a convolution take."""
    import re

    kw, kd, kx = jax.random.split(jax.random.key(3), 3)
    params = {"w": 0.3 * jax.random.normal(kw, (3, 3, 1, 4)), "d": 0.3 * jax.random.normal(kd, (4 * 6 * 6, 3))}
    x, y = jax.random.normal(kx, (5, 6, 6, 1)), jnp.arange(5) % 3

    def loss(p):
        h = jax.nn.relu(jax.lax.conv_general_dilated(x, p["w"], (1, 1), "SAME",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC")))
        logits = h.reshape(5, -1) @ p["d"]
        return jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[jnp.arange(5), y])

    opt = optax.chain(optax.sgd(0.1), cfl_guard(0.1, iterations=2, first_iterations=6))

    def step(p, s):
        return opt.update(jax.grad(loss)(p), s, p, value_fn=loss, refresh="first")

    text = jax.jit(step).lower(params, opt.init(params)).compile().as_text()
    labels = re.findall(r"convolution\(.*?dim_labels=([\w>-]+)", text)
    assert re.search(r"\bwhile\(", text)
    assert labels and set(labels) == {"b01f_01io->b01f"}, sorted(set(labels))


def test_a_refresh_at_step_zero_is_the_first_estimate_from_one_program():
    """``refresh=True`` and ``"first"`` compile to one program whose iteration count comes from the
    guard's step count: ``first_iterations`` at step 0 (exact here: 4 iterations span the 4-D
    quadratic), ``iterations`` after."""
    opt = cfl_guard(0.1, iterations=1, first_iterations=4)
    params = {"w": jnp.ones(4)}
    traces = []

    @jax.jit
    def refresh(p, s):
        traces.append(1)
        return opt.update(jax.grad(_quadratic)(p), s, p, value_fn=_quadratic, refresh=True)

    _, s0 = refresh(params, opt.init(params))
    assert float(guard_state(s0).lambda_max) == pytest.approx(10.0, abs=1e-4)
    fresh = opt.init(params)._replace(count=jnp.ones((), jnp.int32))  # a later step, the same random start
    _, s1 = refresh(params, fresh)
    assert abs(float(guard_state(s1).lambda_max) - 10.0) > 1e-2  # one iteration from a random start
    assert len(traces) == 1


def test_adopt_estimate_takes_the_estimate_and_keeps_the_rest():
    """A refresh run as a program of its own (``Lockstep``) writes back the estimate only: the step
    count, the learning rates and the refusal counters stay as they were."""
    from jaxcfl.nn._guard import adopt_estimate

    opt = optax.chain(perturbed_sgd(0.1, 1.0, momentum=0.9), cfl_guard(0.1, momentum=0.9))
    params = {"w": jnp.ones(4)}
    state = opt.init(params)
    _, refreshed = opt.update(jax.grad(_quadratic)(params), state, params, value_fn=_quadratic, refresh="first")
    adopted = adopt_estimate(state, refreshed)
    before, after, new = guard_state(state), guard_state(adopted), guard_state(refreshed)
    assert float(after.lambda_max) == float(new.lambda_max) == pytest.approx(SPECTRUM[0] * (1 + 1e-4), rel=1e-3)
    np.testing.assert_array_equal(after.vector, new.vector)
    for name in ("count", "lr", "base_lr", "refused_steps", "bad_lr"):
        np.testing.assert_array_equal(getattr(after, name), getattr(before, name), err_msg=name)
    assert int(new.count) == 1 and int(after.count) == 0
    # every other transform's state is the one passed in (the momentum is not stepped)
    for a, b in zip(jax.tree.leaves(adopted[0]), jax.tree.leaves(state[0])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
