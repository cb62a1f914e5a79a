"""Result folders under faults: two writers, a kill between two writes, damaged and swapped files, the umask."""

import hashlib
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import jaxcfl
from jaxcfl._core import folder as _folder
from jaxcfl._core.folder import FolderInUse, FolderMismatch, ResultFolder
from jaxcfl._core.results import npz_bytes

SETTINGS = dict(a=1, b=[1.0, 2.0])


def _hold_in_subprocess(path, *, then="wait"):
    """A child process that opens ``path`` as a result folder, says so, then waits or dies with kill -9."""
    code = (
        "import os, signal, sys, time\n"
        "from jaxcfl._core.folder import ResultFolder\n"
        f"f = ResultFolder({str(path)!r}, kind='test', settings={SETTINGS!r}).open()\n"
        "print('open', flush=True)\n"
        + ("os.kill(os.getpid(), signal.SIGKILL)\n" if then == "die" else "sys.stdin.readline()\n")
    )
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_a_second_writer_is_refused_at_once_naming_the_holder(tmp_path):
    child = _hold_in_subprocess(tmp_path / "f")
    try:
        assert child.stdout.readline().strip() == "open"
        with pytest.raises(FolderInUse, match=rf"out='.*f' is in use by another jaxcfl process \(pid {child.pid}\)"):
            ResultFolder(tmp_path / "f", kind="test", settings=SETTINGS).open()
    finally:
        child.stdin.write("\n")
        child.stdin.close()
        child.wait(timeout=60)
    with ResultFolder(tmp_path / "f", kind="test", settings=SETTINGS) as f:  # released when the holder ended
        assert f.is_open


def test_a_lock_left_by_a_killed_process_does_not_block_the_resume(tmp_path):
    child = _hold_in_subprocess(tmp_path / "f", then="die")
    assert child.stdout.readline().strip() == "open"
    assert child.wait(timeout=60) == -9
    assert (tmp_path / "f" / _folder.LOCK).exists()  # the file stays; the kernel dropped the lock
    with ResultFolder(tmp_path / "f", kind="test", settings=SETTINGS) as f:
        assert f.files == {}


def test_two_writers_in_one_process_are_refused_too(tmp_path):
    with ResultFolder(tmp_path, kind="test", settings=SETTINGS):
        with pytest.raises(FolderInUse, match=f"pid {os.getpid()}"):
            ResultFolder(tmp_path, kind="test", settings=SETTINGS).open()


def test_manifest_first_then_units_with_checksums(tmp_path):
    with ResultFolder(tmp_path / "f", kind="test", settings=SETTINGS) as f:
        manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
        assert manifest["kind"] == "test" and manifest["settings"] == SETTINGS and manifest["files"] == {}
        f.commit("unit.bin", b"hello")
        assert f.read("unit.bin") == (b"hello", "ok")
        assert f.read("other.bin") == (None, "absent")
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert manifest["files"] == {"unit.bin": _folder.sha256(b"hello")}
    with pytest.raises(RuntimeError, match="not open"):
        f.commit("late.bin", b"x")


def test_a_kill_between_the_unit_and_the_manifest_leaves_the_old_commit(tmp_path, monkeypatch):
    with ResultFolder(tmp_path, kind="test", settings=SETTINGS) as f:
        f.commit("unit.bin", b"first")

        def killed():
            raise KeyboardInterrupt("killed between the two writes")

        monkeypatch.setattr(f, "_write_manifest", killed)
        with pytest.raises(KeyboardInterrupt):
            f.commit("unit.bin", b"second")  # the new bytes are written, the manifest is not
        with pytest.raises(KeyboardInterrupt):
            f.commit("new.bin", b"never committed")
        assert f.read("unit.bin") == (b"first", "ok")
    with ResultFolder(tmp_path, kind="test", settings=SETTINGS) as f:
        assert f.read("unit.bin") == (b"first", "ok")  # the last commit stands (kills at every step: test_folder_faults.py)
        assert f.read("new.bin") == (None, "absent")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".jaxcfl.lock", "manifest.json", "unit.bin"]


def test_damaged_swapped_and_missing_units(tmp_path):
    with ResultFolder(tmp_path, kind="test", settings=SETTINGS) as f:
        f.commit("a.bin", b"aaaa")
        f.commit("b.bin", b"bbbb")
        (tmp_path / "a.bin").write_bytes(b"aaab")
        assert f.read("a.bin") == (None, "corrupt")
        (tmp_path / "a.bin").write_bytes(b"bbbb")  # another unit copied over it
        assert f.read("a.bin") == (None, "corrupt") and f.read("b.bin") == (b"bbbb", "ok")
        (tmp_path / "b.bin").unlink()
        assert f.read("b.bin") == (None, "missing")


@pytest.mark.parametrize("content,match", [("{not json", "unreadable"), ("[1, 2]", "not a jaxcfl manifest"),
                                           ('{"files": 3}', "not a jaxcfl manifest")])
def test_a_damaged_manifest_is_a_clear_refusal(tmp_path, content, match):
    (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(FolderMismatch, match=match):
        ResultFolder(tmp_path, kind="test", settings=SETTINGS).open()
    with ResultFolder(tmp_path / "new", kind="test", settings=SETTINGS):
        pass  # and the lock was released by the refusal
    ResultFolder(tmp_path / "new", kind="test", settings=SETTINGS).open().close()


def test_other_results_are_refused(tmp_path):
    with ResultFolder(tmp_path, kind="test", settings=SETTINGS):
        pass
    with pytest.raises(FolderMismatch, match="holds a test result, not a sweep"):
        ResultFolder(tmp_path, kind="sweep", settings=SETTINGS).open()
    with pytest.raises(FolderMismatch, match=r"holds a different test \(differs in: a\)"):
        ResultFolder(tmp_path, kind="test", settings=dict(SETTINGS, a=2)).open()
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "mine.txt").write_text("a user's file")
    with pytest.raises(FolderMismatch, match="not empty and holds no jaxcfl manifest"):
        ResultFolder(tmp_path / "x", kind="test", settings=SETTINGS).open()
    assert (tmp_path / "x" / "mine.txt").read_text() == "a user's file"


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        with ResultFolder(tmp_path, kind="test", settings=SETTINGS) as f:
            f.commit("unit.bin", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "unit.bin").stat().st_mode & 0o777 == mode
    assert (tmp_path / "manifest.json").stat().st_mode & 0o777 == mode


# --- the sweep engine on its folder -----------------------------------------------------------

IMG = np.asarray(jaxcfl.checkerboard(12), np.float32)
SWEEP = dict(kernel_size=3, lr=1e-2, alpha=np.geomspace(0.1, 100, 6), steps=40, record_points=4, chunk_size=2,
             operator="fft", progress=False)


@pytest.fixture(scope="module")
def reference():
    return jaxcfl.sweep(IMG, **SWEEP)


def test_a_sweep_refuses_a_second_writer(tmp_path):
    with ResultFolder(tmp_path, kind="sweep", settings={}):
        with pytest.raises(FolderInUse, match="in use"):
            jaxcfl.sweep(IMG, out=tmp_path, **SWEEP)


@pytest.mark.parametrize("fault", ["flip a byte", "swap two chunks", "delete a chunk", "torn commit",
                                   "wrong shape, checksum rewritten", "other records, checksum rewritten"])
def test_a_sweep_recomputes_damaged_chunks_and_ends_correct(tmp_path, reference, fault, monkeypatch):
    jaxcfl.sweep(IMG, out=tmp_path, **SWEEP)
    a, b = tmp_path / "chunk_00000.npz", tmp_path / "chunk_00002.npz"
    if fault == "flip a byte":
        data = bytearray(a.read_bytes())
        data[len(data) // 2] ^= 1
        a.write_bytes(bytes(data))
    elif fault == "swap two chunks":
        da, db = a.read_bytes(), b.read_bytes()
        a.write_bytes(db)
        b.write_bytes(da)
    elif fault == "delete a chunk":
        a.unlink()
    elif fault == "torn commit":  # the chunk file was replaced, then the process died before the manifest recorded it
        manifest = json.loads((tmp_path / "manifest.json").read_text())
        manifest["files"]["chunk_00000.npz"] = "0" * 64
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    else:  # a chunk of another layout whose checksum was rewritten to match (by hand, or by another version)
        with np.load(a) as z:
            arrays = {k: z[k] for k in z.files}
        if fault.startswith("wrong shape"):
            arrays = {k: v[:1] for k, v in arrays.items()}
        else:
            arrays["record_iterations"] = arrays["record_iterations"] + 1
        data = npz_bytes(arrays)
        a.write_bytes(data)
        manifest = json.loads((tmp_path / "manifest.json").read_text())
        manifest["files"]["chunk_00000.npz"] = hashlib.sha256(data).hexdigest()
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = jaxcfl.sweep(IMG, out=tmp_path, **SWEEP)
    assert any("recomputing it" in str(w.message) for w in caught)
    np.testing.assert_array_equal(resumed.status, reference.status)
    for name in ("final_norm", "growth_rate", "final_loss"):
        np.testing.assert_array_equal(resumed.metrics[name], reference.metrics[name])
    with ResultFolder(tmp_path, kind="sweep", settings=resumed.spec.to_dict()) as f:  # and the folder is whole again
        assert all(f.read(name)[1] == "ok" for name in f.files)


# --- the reproduce experiments on their folders ---------------------------------------------------

def test_an_experiment_refuses_a_second_writer_at_once(tmp_path):
    from jaxcfl._core.results import ResultDir
    from jaxcfl.experiments import table5

    holder = ResultDir(tmp_path, kind="table5")
    with pytest.raises(FolderInUse, match=f"pid {os.getpid()}"):
        table5.run(out=tmp_path, log=lambda msg: None)
    holder.close()


def test_an_experiment_folder_checksums_every_file_it_writes(tmp_path):
    from jaxcfl._core.results import ResultDir

    results = ResultDir(tmp_path, kind="demo")
    results.write_csv("rows.csv", [dict(a=1.0, b=float("nan"))])
    results.file("figure.png").write_bytes(b"\x89PNG...")  # a writer of its own, e.g. plot.save
    cache = results.row_cache(lambda s: "row")
    cache.save(dict(x=1), dict(x=1, y=float("nan")))
    payload = results.finish(dict(rows=[]), "demo.json", {})
    assert not results.folder.is_open
    files = json.loads((tmp_path / "manifest.json").read_text())["files"]
    assert set(files) == {"rows.csv", "figure.png", "rows/row.json", "demo.json"}
    for name, digest in files.items():
        assert _folder.sha256((tmp_path / name).read_bytes()) == digest
    assert payload["files"] == {"json": str(tmp_path / "demo.json")}
    again = ResultDir(tmp_path, kind="demo")  # a rerun reuses the committed row, NaN and all
    row = again.row_cache(lambda s: "row").load(dict(x=1))
    assert row["x"] == 1 and np.isnan(row["y"])
    (tmp_path / "rows" / "row.json").write_text('{"x": 1, "y": 2.0}')  # altered behind jaxcfl's back
    with pytest.warns(UserWarning, match="rows/row.json is corrupt; recomputing it"):
        assert again.row_cache(lambda s: "row").load(dict(x=1)) is None
    again.close()


def test_the_cli_answers_a_busy_folder_with_one_line(tmp_path, capsys):
    from jaxcfl import cli
    from jaxcfl._core.results import ResultDir

    holder = ResultDir(tmp_path, kind="table5")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["reproduce", "table5", "--out", str(tmp_path), "--json"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxcfl: error: out=") and "in use by another jaxcfl process" in err and "Traceback" not in err
    holder.close()
