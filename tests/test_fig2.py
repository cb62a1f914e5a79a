"""`jaxcfl reproduce fig2`: Section 4, Figure 2 (Sun et al., JMLR 2024), at a tiny size (the cnn on 128 digits)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import time

import _strict_json as strict_json
import numpy as np
import pytest

from jaxcfl import cli
from jaxcfl.experiments import EXPERIMENTS, fig2
from jaxcfl.nn._preset import TrainConfig

TINY = ["--model", "cnn", "--train-size", "128", "--test-size", "64", "--batch-size", "64", "--n", "1", "2",
        "--epochs-per-n", "1", "--base-lr", "0.1", "--no-sharpness"]
STEPS_PER_EPOCH = 2  # 128 images, batch 64


def _cli(args: list[str]) -> tuple[dict, str, str, float]:
    stdout, stderr = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        assert cli.main(["reproduce", "fig2", *args, "--json"]) == 0
    seconds = time.perf_counter() - t0
    assert stdout.getvalue().lstrip().startswith("{")
    return strict_json.loads(stdout.getvalue()), stdout.getvalue(), stderr.getvalue(), seconds


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
    assert strict_json.loads(stdout) == payload  # nothing but JSON on stdout
    assert "[fig2]" in stderr and "[fig2]" not in stdout
    s = payload["settings"]
    assert s["n"] == [1, 2] and s["k"] == 3.0 and s["base_lr"] == 0.1
    assert (s["activation"], s["beta"], s["momentum"], s["nesterov"], s["weight_decay"]) == ("swish", 5.0, 0.0, False, 5e-4)
    assert "['features'][0]['conv']['kernel']" in s["probe_path"]  # the trainer's default: the first conv kernel
    # The settings are the declared options (fig2.Options) and what the run fixes or resolves; every key
    # that the payload had before the options were declared is still there.
    assert list(s) == [*fig2.Options().settings(), "momentum", "nesterov", "milestones", "probe_path"]
    assert {"n", "base_lr", "k", "model", "dataset", "train_size", "test_size", "batch_size", "activation", "beta",
            "weight_decay", "momentum", "nesterov", "milestones", "augment", "probe", "probe_path", "seed", "init_seed",
            "window", "copies_mode", "epochs_per_n"} <= set(s)
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
        assert r["peak_divergence"] >= r["divergence"] and r["accumulation_bound"] > 0
        assert isinstance(r["amplified"], bool) and r["two_over_sharpness"] is None  # --no-sharpness
    assert set(payload["threshold"]) >= {"ordered", "bracket", "lr", "amplified_lrs", "not_amplified_lrs"}
    assert payload["max_stable_lr"] is None and "per scaled iteration" in payload["answer"]


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
    with pytest.raises(ValueError, match="n repeats 2"):
        fig2.run(n=(2, 2), out=None)
    with pytest.raises(ValueError, match="window"):
        fig2.run(n=(1,), window=-1, out=None)


def test_moving_average_in_scaled_iterations(tiny, tmp_path):
    """``window`` counts scaled iterations: run n is averaged over ``window * n`` of its steps (reuses the runs)."""
    out = tmp_path / "out"
    shutil.copytree(tiny[2], out)
    fig2.run(n=(1, 2), train_size=128, test_size=64, batch_size=64, epochs_per_n=1, base_lr=0.1, window=1,
             with_sharpness=False, out=out, log=lambda msg: None)
    with np.load(out / "fig2_curves.npz") as z:
        probe = z["n2_probe"]
        np.testing.assert_allclose(z["n2_smoothed"], (probe[1:] + probe[:-1]) / 2)
        np.testing.assert_allclose(z["n2_smoothed_iteration"], [1.0, 1.5, 2.0])
        np.testing.assert_array_equal(z["n1_smoothed"], z["n1_probe"])


def test_amplification_of_synthetic_curves():
    steps = 200
    # Rounding re-injected every step and never amplified: a random walk from 1e-9.
    walk = 1e-9 * np.sqrt(np.arange(1, steps + 1))
    calm = fig2.amplification(walk, n=1)
    assert not calm["amplified"] and calm["first_divergence"] == pytest.approx(np.median(walk[:10]))
    assert calm["accumulation_bound"] == pytest.approx(calm["first_divergence"] * steps)
    # Amplified 10% per step until it saturates at order one.
    grown = np.minimum(1e-9 * 1.1 ** np.arange(steps), 0.5)
    fast = fig2.amplification(grown, n=4)
    assert fast["amplified"]
    assert fast["slope"] == pytest.approx(4 * np.log(1.1), rel=1e-6)  # per scaled iteration = per step x n
    assert fast["slope_points"] == int((grown < fig2.SATURATION).sum())
    assert fig2.amplification(np.zeros(5), n=1)["slope"] is None
    assert fig2.amplification(np.array([1e-9, np.nan]), n=1)["amplified"]  # blown up


def test_amplification_threshold():
    rows = [dict(lr=0.3, amplified=True), dict(lr=0.075, amplified=True), dict(lr=0.01875, amplified=False),
            dict(lr=0.0047, amplified=False)]
    t = fig2.amplification_threshold(rows)
    assert t["ordered"] and t["bracket"] == [0.01875, 0.075] and t["lr"] == pytest.approx(np.sqrt(0.01875 * 0.075))
    assert not fig2.amplification_threshold(rows[:1] + [dict(lr=0.1, amplified=False), dict(lr=0.01, amplified=True)])["ordered"]
    assert "below" in fig2.amplification_threshold(rows[:2])["note"]
    assert "above" in fig2.amplification_threshold(rows[2:])["note"]


@pytest.mark.slow  # 15 s; sharpness and max_stable_lr themselves are default in test_curvature.py
def test_sharpness_along_the_runs_and_max_stable_lr(tiny):
    """Snapshots once per scaled epoch; the sharpness at each, cached; max_stable_lr from the initialisation."""
    from jaxcfl.nn._preset import train

    _, _, out = tiny
    assert sorted(p.name for p in (out / "n2" / "snapshots").iterdir()) == ["epoch2.npz"]
    config = TrainConfig(model="cnn", train_size=128, test_size=64, batch_size=64, epochs=2, lr=0.05, momentum=0.0,
                         nesterov=False, milestones=(), augment=False, activation="swish", beta=5.0)
    result = train(config, ks=(1.0, 3.0), seed=1, out=out / "n2", progress=False)  # finished: read back
    table = fig2.sharpness_along({2: result}, out, batch=32, iterations=8, log=lambda _: None)
    records = table[2]
    assert [r["scaled_epoch"] for r in records] == [0, 1] and [r["epoch"] for r in records] == [0, 2]
    assert all(r["sharpness"] > 0 and r["stable_lr"] == pytest.approx(2 / r["sharpness"]) for r in records)
    assert records[0]["sharpness"] != records[1]["sharpness"]  # the weights moved
    cached = json.loads((out / "n2" / "sharpness.json").read_text())
    assert cached["records"] == records
    assert fig2.sharpness_along({2: result}, out, batch=32, iterations=8, log=lambda _: None)[2] == records
    stable = fig2.initial_max_stable_lr(config, batch=8, steps=3)
    assert stable["status"] in ("found", "below_range", "above_range") and stable["batch"] == 8
