"""The lockstep trainer: perturbed copies, determinism, checkpoints and resume."""

from __future__ import annotations

import json
import os
import logging
from pathlib import Path

import numpy as np
import pytest

from jaxcfl.nn import _preset as tr
from jaxcfl.nn._preset import TrainConfig, train

SMALL = dict(model="cnn", epochs=2, batch_size=64, train_size=192, test_size=64, eval_batch_size=64)


@pytest.fixture(scope="module")
def lockstep():
    return train(TrainConfig(**SMALL), ks=(1.0, 2.0, 4.0, 3.0), seed=1, progress=False)


@pytest.fixture(scope="module")
def alone():
    return train(TrainConfig(**SMALL), ks=(3.0,), seed=1, progress=False)


@pytest.mark.slow
def test_powers_of_two_identical_odd_k_differs(lockstep):
    f = lockstep.fingerprints
    assert f[0] == f[1] == f[2]
    assert f[3] != f[0]
    assert np.all(lockstep.step_divergence[:, :3] == 0)
    assert lockstep.step_divergence[-1, 3] > 0
    assert lockstep.probe_divergence.shape == lockstep.step_divergence.shape == (2 * 3, 4)


@pytest.mark.slow
def test_history_shapes_and_schedule(lockstep):
    r = lockstep
    assert r.epochs_done == 2
    assert r.test_accuracy.shape == r.train_loss.shape == r.divergence.shape == (2, 4)
    assert np.all((r.test_accuracy >= 0) & (r.test_accuracy <= 1))
    assert np.all(np.isfinite(r.train_loss))
    assert r.final_accuracy().shape == (4,)
    np.testing.assert_allclose(r.final_accuracy(1), r.test_accuracy[-1])
    # 2 epochs: the paper's milestones (20/40/60/80%) scale to epoch 1 only... after rounding.
    cfg = TrainConfig(**SMALL)
    assert cfg.milestone_epochs == (1,)
    np.testing.assert_allclose(r.lr, [0.1, 0.1 * 0.1])
    assert TrainConfig(epochs=200).milestone_epochs == (40, 80, 120, 160)


@pytest.mark.parametrize("epochs, milestones, lr, gamma", [(10, None, 0.1, 0.1), (7, (2, 3, 6), 0.3, 0.5),
                                                           (3, (), 0.05, 0.2)])
def test_optimizer_lr_agrees_with_lr_at_every_step(epochs, milestones, lr, gamma):
    """The optimiser's traced schedule (over steps) and ``TrainConfig.lr_at`` (over epochs) are one schedule."""
    import jax
    import jax.numpy as jnp

    cfg = TrainConfig(epochs=epochs, milestones=milestones, lr=lr, gamma=gamma)
    steps_per_epoch = 3
    boundaries = tuple(m * steps_per_epoch for m in cfg.milestone_epochs)
    lr32, gamma32 = (jnp.float32(x) for x in (lr, gamma))
    # momentum 0, no weight decay, k = 1: the update of a unit gradient is exactly -lr(step)
    opt = tr._optimizer(lr32, jnp.float32(1.0), 0.0, 0.0, gamma32, boundaries, nesterov=False)
    params = {"w": jnp.zeros(())}
    update = jax.jit(lambda s: opt.update({"w": jnp.ones(())}, s, params))
    state, applied = opt.init(params), []
    for _ in range(epochs * steps_per_epoch):
        u, state = update(state)
        applied.append(-float(u["w"]))
    expected = [cfg.lr_at(s // steps_per_epoch) for s in range(epochs * steps_per_epoch)]
    np.testing.assert_allclose(applied, expected, rtol=1e-6)  # float32 against float64
    traced = jax.vmap(tr.step_decay(lr32, gamma32, boundaries))(jnp.arange(epochs * steps_per_epoch))
    np.testing.assert_array_equal(traced, np.float32(applied))
    decays = [sum(e >= m for m in cfg.milestone_epochs) for e in range(epochs)]
    assert [cfg.lr_at(e) for e in range(epochs)] == [lr * gamma**d for d in decays]


@pytest.mark.slow
def test_test_loss_and_predictions(lockstep):
    """Predictions of the last epoch reproduce its accuracy; the loss is a finite cross-entropy."""
    from jaxcfl.nn import _data as datasets
    r = lockstep
    y_test = datasets.load("builtin")[3][: SMALL["test_size"]]
    assert r.test_predictions.shape == (4, SMALL["test_size"])
    np.testing.assert_allclose((r.test_predictions == y_test).mean(axis=1), r.test_accuracy[-1])
    assert r.test_loss.shape == (2, 4) and np.all(np.isfinite(r.test_loss)) and np.all(r.test_loss > 0)
    np.testing.assert_array_equal(r.test_loss[:, 0], r.test_loss[:, 1])  # k = 2 is k = 1
    np.testing.assert_allclose(r.final_loss(1), r.test_loss[-1])
    assert r.param_trace.size == 0  # not asked for


def test_final_epochs_keep_the_papers_proportion():
    assert tr.final_epochs(200) == 10 and tr.final_epochs(15) == 1 and tr.final_epochs(1) == 1
    assert tr.final_epochs(60) == 3
    with pytest.raises(ValueError, match="epochs"):
        tr.final_epochs(0)


@pytest.mark.slow
def test_param_trace_records_copy_0_after_every_step(tmp_path):
    import jax

    cfg = TrainConfig(**SMALL)
    r = train(cfg, ks=(1.0, 3.0), seed=1, progress=False, trace_params=500)
    flat = np.concatenate([np.asarray(leaf[0]).ravel() for leaf in jax.tree.leaves(r.state.params)])
    idx = tr.trace_indices(flat.size, 500)
    assert r.param_trace.shape == (6, 500) and len(set(idx)) == 500 and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(r.param_trace[-1], flat[idx])
    assert np.all(r.param_trace[0] != r.param_trace[-1])
    np.testing.assert_array_equal(tr.trace_indices(100, 10**6), np.arange(100))
    # Kept in the checkpoint: a finished run read back has the same trace and predictions.
    train(cfg, ks=(1.0, 3.0), seed=1, progress=False, trace_params=500, out=tmp_path)
    again = train(cfg, ks=(1.0, 3.0), seed=1, progress=False, trace_params=500, out=tmp_path)
    np.testing.assert_array_equal(again.param_trace, r.param_trace)
    np.testing.assert_array_equal(again.test_predictions, r.test_predictions)


@pytest.mark.slow
def test_lockstep_copy_equals_separate_run(lockstep, alone):
    """A copy trained in lockstep is bit-identical to the same k trained alone (same compiled step per copy)."""
    assert alone.fingerprints[0] == lockstep.fingerprints[3]
    np.testing.assert_array_equal(alone.test_accuracy[:, 0], lockstep.test_accuracy[:, 3])


@pytest.mark.slow
def test_seed_changes_batch_order_not_initialisation(alone):
    other = train(TrainConfig(**SMALL), ks=(3.0,), seed=2, progress=False)
    assert other.fingerprints != alone.fingerprints
    g1, s1 = tr.init_lockstep(TrainConfig(**SMALL), (1.0,), 1, 10)
    g2, s2 = tr.init_lockstep(TrainConfig(**SMALL), (1.0,), 1, 10)
    from jaxcfl._core.determinism import fingerprint

    assert fingerprint(s1.params) == fingerprint(s2.params)


@pytest.mark.slow
def test_no_recompilation_for_new_numbers(alone, caplog):
    """New lr, momentum, weight decay, k, seed and init seed reuse every compiled program."""
    import jax

    caplog.set_level(logging.WARNING)
    with jax.log_compiles(True):
        train(TrainConfig(**dict(SMALL, lr=0.05, momentum=0.5, weight_decay=1e-3, init_seed=7)), ks=(5.0,), seed=4,
              progress=False)
    compiles = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert not [m for m in compiles if "step" in m or "lambda" in m or "one" in m], compiles


@pytest.mark.slow
def test_resume_after_interruption_gives_the_same_bytes(tmp_path, lockstep):
    class Killed(Exception):
        pass

    def kill_after_first(epoch, partial):
        if epoch == 1:
            raise Killed

    out = tmp_path / "run"
    with pytest.raises(Killed):
        train(TrainConfig(**SMALL), ks=(1.0, 2.0, 4.0, 3.0), seed=1, out=out, progress=False, on_epoch=kill_after_first)
    assert _checkpoint_meta(out)["epochs_done"] == 1
    resumed = train(TrainConfig(**SMALL), ks=(1.0, 2.0, 4.0, 3.0), seed=1, out=out, progress=False)
    assert resumed.fingerprints == lockstep.fingerprints
    np.testing.assert_array_equal(resumed.test_accuracy, lockstep.test_accuracy)
    np.testing.assert_array_equal(resumed.step_divergence, lockstep.step_divergence)
    metrics = (out / "metrics.csv").read_text().splitlines()
    assert metrics[0] == "epoch,k,lr,train_loss,test_accuracy,test_loss,divergence" and len(metrics) == 1 + 2 * 4
    assert json.loads((out / "metrics.json").read_text())["fingerprints"] == list(lockstep.fingerprints)
    # A finished run is not recomputed, and a different run is refused.
    again = train(TrainConfig(**SMALL), ks=(1.0, 2.0, 4.0, 3.0), seed=1, out=out, progress=False)
    assert again.fingerprints == lockstep.fingerprints
    with pytest.raises(ValueError, match=r"different training run \(differs in: ks\)"):
        train(TrainConfig(**SMALL), ks=(1.0, 3.0), seed=1, out=out, progress=False)


def _checkpoint_meta(out, name=tr.CHECKPOINT):
    with np.load(Path(out) / name) as z:
        return json.loads(z["meta"].tobytes())


@pytest.mark.slow
def test_a_second_training_run_on_the_same_folder_is_refused(tmp_path):
    from jaxcfl._core.folder import FolderInUse

    # Before its first epoch ends (it has written nothing yet), a run already holds its folder.
    seen = []

    def try_another(epoch, partial):
        with pytest.raises(FolderInUse, match=f"pid {os.getpid()}"):
            train(TrainConfig(**SMALL), ks=(1.0,), seed=1, out=tmp_path, progress=False)
        seen.append(epoch)

    train(TrainConfig(**dict(SMALL, epochs=1)), ks=(1.0,), seed=1, out=tmp_path, progress=False, on_epoch=try_another)
    assert seen == [1]
    # Released at the end: the same run again finds its finished checkpoint.
    assert train(TrainConfig(**dict(SMALL, epochs=1)), ks=(1.0,), seed=1, out=tmp_path, progress=False).epochs_done == 1


@pytest.mark.slow
def test_a_kill_between_checkpoint_writes_resumes_correctly(tmp_path, lockstep, monkeypatch):
    """Killed inside the checkpoint's commit (the manifest records epoch 2, the file is not yet renamed): the
    resume keeps epoch 1's checkpoint, loses nothing else, and ends with the same bytes. Kills at every other
    step of a commit: tests/test_folder_faults.py."""
    import warnings

    from jaxcfl._core import folder as folder_module

    ks = (1.0, 2.0, 4.0, 3.0)
    out = tmp_path / "run"
    real = folder_module.publish

    def dying(tmp, path):
        if Path(path).name == tr.CHECKPOINT and _checkpoint_meta(Path(tmp).parent, Path(tmp).name)["epochs_done"] == 2:
            raise KeyboardInterrupt("killed between the manifest and the rename")
        real(tmp, path)

    monkeypatch.setattr(folder_module, "publish", dying)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**SMALL), ks=ks, seed=1, out=out, progress=False)
    monkeypatch.setattr(folder_module, "publish", real)
    assert _checkpoint_meta(out)["epochs_done"] == 1  # the file of epoch 1 is there; the manifest names epoch 2's
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is damaged: no "training again" warning
        resumed = train(TrainConfig(**SMALL), ks=ks, seed=1, out=out, progress=False)
    assert resumed.fingerprints == lockstep.fingerprints
    np.testing.assert_array_equal(resumed.step_divergence, lockstep.step_divergence)


@pytest.mark.slow
def test_a_damaged_checkpoint_is_retrained_not_used(tmp_path, lockstep):
    ks = (1.0, 2.0, 4.0, 3.0)
    train(TrainConfig(**SMALL), ks=ks, seed=1, out=tmp_path, progress=False)
    path = tmp_path / tr.CHECKPOINT
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="checkpoint.npz is corrupt"):
        again = train(TrainConfig(**SMALL), ks=ks, seed=1, out=tmp_path, progress=False)
    assert again.fingerprints == lockstep.fingerprints
    (tmp_path / "manifest.json").write_text("{truncated")
    with pytest.raises(ValueError, match="manifest.json is unreadable"):
        train(TrainConfig(**SMALL), ks=ks, seed=1, out=tmp_path, progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(model="resnet7"), "model"),
        (dict(dataset="imagenet"), "dataset"),
        (dict(lr=-0.1), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(momentum=1.5), "momentum"),
        (dict(epochs=0), "epochs"),
        (dict(batch_size=0), "batch_size"),
        (dict(activation="gelu"), "activation"),
        (dict(momentum=0.0, nesterov=True), "nesterov"),
        (dict(guard=True, guard_safety=1.5), "guard_safety"),
        (dict(guard=True, guard_safety=0.0), "guard_safety"),
        (dict(guard=True, guard_every=0), "guard_every"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_bad_run_arguments():
    cfg = TrainConfig(**SMALL)
    with pytest.raises(ValueError, match="ks"):
        train(cfg, ks=(), progress=False)
    with pytest.raises(ValueError, match="ks"):
        train(cfg, ks=(1.0, -3.0), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        train(TrainConfig(**dict(SMALL, batch_size=512)), ks=(1.0,), progress=False)
    with pytest.raises(ValueError, match="copies_mode"):
        train(cfg, ks=(1.0,), progress=False, copies_mode="threads")
    with pytest.raises(ValueError, match="probe"):
        train(TrainConfig(**dict(SMALL, probe="no-such-layer")), ks=(1.0,), progress=False)


# lr 1.0 in the first epoch: beyond the limit. Few Lanczos iterations: each one, unrolled, costs compile time.
GUARDED = dict(SMALL, lr=1.0, guard=True, guard_every=2, guard_iterations=2, guard_first_iterations=4)


@pytest.fixture(scope="module")
def guarded():
    return train(TrainConfig(**GUARDED), ks=(3.0,), seed=1, progress=False)  # one copy: a third of the compile time


@pytest.mark.slow
def test_a_guarded_run_keeps_every_step_inside_the_limit(guarded):
    """The CFL guard in the trainer: every step's lr is at most the base lr and, where the guard
    acted, exactly safety * S / lambda. (Perturbed guarded copies: tests/test_guard.py.)"""
    from jaxcfl._core.stability import momentum_limit

    config = guarded.config
    lr, lam = guarded.guard_lr[:, 0], guarded.guard_lambda[:, 0]
    assert lr.shape == (2 * 3,) and np.all(np.isfinite(lam)) and np.all(lam > 0)
    base = np.array([config.lr_at(e) for e in (0, 1)]).repeat(3)
    assert np.all(lr <= base * (1 + 1e-6))
    acted = lr < base * (1 - 1e-6)
    assert acted[:3].any()  # lr 1.0 breaks the limit of this network from the first step
    limit = config.guard_safety * float(momentum_limit(config.momentum, config.nesterov))
    np.testing.assert_allclose(lr[acted] * lam[acted], limit, rtol=1e-5)
    assert "guard_every" in config.to_dict() and "guard" not in TrainConfig(**SMALL).to_dict()
    assert np.all(np.isfinite(guarded.test_accuracy))


@pytest.mark.slow
def test_a_killed_guarded_run_resumes_to_the_same_bytes(tmp_path, guarded):
    """The guard's state (its estimate and warm-start vector) is in the checkpoint."""

    class Killed(Exception):
        pass

    def kill_after_first(epoch, partial):
        if epoch == 1:
            raise Killed

    config, out = TrainConfig(**GUARDED), tmp_path / "guarded"
    with pytest.raises(Killed):
        train(config, ks=(3.0,), seed=1, out=out, progress=False, on_epoch=kill_after_first)
    resumed = train(config, ks=(3.0,), seed=1, out=out, progress=False)
    assert resumed.fingerprints == guarded.fingerprints
    np.testing.assert_array_equal(resumed.guard_lr, guarded.guard_lr)
    np.testing.assert_array_equal(resumed.guard_lambda, guarded.guard_lambda)
