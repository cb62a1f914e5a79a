"""`jaxcfl._core.results`: the result folder, atomic files and the row cache shared by the experiments."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from jaxcfl._core import results as r
def test_result_dir_creates_its_folder_and_writes_inside(tmp_path):
    out = r.ResultDir(tmp_path / "a" / "b")
    assert out.writes and out.path.is_dir()
    assert out.write_json("x.json", {"k": 1}) == str(tmp_path / "a" / "b" / "x.json")
    assert json.loads((out.path / "x.json").read_text()) == {"k": 1}
    assert out.seconds() >= 0
    assert [p.name for p in out.path.glob(".*")] == [".jaxcfl.lock"]  # the lock, and no temporary file left behind


def test_result_dir_none_writes_nothing(tmp_path):
    out = r.ResultDir(None)
    assert not out.writes and out.seconds() >= 0
    with pytest.raises(ValueError, match="no output folder"):
        out.write_json("x.json", {})
    cache = out.row_cache(lambda s: "row")
    assert cache.load({"a": 1}) is None
    cache.save({"a": 1}, {"a": 1})  # nothing, no error


def test_row_cache_reuses_a_row_only_when_the_settings_match(tmp_path):
    cache = r.ResultDir(tmp_path).row_cache(lambda s: f"{s['scheme']}_w{s['kernel_size']}")
    settings = dict(scheme="gd", kernel_size=4, lr=1e-8)
    assert cache.load(settings) is None
    cache.save(settings, dict(settings, bound=2.5, spread=float("nan")))
    assert cache.path(settings) == tmp_path / "rows" / "gd_w4.json"
    row = cache.load(settings)
    assert row["bound"] == 2.5 and math.isnan(row["spread"])  # read back as computed
    assert cache.load(dict(settings, lr=1e-4)) is None  # same file, other settings
    cache.path(settings).write_text("{truncated")
    assert cache.load(settings) is None


def test_strict_json_maps_non_finite_numbers_to_null(tmp_path):
    payload = dict(a=float("nan"), b=[1.0, float("inf"), np.float32(2.5)], c=np.arange(3), d=(np.bool_(True), None),
                   e="NaN stays a string")
    path = r.write_json(tmp_path / "p.json", payload)
    text = open(path).read()
    assert "NaN," not in text and "Infinity" not in text
    assert json.loads(text) == dict(a=None, b=[1.0, None, 2.5], c=[0, 1, 2], d=[True, None], e="NaN stays a string")
    loose = r.write_json(tmp_path / "q.json", {"a": float("nan")}, strict=False)
    assert "NaN" in open(loose).read()
    assert r.read_json(tmp_path / "missing.json") is None


def test_write_csv_columns_joins_and_line_ends(tmp_path):
    rows = [dict(notes=["a", "b"], x=1, bracket=[0.5, 2.0]), dict(notes=[], x=2, bracket=None)]
    path = r.write_csv(tmp_path / "t.csv", rows, joins={"notes": "; ", "bracket": " "}, last=("notes",))
    raw = open(path, newline="").read()
    assert raw.splitlines()[0] == "x,bracket,notes" and raw.endswith("\r\n")  # the csv module's line end
    with open(path, newline="") as fh:
        assert list(csv.DictReader(fh)) == [dict(x="1", bracket="0.5 2.0", notes="a; b"), dict(x="2", bracket="", notes="")]
    unix = r.write_csv(tmp_path / "u.csv", [dict(k="1", seed=3)], lineterminator="\n")
    assert open(unix, newline="").read() == "k,seed\n1,3\n"
    with pytest.raises(ValueError, match="no rows"):
        r.write_csv(tmp_path / "v.csv", [])


def test_write_npz(tmp_path):
    path = r.write_npz(tmp_path / "c.npz", dict(lr=np.array([0.1, 0.2]), status=np.array(["stable", "divergent"])))
    with np.load(path) as z:
        assert list(z) == ["lr", "status"] and list(z["status"]) == ["stable", "divergent"]


def test_sweep_chunks_on_disk_names_the_sweeps_chunk_files(tmp_path):
    """The count fig4 reports must follow the file names :func:`jaxcfl.sweep` writes."""
    from jaxcfl import checkerboard, sweep
    out = tmp_path / "sweep"
    sweep(checkerboard(8), 4, np.array([1e-4, 2e-4, 3e-4]), np.array([1e6]), scheme="gd", steps=4, chunk_size=1,
          out=out, progress=False)
    written = sorted(p.name for p in out.glob("chunk_*.npz"))
    assert written == [r.SWEEP_CHUNK.format(index=i) for i in range(3)]
    assert r.sweep_chunks_on_disk(out, 3) == 3 and r.sweep_chunks_on_disk(out, 5) == 3
    (out / written[1]).unlink()
    assert r.sweep_chunks_on_disk(out, 3) == 2 and r.sweep_chunks_on_disk(None, 3) == 0
    # A chunk file the manifest does not record (a torn commit) is not finished work.
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["files"][written[2]]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert r.sweep_chunks_on_disk(out, 3) == 1
    (out / "manifest.json").write_text("[]")
    assert r.sweep_chunks_on_disk(out, 3) == 0


def test_finish_records_the_files_and_the_time_then_writes_the_payload(tmp_path):
    out = r.ResultDir(tmp_path)
    payload = out.finish(dict(rows=[1]), "x.json", dict(csv=str(tmp_path / "x.csv")))
    assert list(payload) == ["rows", "files", "seconds"]
    assert payload["files"] == dict(csv=str(tmp_path / "x.csv"), json=str(tmp_path / "x.json"))
    assert json.loads((tmp_path / "x.json").read_text()) == payload
    assert r.ResultDir(None).finish(dict(rows=[]), "x.json", {})["files"] == {}
