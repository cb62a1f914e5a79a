"""Every command with ``--out`` guards its folder as ``jaxcfl sweep`` does.

The same run reuses its folder; a different run is refused before any work, naming what differs;
``variance`` adds new seeds to its grid; nothing overwrites another run's results; a folder that
cannot be written is one clear error (exit status 2 on the command line).

The identity checks run when the folder is opened, before the work: these tests stop each command
right after it has opened its folder (:func:`stop_after_open`), so they cost no training.
"""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest

from jaxcfl import cli
from jaxcfl._core.folder import FolderMismatch, FolderNotWritable, ResultFolder
from jaxcfl._core.results import ResultDir


class Stop(Exception):
    """Raised by a command right after it opened its folder (the check passed)."""


@pytest.fixture
def stop_after_open(monkeypatch):
    """Every :class:`ResultDir` with a folder stops its command once open (after the identity check);
    returns the identities they opened with."""
    opened: list[dict] = []
    real = ResultDir.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        if self.folder is not None:
            opened.append(dict(self.identity))
            self.close()
            raise Stop

    monkeypatch.setattr(ResultDir, "__init__", init)
    return opened


def _quiet(*_):
    pass


IMAGE = np.kron(np.indices((4, 4)).sum(axis=0) % 2, np.ones((2, 2))).astype(np.float32)  # an 8 x 8 checkerboard
OTHER_IMAGE = IMAGE[::-1].copy() * 0.5


def _api(module, *args, **fixed):
    """``call(out, *other_args, **changes)``: the experiment's ``run`` with ``fixed``, quiet."""
    def call(out, *other, **changes):
        import importlib

        run = importlib.import_module(f"jaxcfl.experiments.{module}").run
        return run(*(other or args), out=out, log=_quiet, **{**fixed, **changes})
    return call


def _sensitivity(out, **changes):
    import jax.numpy as jnp
    import optax

    from jaxcfl.nn._protocol import sensitivity

    x = np.random.default_rng(0).standard_normal((32, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    model = (lambda key: {"w": jnp.zeros((4, 2))}, lambda p, x: x @ p["w"])
    return sensitivity(model, optax.sgd(0.1), (x, y), test=(x, y), sources=["numerics"], determinism=False, out=out,
                       **{"runs": 2, "epochs": 1, "batch_size": 16, **changes})


BOUNDS = _api("image_bounds", IMAGE, lr=(1e-3,), kernel_sizes=(2,))
SWEEP = _api("image_sweep", IMAGE, lr=(1e-3,), alpha=(1.0,), kernel_size=2)

# (command, the run, another run, the setting its refusal names)
CASES = [
    ("reproduce table5", _api("table5"), lambda call, out: call(out, rtol=1e-2), "rtol"),
    ("reproduce fig2", _api("fig2", progress=False), lambda call, out: call(out, k=5.0), "k"),
    ("reproduce fig4", _api("fig4", progress=False), lambda call, out: call(out, steps=500), "steps"),
    ("reproduce appendix-f", _api("appendix_f"), lambda call, out: call(out, seed=3), "seed"),
    ("reproduce pde-guard", _api("pde_guard", progress=False), lambda call, out: call(out, safety=0.8), "safety"),
    ("reproduce open-question", _api("open_question", progress=False), lambda call, out: call(out, lr=0.05), "lr"),
    ("variance", _api("variance", progress=False), lambda call, out: call(out, epochs=2), "epochs"),
    ("determinism", _api("determinism_check"), lambda call, out: call(out, seed=2), "seed"),
    ("bounds", BOUNDS, lambda call, out: call(out, steps=50), "steps"),
    ("bounds, another image", BOUNDS, lambda call, out: call(out, OTHER_IMAGE), "image"),
    ("sweep", SWEEP, lambda call, out: call(out, steps=50), "steps"),
    ("sweep, another image", SWEEP, lambda call, out: call(out, OTHER_IMAGE), "image"),
    ("sensitivity", _sensitivity, lambda call, out: call(out, epochs=2), "epochs"),
]


@pytest.mark.parametrize("command, call, other, key", CASES, ids=[c[0] for c in CASES])
def test_the_same_run_reuses_its_folder_and_another_is_refused_naming_the_difference(
        tmp_path, stop_after_open, command, call, other, key):
    out = tmp_path / "out"
    with pytest.raises(Stop):
        call(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"] == stop_after_open[0] and key in manifest["settings"]
    with pytest.raises(Stop):  # the same run again: accepted
        call(out)
    with pytest.raises(ValueError, match=rf"differs in: [^)]*\b{key}\b") as refused:
        other(call, out)
    assert isinstance(refused.value, FolderMismatch) or "--out" in str(refused.value)
    assert "use another folder" in str(refused.value)
    assert json.loads((out / "manifest.json").read_text()) == manifest  # and nothing was changed


# --- additions that are meaningful: new seeds of a variance grid ------------------------------------

def test_variance_adds_new_seeds_to_its_grid(tmp_path, stop_after_open, monkeypatch):
    run = _api("variance", progress=False)
    out = tmp_path / "out"
    with pytest.raises(Stop):
        run(out, seeds=(1, 2))
    with pytest.raises(Stop):
        run(out, seeds=(3,))  # new seeds: accepted, added
    with pytest.raises(Stop):
        run(out, seeds=(2,))  # a subset: accepted, drops nothing
    assert [o["seeds"] for o in stop_after_open] == [[1, 2], [1, 2, 3], [1, 2, 3]]
    assert json.loads((out / "manifest.json").read_text())["settings"]["seeds"] == [1, 2, 3]
    # ... and the run covers the folder's seeds: it trains (or reuses) seed 1 first.
    monkeypatch.undo()
    trained = []

    def train(config, ks, *, seed, **kwargs):
        trained.append(seed)
        raise Stop

    monkeypatch.setattr("jaxcfl.nn._preset.train", train)
    with pytest.raises(Stop):
        run(out, seeds=(4,))
    assert trained == [1]
    assert json.loads((out / "manifest.json").read_text())["settings"]["seeds"] == [1, 2, 3, 4]


@pytest.mark.slow
def test_variance_with_other_seeds_keeps_the_first_ones_in_its_summary(tmp_path, capsys):
    from _strict_json import loads

    out = tmp_path / "var"
    tiny = ["variance", "--model", "cnn", "--train-size", "64", "--test-size", "32", "--batch-size", "32", "--epochs",
            "1", "--k", "1", "3", "--out", str(out), "--json"]
    assert cli.main([*tiny, "--seeds", "1", "2"]) == 0
    first = loads(capsys.readouterr().out)
    checkpoint = (out / "seed1" / "checkpoint.npz").read_bytes()
    assert cli.main([*tiny, "--seeds", "3"]) == 0
    captured = capsys.readouterr()
    second = loads(captured.out)
    assert "summary covers seeds [1, 2, 3]" in captured.err
    assert second["settings"]["seeds"] == [1, 2, 3] and sorted({r["seed"] for r in second["runs"]}) == [1, 2, 3]
    assert (out / "seed1" / "checkpoint.npz").read_bytes() == checkpoint  # reused, not trained again
    assert [r for r in second["runs"] if r["seed"] in (1, 2)] == first["runs"]


# --- on the command line: one line, exit status 2 ----------------------------------------------------

def _cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxcfl: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_the_cli_refuses_bounds_of_another_image_in_one_line(tmp_path, stop_after_open, capsys):
    argv = ["bounds", "--kernel-size", "2", "--lr", "1e-3", "--out", str(tmp_path / "b"), "--image", "checkerboard"]
    with pytest.raises(Stop):
        cli.main([*argv, "--size", "8"])
    err = _cli_error([*argv, "--size", "12"], capsys)
    assert "differs in: image, image_shape" in err and "[8, 8] in the folder, [12, 12] now" in err


def test_the_cli_refuses_a_reproduce_run_with_other_settings_in_one_line(tmp_path, stop_after_open, capsys):
    argv = ["reproduce", "table5", "--out", str(tmp_path / "t")]
    with pytest.raises(Stop):
        cli.main(argv)
    assert "differs in: rtol" in _cli_error([*argv, "--rtol", "0.01"], capsys)


def test_the_working_dtype_is_part_of_the_identity(tmp_path):
    import jax

    ResultDir(tmp_path, kind="demo", identity=dict(a=1)).close()
    with jax.enable_x64(True):
        with pytest.raises(FolderMismatch, match=r'differs in: dtype\): dtype="float32" in the folder, "float64" now'):
            ResultDir(tmp_path, kind="demo", identity=dict(a=1))


# --- folders that cannot be written ----------------------------------------------------------------

@pytest.fixture
def unwritable(monkeypatch):
    """``deny(path)``: from now on, nothing under ``path`` can be created or opened for writing (EACCES), as
    in a read-only folder; works for root too, whom chmod does not stop."""
    denied: list[str] = []
    real_open, real_mkdir = os.open, os.mkdir

    def blocked(path) -> bool:
        path = os.path.abspath(os.fspath(path))
        return any(path == d or path.startswith(d + os.sep) for d in denied)

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and blocked(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    def os_mkdir(path, *args, **kwargs):
        if blocked(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "mkdir", os_mkdir)
    return lambda path: denied.append(os.path.abspath(path))


@pytest.mark.parametrize("where", ["the folder", "a folder inside it"])
def test_a_read_only_folder_is_one_clear_error(tmp_path, unwritable, where):
    ro = tmp_path / "ro"
    ro.mkdir()
    unwritable(ro)
    out = ro if where == "the folder" else ro / "new"
    with pytest.raises(FolderNotWritable, match=rf"out='{out}' cannot be written: permission denied") as err:
        ResultDir(out, kind="demo", identity={})
    assert isinstance(err.value, ValueError) and isinstance(err.value, PermissionError)
    assert "[Errno" not in str(err.value)


def test_a_read_only_training_folder_is_one_clear_error(tmp_path, unwritable):
    import optax

    from jaxcfl.nn._lockstep import Lockstep

    unwritable(tmp_path)
    x = np.zeros((8, 2), np.float32)
    engine = Lockstep((lambda key: {"w": np.zeros((2, 2), np.float32)}, lambda p, x: x @ p["w"]), optax.sgd(0.1))
    with pytest.raises(FolderNotWritable, match="cannot be written"):
        engine.fit((x, np.zeros(8, np.int32)), epochs=1, batch_size=4, out=tmp_path / "run", progress=False)


@pytest.mark.parametrize("argv", [["reproduce", "table5"], ["bounds", "--image", "checkerboard", "--size", "8",
                                                             "--kernel-size", "2", "--lr", "1e-3"]],
                         ids=["reproduce table5", "bounds"])
def test_the_cli_answers_a_read_only_folder_with_one_line(tmp_path, unwritable, capsys, argv):
    unwritable(tmp_path)
    err = _cli_error([*argv, "--out", str(tmp_path / "out")], capsys)
    assert "cannot be written: permission denied" in err and "give a folder you can write to" in err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="chmod does not stop root")
def test_a_folder_made_read_only_with_chmod_is_one_clear_error(tmp_path):
    with ResultFolder(tmp_path / "f", kind="demo", settings={}) as f:
        f.commit("unit.bin", b"x")
    (tmp_path / "f").chmod(0o555)
    (tmp_path / "f" / ".jaxcfl.lock").chmod(0o444)
    try:
        with pytest.raises(FolderNotWritable, match="cannot be written"):
            ResultFolder(tmp_path / "f", kind="demo", settings={}).open()
    finally:
        (tmp_path / "f").chmod(0o755)


# --- the identity itself ----------------------------------------------------------------------------

def test_an_experiment_folder_of_an_older_version_is_adopted_with_a_warning(tmp_path):
    ResultDir(tmp_path, kind="demo").finish({}, "demo.json", {})  # no identity: what older versions wrote
    with pytest.warns(UserWarning, match="records no settings"):
        ResultDir(tmp_path, kind="demo", identity=dict(a=1)).close()
    ResultDir(tmp_path, kind="demo", identity=dict(a=1)).close()  # now it has one
    with pytest.raises(FolderMismatch, match=r"differs in: a\)"):
        ResultDir(tmp_path, kind="demo", identity=dict(a=2))


def test_an_identity_must_be_json(tmp_path):
    import dataclasses

    @dataclasses.dataclass
    class Schedule:
        every: int = 2

    got = ResultDir(tmp_path, kind="demo", identity=dict(s=Schedule(), t=(1, 2), x=np.float32(0.5), n=None))
    assert got.identity == dict(dtype="float32", s=dict(every=2), t=[1, 2], x=0.5, n=None)
    got.close()
    with pytest.raises(TypeError, match=r"identity: f is a function"):
        ResultDir(None, identity=dict(f=lambda: 0))
    with pytest.raises(TypeError, match="grows"):
        ResultFolder(tmp_path / "g", kind="demo", settings=dict(seeds=3), grows=("seeds",))
