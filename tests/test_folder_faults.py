"""Result folders killed at every step of a commit, and training folders written by an older version.

A kill is simulated at every disk operation of a commit (a temporary file written, flushed,
renamed; the manifest written; a journal appended, truncated): the folder as it stood on disk
at that instant is copied aside, and the copy is resumed. Every such copy must resume from its
last committed unit, and a training run must end with the bytes of an uninterrupted one. One test
kills a real process with SIGKILL inside a commit. The legacy folder (``tests/data/legacy_training_run``,
written by jaxcfl at commit fb1e471) is made by ``tests/_legacy_run.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from _legacy_run import LEGACY, legacy_fit
from jaxcfl._core import folder as folder_module
from jaxcfl._core.folder import ResultFolder
from jaxcfl._core.io import TEMP_SUFFIX


class Crashes:
    """The folder ``root`` as it stands on disk just before each disk operation inside it, while armed.

    Each distinct state is copied aside: resuming a copy is resuming after a kill at that instant
    (a simulated crash runs no clean-up, unlike an exception, so the copies hold what a kill leaves:
    temporary files, a torn append).
    """

    OPS = ("replace", "rename", "fsync", "unlink", "ftruncate", "truncate", "write", "chmod", "mkdir", "rmdir")

    def __init__(self, root, store, monkeypatch):
        self.root, self.store = Path(root).resolve(), Path(store)
        self.armed = self._busy = False
        self.snaps: list[tuple[str, Path]] = []
        self._seen: set[str] = set()
        for name in self.OPS:
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name)))

    @staticmethod
    def _target(arg) -> Path | None:
        if isinstance(arg, int):  # a descriptor: the file it is open on (Linux)
            try:
                arg = os.readlink(f"/proc/self/fd/{arg}")
            except OSError:
                return None
        try:
            return Path(os.path.abspath(arg)).resolve()
        except (TypeError, ValueError):
            return None

    def _wrap(self, name, real):
        def op(*args, **kwargs):
            if self.armed and not self._busy and args:
                target = self._target(args[0])
                if target is not None and target.is_relative_to(self.root):
                    self.snap(f"before {name}({target.name})")
            return real(*args, **kwargs)
        return op

    def _digest(self) -> str:
        h = hashlib.sha256()
        for path in sorted(self.root.rglob("*")):
            h.update(str(path.relative_to(self.root)).encode() + b"\0")
            if path.is_file():
                h.update(path.read_bytes())
        return h.hexdigest()

    def snap(self, label: str) -> None:
        self._busy = True
        try:
            digest = self._digest()
            if digest not in self._seen:
                self._seen.add(digest)
                copy = self.store / f"{len(self.snaps):03d}"
                shutil.copytree(self.root, copy)
                self.snaps.append((label, copy))
        finally:
            self._busy = False


def _leftovers(path: Path) -> list[str]:
    return [p.name for p in path.rglob("*") if p.name.endswith(TEMP_SUFFIX)]


def test_a_kill_at_every_step_of_a_commit_keeps_the_last_commit(tmp_path, monkeypatch):
    root = tmp_path / "f"
    with ResultFolder(root, kind="test", settings={}) as f:
        f.commit("unit.bin", b"first")
    crashes = Crashes(root, tmp_path / "snaps", monkeypatch)
    with ResultFolder(root, kind="test", settings={}) as f:
        crashes.armed = True
        f.commit("unit.bin", b"second")  # a unit replaced
        f.commit("new.bin", b"new")  # a unit added
        crashes.snap("after the commits")
        crashes.armed = False
    assert len(crashes.snaps) >= 8, [label for label, _ in crashes.snaps]
    seen = []
    for label, copy in crashes.snaps:
        with ResultFolder(copy, kind="test", settings={}) as f:
            state = (f.read("unit.bin"), f.read("new.bin"))
            assert state[0] in ((b"first", "ok"), (b"second", "ok")), label
            assert state[1] in ((None, "absent"), (b"new", "ok")), label
            assert not _leftovers(copy), label  # a killed write's temporary file is removed
        manifest = json.loads((copy / "manifest.json").read_text())
        assert "previous" not in manifest, label  # the interrupted commit was settled when the folder opened
        seen.append((state[0][0], state[1][0]))
    # One commit point each: the old unit until it, the new one from it on, and never the other way round.
    order = [(b"first", None), (b"second", None), (b"second", b"new")]
    indices = [order.index(s) for s in seen]
    assert indices == sorted(indices) and set(indices) == {0, 1, 2}, list(zip(crashes.snaps, seen))


def test_a_kill_at_every_step_of_a_journal_append_keeps_the_committed_records(tmp_path, monkeypatch):
    root = tmp_path / "f"
    with ResultFolder(root, kind="test", settings={}) as f:
        length = f.append("log", b"one", at=0)
        f.commit("meta.json", json.dumps(length).encode())
    crashes = Crashes(root, tmp_path / "snaps", monkeypatch)
    with ResultFolder(root, kind="test", settings={}) as f:
        crashes.armed = True
        f.append("log", b"never vouched for", at=length)  # as if its epoch had died before its commit
        length = f.append("log", b"two", at=json.loads(f.read("meta.json")[0]))  # written over: after the vouched bytes
        f.commit("meta.json", json.dumps(length).encode())
        crashes.snap("after")
        crashes.armed = False
    seen = []
    for label, copy in crashes.snaps:
        with ResultFolder(copy, kind="test", settings={}) as f:
            vouched = json.loads(f.read("meta.json")[0])
            records, state = f.records("log", vouched)
            assert state == "ok" and records in ([b"one"], [b"one", b"two"]), (label, records, state)
            seen.append(len(records))
            assert f.append("log", b"next", at=vouched) > vouched  # the next append starts after the committed bytes
            f.commit("meta.json", json.dumps(f.append("log", b"x", at=vouched)).encode())
            assert f.records("log", json.loads(f.read("meta.json")[0]))[0][-1] == b"x"
    assert seen == sorted(seen) and set(seen) == {1, 2}


def test_records_refuse_damage(tmp_path):
    with ResultFolder(tmp_path, kind="test", settings={}) as f:
        length = f.append("log", b"abc", at=0)
        length = f.append("log", b"defg", at=length)
        assert f.records("log", length) == ([b"abc", b"defg"], "ok")
        assert f.records("log", length - 1) == (None, "corrupt")  # a cut record
        assert f.records("log", length + 1) == (None, "missing")
        data = bytearray((tmp_path / "log").read_bytes())
        data[-2] ^= 1
        (tmp_path / "log").write_bytes(bytes(data))
        assert f.records("log", length) == (None, "corrupt")
        assert json.loads((tmp_path / "manifest.json").read_text())["journals"] == ["log"]


# --- training runs ------------------------------------------------------------------------------

def _same_run(got, want):
    assert got.fingerprints == want.fingerprints
    for name in ("test_accuracy", "test_loss", "train_loss", "divergence", "lr", "step_divergence", "probe_divergence",
                 "param_trace", "checksums", "test_predictions", "test_outputs"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
        assert getattr(got, name).dtype == getattr(want, name).dtype, name


def _metrics(out):
    payload = json.loads((Path(out) / "metrics.json").read_text())
    payload.pop("seconds"), payload.pop("compile_seconds")
    return (Path(out) / "metrics.csv").read_bytes(), payload


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    return legacy_fit(out), _metrics(out)


def _resume(out):
    """The run resumed in ``out``: its result and the epochs it trained (no warning allowed: nothing was lost)."""
    trained = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = legacy_fit(out, on_epoch=lambda epoch, partial: trained.append(epoch))
    return result, trained


def test_a_training_run_killed_at_every_step_of_an_epochs_commit_resumes_bit_exact(tmp_path, monkeypatch, reference):
    want, metrics = reference
    out = tmp_path / "run"
    out.mkdir()
    crashes = Crashes(out, tmp_path / "snaps", monkeypatch)

    def arm(epoch, partial):  # the second epoch's commit, then the end of the run (the metrics' commits)
        crashes.armed = epoch in (1, 3)

    legacy_fit(out, on_epoch=arm)
    crashes.armed = False
    labels = [label for label, _ in crashes.snaps]
    # Among the states: a torn journal append, a checkpoint written but not committed, one committed but not renamed.
    assert any("write(history.log)" in label for label in labels), labels
    assert any(p.name.startswith(".checkpoint.npz.") for _, copy in crashes.snaps for p in copy.iterdir()), labels
    assert any("previous" in json.loads((copy / "manifest.json").read_text()) for _, copy in crashes.snaps), labels
    firsts = []
    for label, copy in crashes.snaps:
        got, trained = _resume(copy)
        _same_run(got, want)
        assert _metrics(copy) == metrics, label
        assert trained[:1] in ([2], [3], []), (label, trained)  # epoch 1 (and 2, once committed) kept
        assert not _leftovers(copy), label
        firsts.append(trained[0] if trained else 4)
    assert firsts == sorted(firsts) and {2, 3, 4} <= set(firsts), list(zip(labels, firsts))


def test_each_epoch_writes_what_it_adds_not_the_history(tmp_path, monkeypatch):
    """The bytes written per epoch (the checkpoint, the epoch's record, its CSV rows, the manifest) do not grow."""
    written: list[int] = []
    real_write_temp, real_append = folder_module.write_temp, folder_module.append_at

    def write_temp(path, data):
        written[-1] += len(data)
        return real_write_temp(path, data)

    def append_at(path, data, at, **kwargs):
        written[-1] += len(data)
        return real_append(path, data, at, **kwargs)

    monkeypatch.setattr(folder_module, "write_temp", write_temp)
    monkeypatch.setattr(folder_module, "append_at", append_at)
    from jaxcfl._core import io as io_module
    real_atomic_exit = io_module.atomic_open.__exit__

    def counting_exit(self, exc_type, exc, tb):
        if exc_type is None:
            written[-1] += self.fh.tell()
        return real_atomic_exit(self, exc_type, exc, tb)

    monkeypatch.setattr(io_module.atomic_open, "__exit__", counting_exit)
    written.append(0)
    legacy_fit(tmp_path / "run", epochs=8, on_epoch=lambda epoch, partial: written.append(0))
    per_epoch = written[1:-1]  # epochs 2..8 (the first one also makes the folder; the last one's tail is the end)
    assert len(per_epoch) == 7 and max(per_epoch) <= min(per_epoch) + 64, per_epoch


def test_a_folder_written_by_the_previous_version_resumes_bit_exact(tmp_path, reference):
    want, metrics = reference
    out = tmp_path / "run"
    shutil.copytree(LEGACY, out)
    with np.load(out / "checkpoint.npz") as z:
        assert json.loads(z["meta"].tobytes())["epochs_done"] == 2 and "step_divergence" in z.files  # the old format
    got, trained = _resume(out)
    assert trained == [3]  # the two epochs it holds are kept
    _same_run(got, want)
    assert _metrics(out) == metrics
    again, trained = _resume(out)  # and the folder it leaves is of the new format, and finished
    assert trained == [] and again.fingerprints == want.fingerprints
    with np.load(out / "checkpoint.npz") as z:
        assert "journal" in json.loads(z["meta"].tobytes()) and "step_divergence" not in z.files


def test_a_legacy_folder_killed_in_its_first_new_commit_still_resumes(tmp_path, monkeypatch, reference):
    want, metrics = reference
    out = tmp_path / "run"
    shutil.copytree(LEGACY, out)
    crashes = Crashes(out, tmp_path / "snaps", monkeypatch)
    crashes.armed = True
    legacy_fit(out)
    crashes.armed = False
    assert len(crashes.snaps) >= 20, [label for label, _ in crashes.snaps]
    for label, copy in crashes.snaps:  # the history becomes a journal, epoch 3 is committed, then the metrics
        got, trained = _resume(copy)
        _same_run(got, want)
        assert trained in ([3], []), (label, trained)
        assert _metrics(copy) == metrics, label


_KILLER = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from jaxcfl._core import folder
import _legacy_run as t
real = folder.publish
def publish(tmp, path):
    if Path(path).name == "checkpoint.npz" and Path(path).exists():  # the second checkpoint: after its manifest
        os.kill(os.getpid(), signal.SIGKILL)
    real(tmp, path)
folder.publish = publish
t.legacy_fit({out!r})
"""


@pytest.mark.slow
def test_a_real_sigkill_inside_a_commit_loses_nothing(tmp_path, reference):
    want, metrics = reference
    out = tmp_path / "run"
    code = _KILLER.format(tests=str(Path(__file__).parent), out=str(out))
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert _leftovers(out)  # the killed commit left its temporary file
    got, trained = _resume(out)
    assert trained == [2, 3]  # epoch 1 was committed; epoch 2's commit was cut between the manifest and the rename
    _same_run(got, want)
    assert _metrics(out) == metrics


@pytest.mark.slow
def test_a_guarded_checkpoint_from_before_the_guards_counters_resumes(tmp_path):
    """A guarded run's checkpoint written before ``CFLGuardState`` gained its fail-closed counters
    (three leaves fewer) resumes: the counters start at zero and the run ends as an uninterrupted one."""
    import io as io_module

    import optax

    from jaxcfl._core.folder import ResultFolder
    from jaxcfl.nn._guard import cfl_guard
    from jaxcfl.nn._lockstep import CHECKPOINT, Copies, Lockstep
    from jaxcfl.nn._perturb import perturbed_sgd

    from _legacy_run import DATA, TEST, factory

    engine = Lockstep(factory, lambda k: optax.chain(perturbed_sgd(0.05, k), cfl_guard(0.05, every=2, iterations=3)),
                      copies_mode="vmap")

    def fit(out, epochs):
        return engine.fit(DATA, Copies(k=(1.0, 2.0)), epochs=epochs, batch_size=16, test=TEST, out=out, progress=False,
                          settings=dict(run="guarded"))

    want = fit(tmp_path / "whole", 2)
    out = tmp_path / "old"
    fit(out, 1)
    with np.load(out / CHECKPOINT) as z:
        arrays = {name: z[name] for name in z.files}
    template = jax.tree_util.tree_flatten_with_path(engine.init(Copies(k=(1.0, 2.0))))[0]
    counters = [i for i, (path, _) in enumerate(template)
                if jax.tree_util.keystr(path).endswith((".failed_estimates", ".refused_steps", ".bad_lr"))]
    assert len(counters) == 3
    kept = [arrays[f"leaf_{i}"] for i in range(len(template)) if i not in counters]
    old = {name: value for name, value in arrays.items() if not name.startswith("leaf_")}
    old.update({f"leaf_{i}": leaf for i, leaf in enumerate(kept)})
    buffer = io_module.BytesIO()
    np.savez(buffer, **old)
    manifest = json.loads((out / "manifest.json").read_text())
    with ResultFolder(out, kind=manifest["kind"], settings=manifest["settings"]) as folder:
        folder.commit(CHECKPOINT, buffer.getvalue())
    got = fit(out, 2)
    assert got.fingerprints == want.fingerprints
    np.testing.assert_array_equal(got.test_accuracy, want.test_accuracy)


def test_a_run_whose_guard_refused_steps_says_so():
    """A schedule that gives a negative lr: the guard refuses those steps (the weights do not move)
    and the trainer warns at the end of the run, naming what the guard refused."""
    import optax

    from jaxcfl.nn._guard import cfl_guard
    from jaxcfl.nn._lockstep import Copies, Lockstep

    from _legacy_run import DATA, TEST, factory

    guard = cfl_guard(lambda count: -0.05, every=2, iterations=2, first_iterations=2)
    engine = Lockstep(factory, optax.chain(optax.sgd(0.05), guard), copies_mode="vmap")
    with pytest.warns(RuntimeWarning, match="cfl_guard"):
        result = engine.fit(DATA, Copies(k=(1.0,)), epochs=1, batch_size=16, test=TEST, progress=False)
    assert np.all(result.guard_lr == 0)
