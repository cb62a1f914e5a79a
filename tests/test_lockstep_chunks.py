"""Lockstep.steps_per_call: chunks of steps in one compiled loop give the steps' own bits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcfl.nn import Copies, Lockstep, cfl_guard, perturbed_sgd
from jaxcfl.nn._lockstep import functional_model


def _mlp():
    def init(key):
        k1, k2 = jax.random.split(key)
        return {"w1": jax.random.normal(k1, (12, 16)) * 0.3, "b1": jnp.zeros(16),
                "w2": jax.random.normal(k2, (16, 4)) * 0.3, "b2": jnp.zeros(4)}

    def apply(p, x):
        return jnp.tanh(x.reshape(x.shape[0], -1) @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    return functional_model(init, apply, name="mlp")


def _data(n=76, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 12)).astype(np.float32), rng.integers(0, 4, n).astype(np.int32)


def _flip(x, key):
    """A stochastic augmentation: each example's features reversed with probability 1/2."""
    flip = jax.random.bernoulli(key, 0.5, (x.shape[0], 1))
    return jnp.where(flip, x[:, ::-1], x)


def _fit(steps_per_call, *, optimizer=None, copies=None, augment=None, refresh_every=None, epochs=2, **kw):
    engine = Lockstep(_mlp(), optimizer or perturbed_sgd(0.1, 1.0, momentum=0.9), augment=augment,
                      refresh_every=refresh_every, steps_per_call=steps_per_call, checksums=True, trace_params=5)
    return engine.fit(_data(), copies or Copies(k=[1.0, 3.0]), epochs=epochs, batch_size=8, progress=False, **kw)


def _assert_same_run(a, b):
    assert a.fingerprints == b.fingerprints
    for name in ("checksums", "step_divergence", "param_trace", "train_loss", "divergence"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


@pytest.fixture(scope="module")
def single():
    return _fit(1)


@pytest.mark.parametrize("steps_per_call", [4, pytest.param(20, marks=pytest.mark.slow),
                                            pytest.param(2, marks=pytest.mark.slow),
                                            pytest.param(9, marks=pytest.mark.slow)])
def test_chunks_give_the_bits_of_single_steps(single, steps_per_call):
    # 76 examples, batch 8: 9 steps an epoch, so chunks of 2 and 4 leave a short last chunk,
    # 9 fills the epoch and 20 is longer than it.
    chunked = _fit(steps_per_call)
    _assert_same_run(single, chunked)
    assert chunked.checksums.shape[0] == 18


def test_chunks_with_augmentation_and_per_copy_data():
    copies = Copies(k=[1.0, 3.0], data_seed=[1, 2], augment_seed=[5, 6])
    _assert_same_run(_fit(1, copies=copies, augment=_flip), _fit(4, copies=copies, augment=_flip))


def test_chunks_around_host_chosen_guard_refreshes():
    def guarded():
        return optax.chain(perturbed_sgd(0.1, 1.0, momentum=0.9), cfl_guard(0.1, momentum=0.9, every=3, iterations=2,
                                                                             first_iterations=2))

    # 9 steps: a refresh at steps 0, 3 and 6, chunks of the two steps between them
    single = _fit(1, optimizer=guarded(), refresh_every=3, epochs=1)
    chunked = _fit(4, optimizer=guarded(), refresh_every=3, epochs=1)
    _assert_same_run(single, chunked)
    np.testing.assert_array_equal(single.guard_lambda, chunked.guard_lambda)


def test_a_guarded_run_compiles_the_plain_step_and_one_estimate_program():
    """With host-chosen refreshes a guarded run compiles the plain step and one estimate program:
    the first estimate and the refreshes share it (the iteration count is chosen inside), and the
    refresh steps run in the chunks of the plain step."""
    guard = cfl_guard(0.1, momentum=0.9, every=3, iterations=2, first_iterations=5)
    engine = Lockstep(_mlp(), optax.chain(perturbed_sgd(0.1, 1.0, momentum=0.9), guard), refresh_every=3)
    result = engine.fit(_data(), Copies(k=[1.0, 3.0]), epochs=1, batch_size=8, progress=False)
    kinds = sorted((k[0], k[-1]) for k in engine._cache if isinstance(k, tuple))
    assert kinds == [("estimate", ()), ("step", False)]
    estimate = engine._cache[next(k for k in engine._cache if isinstance(k, tuple) and k[0] == "estimate")]
    assert estimate._cache_size() == 1  # steps 0, 3 and 6 ran it
    assert np.all(np.isfinite(result.guard_lambda)) and np.all(result.guard_lambda > 0)
    assert np.all(np.diff(result.guard_lambda[:3], axis=0) == 0)  # steps 0-2 read step 0's estimate
    assert np.any(result.guard_lambda[3] != result.guard_lambda[2])  # step 3 refreshed it


def test_the_estimate_program_and_the_plain_step_give_the_refresh_steps_bits():
    """Running the estimate as a program of its own, then the plain step, is the step with the
    estimate inside (``refresh=True``), bit for bit, at the first estimate and at a refresh."""
    guard = cfl_guard(0.1, momentum=0.9, every=2, iterations=2, first_iterations=4)
    engine = Lockstep(_mlp(), optax.chain(perturbed_sgd(0.1, 1.0, momentum=0.9), guard), refresh_every=2)
    copies = Copies(k=[1.0, 3.0])
    state = engine.init(copies)
    x, y = _data()
    per_copy, shared = engine._hyper_arrays(copies)
    fused = engine._step_fn(per_copy_data=False, per_copy_names=tuple(per_copy), shared_names=tuple(shared),
                            mask=None, guarded=True, refresh=True)[0]
    split = engine.step_function(copies, state)
    for step in range(3):  # the first estimate, a plain step, a refresh
        batch = (x[8 * step:8 * step + 8], y[8 * step:8 * step + 8])
        got, metrics = split(state, *batch, step)
        if step != 1:
            want, expected = fused(state, per_copy, shared, *map(jnp.asarray, batch), None)
            for a, b in zip(jax.tree.leaves((got, metrics)), jax.tree.leaves((want, expected))):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        state = got
    compiled = split.compile(state, *batch, 2)
    assert compiled.as_text().count("HloModule") == 2  # the step's program and the estimate's
    assert split.compile(state, *batch, 1).as_text().count("HloModule") == 1


def test_one_chunk_program_serves_every_chunk_length():
    engine = Lockstep(_mlp(), perturbed_sgd(0.1, 1.0), steps_per_call=4)
    engine.fit(_data(), Copies(k=[1.0, 2.0]), epochs=2, batch_size=8, progress=False)  # chunks of 4, 4, 1
    _, steps = next(v for k, v in engine._cache.items() if isinstance(k, tuple) and k[0] == "step")
    assert steps._cache_size() == 1
    # new numbers (k, lr) reuse it too
    engine.fit(_data(), Copies(k=[5.0, 7.0]), epochs=1, batch_size=8, progress=False)
    assert steps._cache_size() == 1


def test_resume_of_a_chunked_run_is_bit_exact(tmp_path):
    class Killed(Exception):
        pass

    def kill_after_first(epoch, _):
        if epoch == 1:
            raise Killed

    whole = _fit(4)
    with pytest.raises(Killed):
        _fit(4, out=tmp_path / "run", on_epoch=kill_after_first)
    resumed = _fit(4, out=tmp_path / "run")
    _assert_same_run(whole, resumed)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "8", True])
def test_steps_per_call_is_checked(bad):
    with pytest.raises((ValueError, TypeError), match="steps_per_call"):
        Lockstep(_mlp(), optax.sgd(0.1), steps_per_call=bad)


def _conv_model(conv):
    def init(key):
        k1, k2 = jax.random.split(key)
        return {"w": jax.random.normal(k1, (3, 3, 1, 4)) * 0.3, "v": jax.random.normal(k2, (4, 4)) * 0.3}

    def apply(p, x):
        h = conv(x.reshape(x.shape[0], 4, 3, 1), p["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.tanh(h).mean(axis=(1, 2)) @ p["v"]

    return functional_model(init, apply, name="conv")


def _fit_conv(model, steps_per_call):
    engine = Lockstep(model, perturbed_sgd(0.1, 1.0), steps_per_call=steps_per_call, checksums=True)
    return engine.fit(_data(), Copies(k=[1.0, 3.0]), epochs=1, batch_size=8, progress=False)


def test_a_model_with_lax_convolutions_chunks_with_the_bits_of_single_steps():
    """lax.conv_general_dilated's gradients are not in XLA:CPU's canonical form (naive loop nests
    inside a loop): the chunk loop's step goes through canonical_convs, so the model chunks,
    without a warning, and gets the bits of one call per step; so does jaxcfl's convolution."""
    import warnings

    from jax import lax

    from jaxcfl.nn.nets import conv_general_dilated

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for conv in (lax.conv_general_dilated, conv_general_dilated):
            _assert_same_run(_fit_conv(_conv_model(conv), 1), _fit_conv(_conv_model(conv), 4))


def test_a_model_whose_own_loop_holds_convolutions_runs_one_call_per_step():
    """A convolution inside the model's own loop (a ``lax.scan`` over layers) is left as it is by the
    rewrite, and its gradient would be a naive loop nest inside the chunk loop on CPU: fit warns
    and runs one call per step, with the same bits."""
    from jax import lax

    def init(key):
        k1, k2 = jax.random.split(key)
        return {"w": jax.random.normal(k1, (2, 3, 3, 1, 1)) * 0.3, "v": jax.random.normal(k2, (1, 4)) * 0.3}

    def apply(p, x):
        def layer(h, w):
            h = lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return jnp.tanh(h), None

        h = lax.scan(layer, x.reshape(x.shape[0], 4, 3, 1), p["w"])[0]
        return h.mean(axis=(1, 2)) @ p["v"]

    model = functional_model(init, apply, name="scanned-conv")
    single = _fit_conv(model, 1)
    if jax.default_backend() == "cpu":
        with pytest.warns(RuntimeWarning, match="one call per step"):
            fallback = _fit_conv(model, 4)
    else:
        fallback = _fit_conv(model, 4)
    _assert_same_run(single, fallback)
