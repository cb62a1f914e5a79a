"""The lockstep engine on a user's own objects: NNX modules with any state, pure functions, any optax
optimiser, per-copy hyperparameters and seeds, bit-exact k = 2^n and resume."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxcfl.nn._lockstep import Copies, Lockstep, LockstepState, as_model, as_optimizer
from jaxcfl.nn._protocol import _first_difference


class Counter(nnx.Variable):
    """A custom variable type: state that is neither a parameter nor a batch statistic."""


class Net(nnx.Module):
    """A small MLP with every kind of state: BatchNorm statistics, a Dropout RNG stream, a custom variable."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(8, 16, rngs=rngs)
        self.norm = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
        self.dropout = nnx.Dropout(0.25, rngs=rngs)
        self.out = nnx.Linear(16, 3, rngs=rngs)
        self.calls = Counter(jnp.zeros((), jnp.int32))

    def __call__(self, x):
        self.calls[...] = self.calls[...] + 1
        return self.out(self.dropout(nnx.relu(self.norm(self.hidden(x)))))


def factory(key):
    return Net(nnx.Rngs(params=key, dropout=jax.random.fold_in(key, 1)))


def mlp_init(key):
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (8, 16)) * 0.3, "b1": jnp.zeros(16),
            "w2": jax.random.normal(k2, (16, 3)) * 0.3, "b2": jnp.zeros(3)}


def mlp_apply(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def _data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8)).astype(np.float32)
    y = (np.argmax(x[:, :3], axis=1)).astype(np.int32)
    return x, y


DATA, TEST = _data(96, 0), _data(48, 1)
FIT = dict(epochs=2, batch_size=16, test=TEST, progress=False)


@pytest.fixture(scope="module")
def nnx_adamw():
    engine = Lockstep(factory, optax.adamw(2e-2, weight_decay=1e-3), copies_mode="unroll", checksums=True,
                      keep_outputs=True)
    return engine, engine.fit(DATA, Copies(k=(1.0, 2.0, 4.0, 3.0)), **FIT)


def test_adam_powers_of_two_are_bit_identical_and_odd_k_differs(nnx_adamw):
    _, r = nnx_adamw
    assert r.fingerprints[0] == r.fingerprints[1] == r.fingerprints[2]
    assert r.fingerprints[3] != r.fingerprints[0]
    assert np.all(r.step_divergence[:, :3] == 0) and r.step_divergence[-1, 3] > 0
    np.testing.assert_array_equal(r.checksums[:, 0], r.checksums[:, 2])
    assert _first_difference(r.checksums[:, 0], r.checksums[:, 3], r.leaf_paths) is not None


def test_every_nnx_state_collection_is_carried(nnx_adamw):
    """BatchNorm statistics move, the Dropout RNG count advances, the custom variable counts the calls."""
    _, r = nnx_adamw
    first = r.state.copy(0)
    steps = 2 * (96 // 16)
    flat = {jax.tree_util.keystr(p): np.asarray(a) for p, a in jax.tree_util.tree_flatten_with_path(
        first.model_state)[0] if not jnp.issubdtype(a.dtype, jax.dtypes.prng_key)}
    calls = [v for k, v in flat.items() if "calls" in k]
    counts = [v for k, v in flat.items() if "count" in k]
    means = [v for k, v in flat.items() if "mean" in k]
    assert calls and int(calls[0]) == steps  # evaluation does not write the state back
    assert counts and int(counts[0]) == steps
    assert means and np.any(means[0] != 0)
    assert r.test_outputs.shape == (4, 48, 3) and r.test_predictions.shape == (4, 48)
    np.testing.assert_array_equal(r.test_predictions, r.test_outputs.argmax(-1))


def test_the_model_actually_learns(nnx_adamw):
    _, r = nnx_adamw
    assert r.test_accuracy[-1, 0] > 0.6  # three classes: chance is 1/3
    assert r.train_loss[-1, 0] < r.train_loss[0, 0]


def test_copy_accessor_and_stack():
    state = Lockstep(factory, optax.adam(1e-3)).init(Copies(k=(1.0, 3.0)))
    assert isinstance(state, LockstepState) and state.copies == 2
    one = state.copy(1)
    again = LockstepState.stack([state.copy(0), one])
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), again.params, state.params))
    with pytest.raises(IndexError, match="copy index"):
        state.copy(2)
    with pytest.raises(IndexError, match="copy index"):
        state.copy(True)


@pytest.mark.slow  # by default: the identity under Adam (nnx_adamw), a separate run's bits (per-copy seeds)
def test_pure_functions_with_adam_keep_the_identity_and_match_a_separate_run():
    engine = Lockstep((mlp_init, mlp_apply), optax.adam(1e-2), copies_mode="unroll")
    together = engine.fit(DATA, Copies(k=(1.0, 8.0, 5.0)), **FIT)
    alone = engine.fit(DATA, Copies(k=5.0), **FIT)
    assert together.fingerprints[0] == together.fingerprints[1] != together.fingerprints[2]
    assert alone.fingerprints[0] == together.fingerprints[2]


def test_per_copy_learning_rate_and_weight_decay_without_recompiling():
    """An lr x weight-decay grid is one run; new values reuse the compiled step (traces counted)."""
    traces = []

    def apply(p, x):
        traces.append(1)
        return mlp_apply(p, x)

    def adamw(learning_rate, weight_decay):
        return optax.adamw(learning_rate, weight_decay=weight_decay)

    engine = Lockstep((mlp_init, apply), adamw, copies_mode="vmap")
    lrs, wds = np.meshgrid([1e-3, 1e-2], [0.0, 1e-2], indexing="ij")
    grid = Copies(hyper={"learning_rate": lrs.ravel().tolist(), "weight_decay": wds.ravel().tolist()})
    first = engine.fit(DATA, grid, **FIT)
    seen = len(traces)
    grid2 = Copies(hyper={"learning_rate": [3e-3, 2e-2, 5e-3, 1e-4], "weight_decay": [1e-3, 0.0, 0.0, 1e-1]})
    second = engine.fit(DATA, grid2, **FIT)
    assert len(traces) == seen, "new hyperparameter values recompiled the step"
    assert len(set(first.fingerprints)) == 4 and first.fingerprints != second.fingerprints
    # Each copy equals a run with that lr alone (up to vmap's batching of the same arithmetic).
    solo = Lockstep((mlp_init, mlp_apply), adamw, copies_mode="vmap").fit(
        DATA, Copies(hyper={"learning_rate": 1e-2, "weight_decay": 1e-2}), **FIT)
    np.testing.assert_allclose(first.state.copy(3).params["w1"], solo.state.copy(0).params["w1"], rtol=1e-5,
                               atol=1e-6)


def test_inject_hyperparams_values_differ_per_copy():
    opt = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)
    engine = Lockstep((mlp_init, mlp_apply), opt, copies_mode="unroll")
    state = engine.init(Copies(hyper={"learning_rate": [0.1, 0.01]}))
    hp = state.opt_state[0].hyperparams
    np.testing.assert_allclose(hp["learning_rate"], [0.1, 0.01])
    np.testing.assert_allclose(hp["momentum"], [0.9, 0.9])
    r = engine.fit(DATA, Copies(hyper={"learning_rate": [0.1, 0.01]}), **FIT)
    assert r.fingerprints[0] != r.fingerprints[1]


def test_data_function_equals_array_data():
    from jaxcfl.nn import _data as datasets
    x, y = DATA

    def loader(seed, epoch):
        return datasets.batches(x, y, 16, seed=seed, epoch=epoch)

    engine = Lockstep((mlp_init, mlp_apply), optax.sgd(0.1), copies_mode="unroll")
    a = engine.fit(DATA, Copies(k=(1.0, 3.0)), **FIT)
    b = engine.fit(loader, Copies(k=(1.0, 3.0)), **{**FIT, "batch_size": None})
    assert a.fingerprints == b.fingerprints


def test_per_copy_seeds_match_separate_runs():
    """Copies with their own batch order, initialisation and dropout seed equal runs with that seed alone."""
    engine = Lockstep(factory, optax.adam(1e-3), copies_mode="unroll")
    copies = Copies(data_seed=(1, 2), init_seed=(0, 5), dropout_seed=(None, 7))
    together = engine.fit(DATA, copies, **FIT)
    alone = engine.fit(DATA, Copies(data_seed=2, init_seed=5, dropout_seed=7), **FIT)
    assert alone.fingerprints[0] == together.fingerprints[1] != together.fingerprints[0]


def test_one_ulp_initial_change():
    engine = Lockstep((mlp_init, mlp_apply), optax.adam(1e-3))
    state = engine.init(Copies(init_ulp=(None, 3)))
    a, b = (np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(state.copy(i).params)]) for i in (0, 1))
    changed = np.flatnonzero(a != b)
    assert changed.size == 1
    i = changed[0]
    assert b[i] in (np.nextafter(a[i], np.float32(np.inf)), np.nextafter(a[i], np.float32(-np.inf)))


def test_resume_after_a_kill_is_bit_exact_with_rng_state(tmp_path, nnx_adamw):
    engine, reference = nnx_adamw

    class Killed(Exception):
        pass

    def kill(epoch, partial):
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        engine.fit(DATA, Copies(k=(1.0, 2.0, 4.0, 3.0)), out=tmp_path / "run", on_epoch=kill, **FIT)
    resumed = engine.fit(DATA, Copies(k=(1.0, 2.0, 4.0, 3.0)), out=tmp_path / "run", **FIT)
    assert resumed.fingerprints == reference.fingerprints
    np.testing.assert_array_equal(resumed.checksums, reference.checksums)
    json.loads((tmp_path / "run" / "metrics.json").read_text())
    with pytest.raises(ValueError, match="different training run"):
        engine.fit(DATA, Copies(k=(1.0, 5.0)), out=tmp_path / "run", **FIT)


@pytest.mark.parametrize("make, error, match", [
    (lambda: Lockstep("resnet", optax.adam(1e-3)), TypeError, "model must be"),
    (lambda: Lockstep(Net, optax.adam(1e-3)), TypeError, "got the class Net"),
    (lambda: Lockstep(factory, "adam"), TypeError, "optimizer must be"),
    (lambda: Lockstep(factory, optax.adam(1e-3), loss=3), TypeError, "loss must be"),
    (lambda: Lockstep(factory, optax.adam(1e-3), copies_mode="fast"), ValueError, "copies_mode"),
    (lambda: Lockstep(factory, optax.adam(1e-3)).init(Copies(hyper={"lr": 0.1})), ValueError, "lr"),
    (lambda: Lockstep((mlp_init, mlp_apply), optax.adam(1e-3)).init(Copies(dropout_seed=(1, 2))), ValueError,
     "no RNG stream"),
    (lambda: Lockstep(factory(jax.random.key(0)), optax.adam(1e-3)).init(Copies(init_seed=(0, 1))), ValueError,
     "ready-built"),
    (lambda: Copies(k=(1.0, -1.0)), ValueError, "k"),
    (lambda: Copies(k=(1.0, 2.0), data_seed=(1, 2, 3)), ValueError, "one length"),
    (lambda: Copies(hyper={"learning_rate": float("nan")}), ValueError, "learning_rate"),
    (lambda: Lockstep(factory, optax.adam(1e-3)).fit(DATA, epochs=1), ValueError, "batch_size"),
    (lambda: Lockstep(factory, optax.adam(1e-3)).fit((DATA[0], DATA[1][:5]), epochs=1, batch_size=4), ValueError,
     "one length"),
])
def test_bad_input_is_named(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_as_model_and_as_optimizer_accept_their_forms():
    assert as_model(factory).seeded and not as_model(factory(jax.random.key(0))).seeded
    assert as_model((mlp_init, mlp_apply)).init(jax.random.key(0))[1] == {}
    assert "learning_rate" in as_optimizer(lambda learning_rate: optax.sgd(learning_rate)).names
    assert "learning_rate" in as_optimizer(optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)).injected
