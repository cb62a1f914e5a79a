"""`jaxcfl reproduce fig4`: Section 5, Figure 4 (Sun et al., JMLR 2024), at a small size; the full set-up is slow."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil

import _strict_json as strict_json
import numpy as np
import pytest

from jaxcfl import cli
from jaxcfl.pde import _sweeps as sweep_mod
from jaxcfl._core.classify import STATUSES
from jaxcfl.experiments import EXPERIMENTS, fig4

# 64 x 64 checkerboard, 16 x 16 kernel, 300 steps: the three classes appear at alpha = 20 as in the paper.
# The notebook test (tests/test_notebooks.py) runs Figure 4 with these settings, reusing the compiled sweep.
SMALL = dict(size=64, kernel_size=16, steps=300, lr=(0.01, 0.09, 0.13), chunk_size=1)
SMALL_ARGS = ["--size", "64", "--kernel-size", "16", "--steps", "300", "--lr", "0.01", "0.09", "0.13", "--chunk-size", "1"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """One CLI run of the small set-up with --json: (payload, stdout, stderr, out dir)."""
    out = tmp_path_factory.mktemp("fig4") / "out"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(["reproduce", "fig4", *SMALL_ARGS, "--out", str(out), "--json"])
    assert code == 0
    return strict_json.loads(stdout.getvalue()), stdout.getvalue(), stderr.getvalue(), out


def test_registered():
    assert EXPERIMENTS["fig4"][0] == "jaxcfl.experiments.fig4"
    for name in ("add_arguments", "main", "render", "run"):
        assert callable(getattr(fig4, name))


def test_json_payload_is_pure_and_structured(small):
    payload, stdout, stderr, out = small
    assert stdout.lstrip().startswith("{") and strict_json.loads(stdout) == payload  # nothing but JSON on stdout
    assert "[fig4]" in stderr and "[fig4]" not in stdout
    assert payload["experiment"] == "fig4"
    assert payload["settings"]["lr"] == [0.01, 0.09, 0.13]
    assert payload["settings"]["window"] == 100 and payload["settings"]["k"] == 3.0
    assert payload["lr_bound"] == pytest.approx(0.1)  # eq 51: 2 / alpha
    rows = payload["rows"]
    assert [r["lr"] for r in rows] == [0.01, 0.09, 0.13]
    for row in rows:
        assert row["status"] in STATUSES
        for key in ("alpha", "final_loss", "growth_rate", "max_abs_kernel", "loss_oscillation", "divergence",
                    "divergence_ma_max", "divergence_ma_final", "finite", "first_nonfinite"):
            assert key in row
    assert sum(payload["counts"].values()) == 3
    assert payload["chunks"] == 3 and payload["chunks_on_disk"] == 0


def test_small_setup_shows_the_three_classes(small):
    rows = small[0]["rows"]
    assert [r["status"] for r in rows] == ["stable", "restrained", "divergent"]
    stable, restrained, divergent = rows
    assert stable["divergence"] == 0.0  # the last-bit perturbation died out
    assert restrained["finite"] and restrained["divergence_ma_max"] > 0.1  # amplified to order one, bounded
    assert not divergent["finite"] and divergent["divergence_ma_final"] is None


def test_files_written(small):
    payload, _, _, out = small
    files = payload["files"]
    assert set(files) == {"png", "csv", "json", "npz", "sweep"}
    png = out / "fig4.png"
    assert files["png"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "fig4.json").read_text())["rows"] == payload["rows"]
    with open(out / "fig4.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == [r["status"] for r in payload["rows"]]
    with np.load(out / "fig4_curves.npz") as data:
        np.testing.assert_array_equal(data["iterations"], np.arange(1, 301))  # every iteration recorded
        assert data["loss"].shape == data["divergence"].shape == (3, 300)
        assert data["divergence_ma"].shape == (3, 201)
        np.testing.assert_array_equal(data["ma_iterations"], np.arange(100, 301))
        assert list(data["status"]) == [r["status"] for r in payload["rows"]]
    assert (out / "sweep" / "manifest.json").exists() and len(list((out / "sweep").glob("chunk_*.npz"))) == 3


def test_moving_average_ends_at_the_sweeps_tail_divergence(small):
    for row in small[0]["rows"]:
        if row["finite"]:
            assert row["divergence_ma_final"] == pytest.approx(row["divergence"], rel=1e-4, abs=1e-12)


def test_render(small):
    text = fig4.render(small[0])
    for word in ("0.01", "0.09", "0.13", "stable", "restrained", "divergent", "fig4.png"):
        assert word in text


def test_a_killed_run_resumes_from_its_chunks(small, tmp_path, monkeypatch):
    reference, _, _, done = small
    out = tmp_path / "out"
    shutil.copytree(done, out)
    for name in ("chunk_00001.npz", "chunk_00002.npz"):
        (out / "sweep" / name).unlink()
    real = sweep_mod._run_batch
    calls = []

    def dying(*args, **kw):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(sweep_mod, "_run_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        fig4.run(out=out, log=lambda msg: None, **SMALL)
    calls.clear()
    monkeypatch.setattr(sweep_mod, "_run_batch", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    resumed = fig4.run(out=out, log=lambda msg: None, **SMALL)
    assert resumed["chunks_on_disk"] == 2 and len(calls) == 1  # only the chunk lost to the kill ran again
    assert resumed["rows"] == reference["rows"]

    with pytest.raises(ValueError, match=r"different fig4 \(differs in: lr\)"):  # refused before any work
        fig4.run(out=out, log=lambda msg: None, **(SMALL | dict(lr=(0.01, 0.05))))


@pytest.mark.slow
def test_paper_setup_classifies_the_lr_list():
    """The paper's Figure 4: 256 x 256 checkerboard, 32 x 32 kernel, alpha = 20, 1000 gd steps.

    The paper: small lr converge with perturbations attenuated; an intermediate range shows restrained
    instabilities (bounded, oscillating loss, a last-bit perturbation amplified to order one); beyond
    dt = 2/alpha = 0.1 (eq 51) the run blows up. At lr = 0.1 itself (|1 - lr alpha| = 1) the kernel keeps
    its size and flips sign every step; the rule puts it on the divergent side (docs/restrained_instabilities.md).
    """
    payload = fig4.run(log=lambda msg: None)
    status = {r["lr"]: r["status"] for r in payload["rows"]}
    rows = {r["lr"]: r for r in payload["rows"]}
    assert status == {0.01: "stable", 0.03: "stable", 0.05: "restrained", 0.07: "restrained", 0.09: "restrained",
                      0.1: "divergent", 0.11: "divergent", 0.13: "divergent"}
    for lr in (0.01, 0.03):
        assert rows[lr]["divergence"] == 0.0
    for lr in (0.05, 0.07, 0.09):
        assert rows[lr]["finite"] and 0.5 < rows[lr]["divergence"] <= 2.0 and rows[lr]["loss_oscillation"] > 1.0
    for lr in (0.11, 0.13):
        assert not rows[lr]["finite"]
    marginal = rows[0.1]  # on the bound: bounded, not converging, perturbation not amplified to order one
    assert marginal["finite"] and marginal["max_abs_kernel"] < 10 and marginal["divergence"] < 0.5
    assert marginal["final_update"] == pytest.approx(2 * marginal["final_norm"], rel=1e-3)  # K -> -K each step
