"""`jaxcfl reproduce fig2`: Section 4, Figure 2 (Sun et al., JMLR 2024), at a tiny size (the cnn on 128 digits)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import time

import numpy as np
import pytest

from jaxcfl import cli
from jaxcfl.experiments import EXPERIMENTS, fig2
from jaxcfl.train import TrainConfig

TINY = ["--model", "cnn", "--train-size", "128", "--test-size", "64", "--batch-size", "64", "--n", "1", "2"]
STEPS_PER_EPOCH = 2  # 128 images, batch 64


def _cli(args: list[str]) -> tuple[dict, str, str, float]:
    stdout, stderr = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        assert cli.main(["reproduce", "fig2", *args, "--json"]) == 0
    seconds = time.perf_counter() - t0
    assert stdout.getvalue().lstrip().startswith("{")
    return json.loads(stdout.getvalue()), stdout.getvalue(), stderr.getvalue(), seconds


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One CLI run of the tiny set-up, then the same command again: (first, rerun, out dir)."""
    out = tmp_path_factory.mktemp("fig2") / "out"
    first = _cli([*TINY, "--out", str(out)])
    rerun = _cli([*TINY, "--out", str(out)])
    return first, rerun, out


def test_registered():
    assert EXPERIMENTS["fig2"][0] == "jaxcfl.experiments.fig2"
    for name in ("add_arguments", "main", "render", "run"):
        assert callable(getattr(fig2, name))


def test_empty_milestones_mean_constant_lr():
    """``None``: the paper's step decay scaled to the epochs; ``()``: no decay (Figure 2's runs)."""
    assert TrainConfig(epochs=10).milestone_epochs == (2, 4, 6, 8)
    constant = TrainConfig(epochs=10, milestones=())
    assert constant.milestone_epochs == () and constant.to_dict()["milestones"] == []


def test_json_payload(tiny):
    (payload, stdout, stderr, _), _, out = tiny
    assert json.loads(stdout) == payload  # nothing but JSON on stdout
    assert "[fig2]" in stderr and "[fig2]" not in stdout
    s = payload["settings"]
    assert s["n"] == [1, 2] and s["k"] == 3.0 and s["base_lr"] == 0.1
    assert (s["activation"], s["beta"], s["momentum"], s["nesterov"], s["weight_decay"]) == ("swish", 5.0, 0.0, False, 5e-4)
    assert "['features'][0]['conv']['kernel']" in s["probe_path"]  # the trainer's default: the first conv kernel
    assert payload["steps_per_epoch"] == STEPS_PER_EPOCH
    rows = payload["rows"]
    assert [r["n"] for r in rows] == [1, 2]
    for r in rows:
        assert r["lr"] == pytest.approx(0.1 / r["n"])
        assert r["epochs"] == r["n"] and r["steps"] == r["n"] * STEPS_PER_EPOCH
        assert r["epochs_trained"] == r["n"]
        assert 0 <= r["test_accuracy_k1"] <= 1 and 0 <= r["test_accuracy_k"] <= 1
        assert 0 < r["probe_divergence"] <= r["probe_divergence_max"] <= 2  # k = 3 perturbed the last bits
        assert r["divergence"] > 0


def test_each_run_is_the_trainers_with_plain_sgd_and_constant_lr(tiny):
    _, _, out = tiny
    for n in (1, 2):
        metrics = json.loads((out / f"n{n}" / "metrics.json").read_text())
        cfg = metrics["config"]
        assert (cfg["momentum"], cfg["nesterov"], cfg["milestones"], cfg["epochs"]) == (0.0, False, [], n)
        assert metrics["ks"] == [1.0, 3.0]
        assert metrics["lr"] == [pytest.approx(0.1 / n)] * n  # no decay
        assert (out / f"n{n}" / "checkpoint.npz").exists()


def test_files_and_curves(tiny):
    _, (payload, _, _, _), out = tiny  # the rerun wrote the files last
    files = payload["files"]
    assert set(files) == {"png", "csv", "json", "npz", "runs"}
    assert (out / "fig2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "fig2.json").read_text())["rows"] == payload["rows"]
    with open(out / "fig2.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["n"]) for r in rows] == [1, 2]
    assert [float(r["probe_divergence"]) for r in rows] == [r["probe_divergence"] for r in payload["rows"]]
    with np.load(out / "fig2_curves.npz") as z:
        np.testing.assert_array_equal(z["n"], [1, 2])
        for n in (1, 2):
            probe = z[f"n{n}_probe"]
            assert probe.shape == z[f"n{n}_divergence"].shape == (n * STEPS_PER_EPOCH,)
            np.testing.assert_allclose(z[f"n{n}_scaled_iteration"], np.arange(1, n * STEPS_PER_EPOCH + 1) / n)
            assert probe[-1] > 0 and probe[-1] == payload["rows"][n - 1]["probe_divergence"]


def test_rerun_resumes_without_training(tiny):
    (first, _, _, seconds), (again, _, stderr, rerun_seconds), _ = tiny
    assert [r["epochs_trained"] for r in again["rows"]] == [0, 0]
    assert "resumed from" in stderr and "0 epochs trained" in stderr
    for a, b in zip(first["rows"], again["rows"]):
        for key in ("probe_divergence", "divergence", "test_accuracy_k1", "test_accuracy_k", "steps"):
            assert a[key] == b[key]
    assert rerun_seconds < seconds / 2


def test_render(tiny):
    (payload, _, _, _), _, _ = tiny
    text = fig2.render(payload)
    for word in ("Figure 2", "probe div", "fig2.png", "0.05"):
        assert word in text


def test_bad_arguments():
    with pytest.raises(ValueError, match="distinct integers"):
        fig2.run(n=(2, 2), out=None)
    with pytest.raises(ValueError, match="window"):
        fig2.run(n=(1,), window=-1, out=None)


def test_moving_average_in_scaled_iterations(tiny, tmp_path):
    """``window`` counts scaled iterations: run n is averaged over ``window * n`` of its steps (reuses the runs)."""
    out = tmp_path / "out"
    shutil.copytree(tiny[2], out)
    fig2.run(n=(1, 2), train_size=128, test_size=64, batch_size=64, window=1, out=out, log=lambda msg: None)
    with np.load(out / "fig2_curves.npz") as z:
        probe = z["n2_probe"]
        np.testing.assert_allclose(z["n2_smoothed"], (probe[1:] + probe[:-1]) / 2)
        np.testing.assert_allclose(z["n2_smoothed_iteration"], [1.0, 1.5, 2.0])
        np.testing.assert_array_equal(z["n1_smoothed"], z["n1_probe"])
