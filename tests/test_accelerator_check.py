"""benchmarks/accelerator_check.py: the quick check runs every section and writes one complete JSON file;
a failing or skipped section is recorded and the check goes on; the full CPU check fits 2 minutes (slow).

The default suite runs the quick check's PDE sections (a few seconds). Its training sections compile the
network in three processes (about 30 s); they are slow here, and the same properties (k vs k * 2^n, two
processes in deterministic mode) are tested by default in tests/test_train.py and tests/test_determinism.py."""

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import _strict_json as strict_json
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPT = BENCHMARKS / "accelerator_check.py"
SECTIONS = ("machine", "pde_step", "sweep", "operator_choice", "train_step", "scan_step", "k_powers", "determinism")
HAS_TORCH = importlib.util.find_spec("torch") is not None


def _run(out: Path, *args: str, timeout: float) -> tuple[dict, subprocess.CompletedProcess, float]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the check's own processes decide the deterministic mode
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return strict_json.loads(out.read_text()), proc, wall


PDE_SECTIONS = ("pde_step", "sweep", "operator_choice")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One quick run (``--json``: the JSON on stdout too, the table on stderr)."""
    doc, proc, wall = _run(tmp_path_factory.mktemp("accel") / "accel.json", "--quick", "--json", timeout=600)
    return doc, proc, wall


@pytest.fixture(scope="module")
def quick_pde(tmp_path_factory):
    """A quick run of the PDE sections only."""
    return _run(tmp_path_factory.mktemp("accel") / "accel.json", "--quick", "--json", "--sections", *PDE_SECTIONS,
                timeout=600)


@pytest.mark.slow
def test_quick_pde_sections(quick_pde):
    doc, proc, wall = quick_pde
    assert doc["status"] == "complete" and set(doc["sections"]) == {"machine", *PDE_SECTIONS}
    assert strict_json.loads(proc.stdout) == doc and "non_finite" not in doc
    sections = doc["sections"]
    for name in PDE_SECTIONS:
        assert "error" not in sections[name] and "skipped" not in sections[name], (name, sections[name])
    for row in sections["pde_step"]["summary"] + sections["sweep"]["summary"]:
        assert row["config_steps_per_s"] > 0
        assert (row.get("ratio_vs_torch", 0) > 0) == HAS_TORCH, row
    choice = sections["operator_choice"]["summary"]
    assert 0 <= choice["auto_picks_faster"] <= choice["cases"] >= 1
    print(f"quick PDE sections: {wall:.1f} s wall")


@pytest.mark.slow
def test_quick_check_records_every_section(quick):
    doc, proc, wall = quick
    assert doc["status"] == "complete" and doc["quick"] is True
    assert strict_json.loads(proc.stdout) == doc  # --json: the same document on stdout
    assert "non_finite" not in doc  # every number finite (strict JSON would hold null, and say so here)
    sections = doc["sections"]
    assert set(sections) == set(SECTIONS)
    for name in SECTIONS:
        assert "error" not in sections[name] and "skipped" not in sections[name], (name, sections[name])
        assert sections[name]["seconds"] >= 0
    machine = sections["machine"]
    assert machine["jax"] and machine["jax_backend"] == "cpu" and machine["device_kind"]
    assert doc["seconds"] > 0 and doc["device"] == "cpu"
    # the table, on stderr under --json
    for line in ("pde_step", "sweep", "operator_choice", "train_step", "k_powers", "determinism", "status complete"):
        assert line in proc.stderr
    print(f"quick check: {wall:.1f} s wall, {doc['seconds']:.1f} s in the script")


@pytest.mark.slow
def test_quick_check_throughputs_and_torch_ratios(quick):
    sections = quick[0]["sections"]
    pde = sections["pde_step"]["summary"]
    assert {r["operator"] for r in pde} == {"separable", "fft"}
    sweep = sections["sweep"]["summary"]
    assert sweep and any(r["auto"] for r in sweep)
    for row in pde + sweep:
        assert row["config_steps_per_s"] > 0
        assert (row.get("ratio_vs_torch", 0) > 0) == HAS_TORCH, row
    train = sections["train_step"]["summary"]
    assert train["images_per_s"]["jaxcfl-vmap"] > 0 and train["images_per_s"]["jaxcfl-unroll"] > 0
    assert train["vmap_over_unroll"] > 0 and train["auto_mode"] == "unroll"
    assert ("vs_torch" in train) == HAS_TORCH
    choice = sections["operator_choice"]["summary"]
    assert 0 <= choice["auto_picks_faster"] <= choice["cases"] >= 1
    scan = sections["scan_step"]["summary"]
    assert set(scan["scan_over_separate"]) == {"lax", "jaxcfl"} and scan["loop_over_calls"] > 0
    assert scan["bits_equal"] is True  # the two convolutions' steps agree bit for bit
    small = sections["scan_step"]["small_net"]
    assert small["jaxcfl"]["non_canonical_convolutions_in_scan"] == 0 and small["jaxcfl"]["scan_bits_equal_separate"]
    machine = sections["machine"]
    assert machine["torch_device"] == ("cpu" if HAS_TORCH else None)
    assert HAS_TORCH or machine["torch_note"].startswith("torch: not available")


@pytest.mark.slow
def test_quick_check_bits(quick):
    sections = quick[0]["sections"]
    det = sections["determinism"]
    on = det["deterministic"]
    assert on["deterministic"] is True and len(on["fingerprints"]) == 2
    assert on["identical"] is True and det["summary"]["identical_deterministic"] is True
    assert "skipped" in det["default"]  # --quick: the deterministic mode only
    k = sections["k_powers"]
    assert k["summary"]["powers"] == [1.0, 2.0] and k["summary"]["odd"] == [3.0]
    assert k["summary"]["powers_identical"] is True and k["summary"]["odd_differ"] is True
    for mode in ("vmap", "unroll"):
        prints = k["modes"][mode]["fingerprints"]
        assert prints["1"] == prints["2"] != prints["3"]


@pytest.fixture(scope="module")
def check():
    sys.path.insert(0, str(BENCHMARKS))  # as tests/test_benchmarks_conv_options.py: the scripts import each other
    import accelerator_check

    return accelerator_check


def test_a_failing_section_is_recorded_and_rendered(check):
    ctx = check.Context({}, 10.0, None, "torch: not used", sys.stderr)

    def boom(ctx):
        raise ValueError("boom")

    res = check.run_section(ctx, "pde_step", boom)
    assert res["error"] == "ValueError: boom" and "boom" in res["traceback"] and res["seconds"] >= 0
    doc = {"date": "d", "status": "complete", "seconds": 1.0, "budget_s": 10.0,
           "sections": {"machine": {"summary": "m", "torch_note": "t"}, "pde_step": res,
                        "sweep": {"skipped": "budget: 0 s left"}}}
    text = check.table(doc)
    assert "ERROR ValueError: boom" in text and "skipped: budget" in text and "not run" in text


def test_no_budget_skips_every_section_and_still_writes(check, tmp_path, capsys):
    out = tmp_path / "accel.json"
    assert check.main(["--out", str(out), "--quick", "--budget-s", "0", "--no-overlap", "--no-torch"]) == 0
    doc = strict_json.loads(out.read_text())
    assert doc["status"] == "complete" and "summary" in doc["sections"]["machine"]
    assert all("skipped" in doc["sections"][name] for name in SECTIONS[1:])
    assert doc["sections"]["machine"]["torch_note"] == "torch: not used (--no-torch)"
    assert "skipped: budget" in capsys.readouterr().out


def test_a_killed_check_keeps_the_sections_it_finished(check, tmp_path, monkeypatch):
    def interrupted(ctx):
        os.kill(os.getpid(), signal.SIGTERM)  # as `timeout` does, in the middle of a section
        time.sleep(30)
        raise AssertionError("SIGTERM did not stop the check")

    monkeypatch.setitem(check.FUNCTIONS, "pde_step", lambda ctx: {"summary": []})
    monkeypatch.setitem(check.FUNCTIONS, "sweep", interrupted)
    out = tmp_path / "accel.json"
    handler = signal.getsignal(signal.SIGTERM)
    assert check.main(["--out", str(out), "--quick", "--no-torch", "--sections", "pde_step", "sweep",
                       "operator_choice"]) == 1
    assert signal.getsignal(signal.SIGTERM) is handler  # restored
    doc = strict_json.loads(out.read_text())
    assert doc["status"].startswith("interrupted") and doc["sections"]["pde_step"]["summary"] == []
    assert "sweep" not in doc["sections"] and "operator_choice" not in doc["sections"]


@pytest.mark.slow
def test_full_cpu_check_within_two_minutes(tmp_path):
    doc, _, wall = _run(tmp_path / "accel.json", timeout=400)
    assert doc["status"] == "complete" and doc["quick"] is False
    for name in SECTIONS:
        assert "error" not in doc["sections"][name] and "skipped" not in doc["sections"][name], name
    assert doc["sections"]["determinism"]["summary"]["identical_deterministic"] is True
    assert doc["sections"]["k_powers"]["summary"]["powers_identical"] is True
    assert wall < 120, f"the full CPU check took {wall:.0f} s"
