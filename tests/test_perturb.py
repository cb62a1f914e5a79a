"""Perturbed SGD and the other perturbation transforms, bit for bit against NumPy."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from jaxcfl.nn._perturb import perturb_update, perturbed_sgd, ulp_perturb

DTYPES = {"float32": np.float32, "float64": np.float64, "bfloat16": ml_dtypes.bfloat16}
VARIANTS = {
    "sgd": dict(momentum=0.0, nesterov=False),
    "momentum": dict(momentum=0.9, nesterov=False),
    "nesterov": dict(momentum=0.9, nesterov=True),
}
STEPS = 6


@pytest.fixture(params=list(DTYPES))
def np_dtype(request):
    name = request.param
    if name == "float64":
        with jax.enable_x64(True):
            yield DTYPES[name]
    else:
        yield DTYPES[name]


def _bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize])


def assert_bitwise_equal(a, b):
    np.testing.assert_array_equal(_bits(a), _bits(b))


def _data(dtype, n=257, seed=0):
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(n).astype(dtype)
    grads = [rng.standard_normal(n).astype(dtype) * dtype(0.3) for _ in range(STEPS)]
    return p0, grads


def reference_sgd(p0, grads, lr, k, *, momentum, nesterov, weight_decay):
    """Perturbed SGD in NumPy, one rounding per operation, in the dtype of ``p0``."""
    dt = p0.dtype
    lr, k, mu, wd = (np.asarray(x).astype(dt) for x in (lr, k, momentum, weight_decay))
    p = p0.copy()
    buf = np.zeros_like(p)
    for g in grads:
        d = g + wd * p if weight_decay else g
        if momentum:
            buf = mu * buf + d
            d = d + mu * buf if nesterov else buf
        u = -((lr * k) * (d / k))
        p = p + u
    return p


def run_optax(opt, p0, grads):
    state = opt.init(p0)

    @jax.jit
    def step(p, state, g):
        updates, state = opt.update(g, state, p)
        return optax.apply_updates(p, updates), state

    p = jnp.asarray(p0)
    for g in grads:
        p, state = step(p, state, jnp.asarray(g))
    return np.asarray(p)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("k", [1.0, 3.0, pytest.param(7.0, marks=pytest.mark.slow)])  # -m slow: another odd k
def test_matches_numpy_bit_for_bit(np_dtype, variant, k):
    p0, grads = _data(np_dtype)
    kw = dict(VARIANTS[variant], weight_decay=5e-4)
    expected = reference_sgd(p0, grads, 0.1, k, **kw)
    got = run_optax(perturbed_sgd(0.1, k, **kw), p0, grads)
    assert got.dtype == np_dtype
    assert_bitwise_equal(got, expected)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_traced_hyperparameters_bit_for_bit(variant):
    """lr and k as traced arguments give the same bits as the NumPy reference."""
    p0, grads = _data(np.float32, seed=1)
    kw = dict(VARIANTS[variant], weight_decay=5e-4)

    @jax.jit
    def train(p, grads, lr, k):
        opt = perturbed_sgd(lr, k, **kw)
        state = opt.init(p)

        def body(carry, g):
            p, state = carry
            updates, state = opt.update(g, state, p)
            return (optax.apply_updates(p, updates), state), None

        return jax.lax.scan(body, (p, state), grads)[0][0]

    for k in (1.0, 3.0, 5.0):
        got = train(jnp.asarray(p0), jnp.asarray(np.stack(grads)), jnp.float32(0.1), jnp.float32(k))
        assert_bitwise_equal(got, reference_sgd(p0, grads, 0.1, k, **kw))


_K1_RUNS: dict = {}


def _k1_run(np_dtype, variant, n=257, seed=0) -> np.ndarray:
    """``k = 1`` on ``_data(np_dtype, n, seed)``, computed (and compiled) once per set-up for all the k compared with it."""
    key = (np.dtype(np_dtype).name, variant, n, seed)
    if key not in _K1_RUNS:
        p0, grads = _data(np_dtype, n=n, seed=seed)
        _K1_RUNS[key] = run_optax(perturbed_sgd(0.1, 1.0, **VARIANTS[variant], weight_decay=5e-4), p0, grads)
    return _K1_RUNS[key]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("k", [2.0, pytest.param(4.0, marks=pytest.mark.slow), 8.0])
def test_powers_of_two_are_bit_identical_to_k1(np_dtype, variant, k):
    p0, grads = _data(np_dtype, seed=2)
    kw = dict(VARIANTS[variant], weight_decay=5e-4)
    assert_bitwise_equal(run_optax(perturbed_sgd(0.1, k, **kw), p0, grads), _k1_run(np_dtype, variant, seed=2))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("k", [3.0, pytest.param(5.0, marks=pytest.mark.slow), pytest.param(7.0, marks=pytest.mark.slow), pytest.param(9.0, marks=pytest.mark.slow), 11.0])  # the paper's 3..11: ends
def test_odd_k_differ_from_k1(np_dtype, variant, k):
    p0, grads = _data(np_dtype, n=4096, seed=3)
    kw = dict(VARIANTS[variant], weight_decay=5e-4)
    a = run_optax(perturbed_sgd(0.1, k, **kw), p0, grads)
    b = _k1_run(np_dtype, variant, n=4096, seed=3)
    differ = _bits(a) != _bits(b)
    assert differ.any()
    # ... and only by rounding: a few ulp, never more than a tiny relative amount.
    rel = np.abs(a.astype(np.float64) - b.astype(np.float64)) / np.abs(b.astype(np.float64)).max()
    assert rel.max() < 64 * float(ml_dtypes.finfo(np_dtype).eps)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_k1_equals_optax_sgd_chain(variant):
    """k = 1 is optax's SGD: bit for bit op by op, and to an ulp or so under jit (FMAs)."""
    p0, grads = _data(np.float32, seed=4)
    kw = VARIANTS[variant]
    ours = run_optax(perturbed_sgd(0.1, 1, weight_decay=5e-4, **kw), p0, grads)
    chain = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, kw["momentum"], nesterov=kw["nesterov"]))
    # Op by op: no jit, so every jnp operation is rounded on its own, as in ours.
    state = chain.init(jnp.asarray(p0))
    p = jnp.asarray(p0)
    with jax.disable_jit():
        for g in grads:
            updates, state = chain.update(jnp.asarray(g), state, p)
            p = optax.apply_updates(p, updates)
    assert_bitwise_equal(ours, np.asarray(p))
    np.testing.assert_allclose(ours, run_optax(chain, p0, grads), rtol=1e-6, atol=1e-7)


def test_schedule_learning_rate():
    p0, grads = _data(np.float32, seed=5)
    boundaries = {2: 0.1, 4: 0.1}
    schedule = optax.piecewise_constant_schedule(0.1, boundaries)
    got = run_optax(perturbed_sgd(schedule, 3.0, momentum=0.9, nesterov=True, weight_decay=5e-4), p0, grads)
    # The reference with the schedule's values applied step by step.
    expected = p0.copy()
    buf = np.zeros_like(p0)
    f = np.float32
    for i, g in enumerate(grads):
        lr = f(schedule(i))
        d = g + f(5e-4) * expected
        buf = f(0.9) * buf + d
        d = d + f(0.9) * buf
        expected = expected + -((lr * f(3.0)) * (d / f(3.0)))
    assert_bitwise_equal(got, expected)


def test_vmap_over_k_equals_separate_runs():
    """Copies vmapped over k equal their separate runs bit for bit (XLA CPU, elementwise ops)."""
    p0, grads = _data(np.float32, seed=6)
    ks = jnp.asarray([1.0, 2.0, 3.0, 5.0], jnp.float32)

    def train(k):
        opt = perturbed_sgd(0.1, k, momentum=0.9, nesterov=True, weight_decay=5e-4)
        p = jnp.asarray(p0)
        state = opt.init(p)
        for g in grads:
            updates, state = opt.update(jnp.asarray(g), state, p)
            p = optax.apply_updates(p, updates)
        return p

    batched = jax.jit(jax.vmap(train))(ks)
    for i, k in enumerate(np.asarray(ks)):
        assert_bitwise_equal(batched[i], jax.jit(train)(jnp.float32(k)))
        assert_bitwise_equal(batched[i], reference_sgd(p0, grads, 0.1, k, momentum=0.9, nesterov=True,
                                                       weight_decay=5e-4))
    assert_bitwise_equal(batched[0], batched[1])
    assert (_bits(batched[0]) != _bits(batched[2])).any()


def test_new_hyperparameter_values_do_not_recompile():
    p0, grads = _data(np.float32, seed=7)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(p, g, lr, k, mu, wd):
        opt = perturbed_sgd(lr, k, momentum=mu, nesterov=True, weight_decay=wd)
        updates, _ = opt.update(g, opt.init(p), p)
        return optax.apply_updates(p, updates)

    chex.clear_trace_counter()
    for lr, k, mu, wd in [(0.1, 1.0, 0.9, 5e-4), (0.05, 3.0, 0.5, 1e-3), (0.2, 7.0, 0.0, 0.0)]:
        step(jnp.asarray(p0), jnp.asarray(grads[0]), jnp.float32(lr), jnp.float32(k), jnp.float32(mu),
             jnp.float32(wd))


def test_inject_hyperparams():
    p0, grads = _data(np.float32, seed=8)
    opt = optax.inject_hyperparams(perturbed_sgd)(learning_rate=0.1, k=3.0)
    assert_bitwise_equal(run_optax(opt, p0, grads),
                         reference_sgd(p0, grads, 0.1, 3.0, momentum=0.0, nesterov=False, weight_decay=0.0))


def test_pytree_with_none_leaves():
    opt = perturbed_sgd(0.1, 3.0, momentum=0.9, weight_decay=1e-2)
    params = {"a": jnp.ones(3), "b": None}
    state = opt.init(params)
    updates, state = opt.update({"a": jnp.ones(3), "b": None}, state, params)
    assert updates["b"] is None
    assert updates["a"].shape == (3,)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(learning_rate=-0.1), "learning_rate"),
        (dict(learning_rate=float("nan")), "learning_rate"),
        (dict(learning_rate=0.1, k=0.0), "k"),
        (dict(learning_rate=0.1, k=-3.0), "k"),
        (dict(learning_rate=0.1, momentum=1.0), "momentum"),
        (dict(learning_rate=0.1, weight_decay=-1e-4), "weight_decay"),
        (dict(learning_rate=0.1, nesterov=True), "nesterov"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        perturbed_sgd(**kwargs)


def test_perturb_update_after_adam(np_dtype):
    rng = np.random.default_rng(9)
    p0 = rng.standard_normal(1000).astype(np_dtype)
    grads = [rng.standard_normal(1000).astype(np_dtype) for _ in range(3)]
    adam = optax.adam(1e-3)
    # The baseline is k = 1 (the identity on updates), not bare Adam: under jit XLA may
    # contract Adam's final ``-lr * u`` with ``p + u`` into an FMA, which no update-level
    # transform can reproduce.
    base = run_optax(optax.chain(adam, perturb_update(1.0)), p0, grads)
    np.testing.assert_allclose(base.astype(np.float64), run_optax(adam, p0, grads).astype(np.float64), rtol=1e-6)
    assert_bitwise_equal(run_optax(optax.chain(adam, perturb_update(4.0)), p0, grads), base)
    odd = run_optax(optax.chain(adam, perturb_update(3.0)), p0, grads)
    assert (_bits(odd) != _bits(base)).any()
    np.testing.assert_allclose(odd.astype(np.float64), base.astype(np.float64), rtol=1e-2)


def test_perturb_update_is_fl_uk_over_k(np_dtype):
    rng = np.random.default_rng(10)
    u = (rng.standard_normal(5000) * 1e-3).astype(np_dtype)
    out, _ = jax.jit(perturb_update(3.0).update)(jnp.asarray(u), optax.EmptyState())
    k = np_dtype(3.0)
    assert_bitwise_equal(out, (u * k) / k)
    with pytest.raises(ValueError, match="k"):
        perturb_update(0.0)


def test_ulp_perturb_moves_by_one_ulp(np_dtype):
    x = np.linspace(-3, 3, 2001).astype(np_dtype)
    tree = {"w": jnp.asarray(x), "step": jnp.arange(4)}
    out = ulp_perturb(tree, jax.random.key(0), fraction=0.5)
    y = np.asarray(out["w"])
    moved = _bits(y) != _bits(x)
    assert 0.35 < moved.mean() < 0.65
    up = np.nextafter(x, np.asarray(np.inf, np_dtype))
    down = np.nextafter(x, np.asarray(-np.inf, np_dtype))
    assert np.all((_bits(y) == _bits(up)) | (_bits(y) == _bits(down)) | ~moved)
    assert (_bits(y) == _bits(up)).any() and (_bits(y) == _bits(down)).any()
    np.testing.assert_array_equal(out["step"], np.arange(4))


def test_ulp_perturb_directions_and_determinism():
    x = jnp.linspace(1.0, 2.0, 100)
    up = ulp_perturb(x, jax.random.key(1), direction="up")
    np.testing.assert_array_equal(up, np.nextafter(np.asarray(x), np.float32(np.inf)))
    down = ulp_perturb(x, jax.random.key(1), direction="down")
    np.testing.assert_array_equal(down, np.nextafter(np.asarray(x), np.float32(-np.inf)))
    assert_bitwise_equal(ulp_perturb(x, jax.random.key(2), fraction=0.3),
                         ulp_perturb(x, jax.random.key(2), fraction=0.3))
    with pytest.raises(ValueError, match="fraction"):
        ulp_perturb(x, jax.random.key(0), fraction=0.0)
    with pytest.raises(ValueError, match="direction"):
        ulp_perturb(x, jax.random.key(0), direction="sideways")


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
def test_ulp_perturb_count_one_moves_one_entry_of_the_whole_tree_by_one_ulp(x64):
    with jax.enable_x64(x64):
        dtype = np.float64 if x64 else np.float32
        tree = {"a": jnp.asarray(np.linspace(-2, 3, 7), dtype),
                "b": jnp.asarray(np.linspace(0.5, 9, 12).reshape(3, 4), dtype), "step": jnp.arange(4)}
        outs = jax.jit(jax.vmap(lambda k: ulp_perturb(tree, k, count=1)))(jax.random.split(jax.random.key(0), 8))
        before = np.concatenate([np.asarray(tree["a"]).ravel(), np.asarray(tree["b"]).ravel()])
        for seed in range(8):
            after = np.concatenate([np.asarray(outs["a"][seed]).ravel(), np.asarray(outs["b"][seed]).ravel()])
            assert after.dtype == dtype
            moved = np.flatnonzero(_bits(after) != _bits(before))
            assert moved.size == 1
            i = moved[0]
            up, down = np.nextafter(before[i], dtype(np.inf)), np.nextafter(before[i], dtype(-np.inf))
            assert _bits(after[i]) in (_bits(up), _bits(down))
            np.testing.assert_array_equal(outs["step"][seed], np.arange(4))


def test_ulp_perturb_count_is_uniform_over_all_leaves_and_jits():
    tree = {"one": jnp.ones(1), "many": jnp.ones(99)}
    f = jax.jit(jax.vmap(lambda k: ulp_perturb(tree, k, count=1, direction="up")))
    out = f(jax.random.split(jax.random.key(0), 2000))
    hits_one = int((np.asarray(out["one"]) != 1).sum())
    hits_many = (np.asarray(out["many"]) != 1).sum(axis=0)
    assert hits_one + hits_many.sum() == 2000  # exactly one entry per draw
    assert 5 <= hits_one <= 45  # 1% of 2000 = 20, binomial sd 4.4: not per leaf (that would be 50%)
    assert (hits_many > 0).sum() > 80  # spread over the big leaf
    three = ulp_perturb(tree, jax.random.key(1), count=3, direction="down")
    assert sum(int((np.asarray(leaf) != 1).sum()) for leaf in jax.tree.leaves(three)) == 3
    again = ulp_perturb(tree, jax.random.key(1), count=3, direction="down")
    assert_bitwise_equal(jnp.concatenate(jax.tree.leaves(three)), jnp.concatenate(jax.tree.leaves(again)))
    every = ulp_perturb(tree, jax.random.key(1), count=100, direction="up")
    above_one = np.nextafter(np.float32(1), np.float32(2))
    assert all(np.all(np.asarray(leaf) == above_one) for leaf in jax.tree.leaves(every))


@pytest.mark.parametrize("kwargs", [dict(count=0), dict(count=101), dict(count=1.0), dict(count=True),
                                    dict(count=1, fraction=0.5), dict(count=1, fraction=1.0)])
def test_ulp_perturb_bad_count(kwargs):
    tree = {"w": jnp.ones(100), "i": jnp.arange(3)}
    with pytest.raises(ValueError, match="count"):
        ulp_perturb(tree, jax.random.key(0), **kwargs)
    with pytest.raises(ValueError, match="count"):
        ulp_perturb({"i": jnp.arange(3)}, jax.random.key(0), count=1)  # no floating entries
