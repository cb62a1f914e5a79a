"""`jaxcfl variance` (appendix C) and `jaxcfl determinism` at toy sizes."""

from __future__ import annotations

import json

import _strict_json as strict_json
import numpy as np
import pytest

from jaxcfl import cli
from jaxcfl._core.determinism import ProcessCheck

TINY = ["--model", "cnn", "--train-size", "128", "--test-size", "64", "--batch-size", "64", "--epochs", "2"]


@pytest.mark.slow
def test_variance_cli_json_and_resume(tmp_path, capsys):
    out = tmp_path / "var"
    argv = ["variance", *TINY, "--k", "1", "2", "3", "--seeds", "1", "2", "--out", str(out), "--json"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    payload = strict_json.loads(captured.out)  # stdout is pure JSON
    assert "[variance]" in captured.err
    from jaxcfl.experiments import variance

    assert list(payload["settings"]) == list(variance.Options().settings())  # the declared options
    assert payload["settings"]["ks"] == [1.0, 2.0, 3.0] and payload["settings"]["train_size"] == 128
    runs = payload["runs"]
    assert sorted((r["k"], r["seed"]) for r in runs) == [(k, s) for k in (1.0, 2.0, 3.0) for s in (1, 2)]
    acc = np.array([[next(r["final_accuracy"] for r in runs if r["k"] == k and r["seed"] == s) for s in (1, 2)]
                    for k in (1.0, 2.0, 3.0)])
    assert np.all((acc >= 0) & (acc <= 100))
    np.testing.assert_array_equal(acc[0], acc[1])  # k = 2 is bit-identical to k = 1
    # Population std, across k per seed and across seeds per k.
    np.testing.assert_allclose([payload["std_over_k"][s] for s in ("1", "2")], acc.std(axis=0))
    np.testing.assert_allclose([payload["std_over_seeds"][k] for k in ("1", "2", "3")], acc.std(axis=1))
    assert payload["mean_std_over_k"] == pytest.approx(acc.std(axis=0).mean())
    fp = payload["fingerprints"]
    assert fp["1"][0] == fp["1"][1] != fp["1"][2]
    for name in ("variance.csv", "variance.json", "variance.png", "seed1/checkpoint.npz", "seed2/metrics.csv"):
        assert (out / name).stat().st_size > 0
    assert (out / "variance.csv").read_text().splitlines()[0] == "k,seed,final_accuracy,final_loss"
    # The statistics: k = 2 is k = 1 bit for bit, so at least one pair over k never churns,
    # and the followed pair (the first two k) never diverges.
    churn = payload["churn"]
    assert churn["over_k"]["pairs"] == 3 * 2 and churn["over_k"]["min"] == 0 and churn["over_seeds"]["pairs"] == 3
    assert churn["test_images"] == 64
    for name in ("accuracy", "loss"):
        spread = payload["spread"][name]
        for key in ("over_k", "over_seeds"):
            d = spread[key]
            assert 0 <= d["ci_low"] <= d["ci_high"] and d["level"] == 0.95
        assert spread["verdict"] in ("same size", "smaller", "larger")
    assert payload["spread"]["accuracy"]["over_k"]["std"] == pytest.approx(acc.std(axis=0).mean())
    loss = np.array([[next(r["final_loss"] for r in runs if r["k"] == k and r["seed"] == s) for s in (1, 2)]
                     for k in (1.0, 2.0, 3.0)])
    assert payload["spread"]["loss"]["over_seeds"]["std"] == pytest.approx(loss.std(axis=1).mean())
    growth = payload["divergence"]
    assert (growth["reference_k"], growth["compared_k"]) == (1.0, 2.0)
    assert all(step is None for per in growth["first_step_above"].values() for step in per.values())
    assert growth["final"] == {"1": 0.0, "2": 0.0} and growth["steps"] == 2 * 2
    assert growth["seeds_final_median"] > 0 and growth["traced_weights"] == 4096
    assert "spread over k is" in payload["answer"] and "Churn" in payload["answer"]
    curves = np.load(out / "divergence.npz")
    assert curves["seed_pairs"].shape == (1, 4) and np.all(curves["k_seed1"] == 0)
    assert (out / "divergence.png").stat().st_size > 0
    # Rerun: every epoch is reused from the checkpoints, same numbers.
    assert cli.main(argv) == 0
    again = strict_json.loads(capsys.readouterr().out)
    assert again["runs"] == runs and again["fingerprints"] == fp
    # The table layout.
    assert cli.main(argv[:-1]) == 0
    text = capsys.readouterr().out
    assert "std over k" in text and "std over seeds" in text


@pytest.mark.parametrize(
    "extra, match",
    [(["--model", "resnet7"], "model"), (["--k", "0"], "k"), (["--lr", "-1"], "lr"), (["--epochs", "0"], "epochs")],
)
def test_variance_bad_input(extra, match, capsys):
    with pytest.raises(SystemExit):
        cli.main(["variance", *extra])
    assert match in capsys.readouterr().err


def test_variance_repeated_values_refused(tmp_path):
    from jaxcfl.experiments import variance

    with pytest.raises(ValueError, match="repeat"):
        variance.run(ks=(1, 1), seeds=(1,), out=None)


@pytest.mark.slow  # 27 s of compiling; run_in_processes and the k = 2^n checks are default in test_determinism.py
def test_determinism_cli(tmp_path, capsys, monkeypatch):
    """The in-process checks; the separate processes are replaced (tests/test_determinism.py runs real ones)."""
    from jaxcfl._core import determinism as determinism
    calls = []

    def fake(target, n, *, kwargs, deterministic):
        calls.append((target, n, deterministic))
        return ProcessCheck(target, ("a",) * n, (0.0,) * n, deterministic)

    monkeypatch.setattr(determinism, "run_in_processes", fake)
    out = tmp_path / "det"
    # 192 images in batches of 64 over 2 epochs, as tests/test_train.py's SMALL: the one-copy runs reuse
    # the trainer's compiled step (its ``alone`` fixture) when both run in one session.
    argv = ["determinism", "--train-size", "192", "--batch-size", "64", "--epochs", "2", "--out", str(out), "--json"]
    assert cli.main(argv) == 0
    payload = strict_json.loads(capsys.readouterr().out)
    assert [c[2] for c in calls] == [True, False]
    assert calls[0][0] == "jaxcfl.experiments.determinism_check:lockstep_weights"
    assert payload["powers_of_two_identical"] and payload["odd_k_differ"]
    assert payload["separate_k1_equals_k2"] and payload["separate_k3_differs"] and payload["separate_equals_lockstep"]
    assert len(payload["divergence_k1_k3"]) == payload["steps"] == 6
    assert payload["divergence_k1_k3"][-1] > 0
    acc = payload["test_accuracy"]
    assert acc["1"] == acc["2"] == acc["4"] and all(0 <= a <= 1 for a in acc.values())
    assert (out / "determinism.png").stat().st_size > 0
    assert json.loads((out / "determinism.json").read_text())["steps"] == 6


@pytest.mark.slow
def test_determinism_cli_real_processes(tmp_path, capsys):
    argv = ["determinism", "--train-size", "128", "--batch-size", "64", "--epochs", "2", "--out", str(tmp_path), "--json"]
    assert cli.main(argv) == 0
    payload = strict_json.loads(capsys.readouterr().out)
    assert payload["repeated_processes"]["on"]["identical"]
    assert payload["powers_of_two_identical"] and payload["odd_k_differ"]


# --- one seed, one k: what is missing is said, not guessed -----------------------------

@pytest.mark.slow
def test_variance_cli_one_seed(tmp_path, capsys):
    """One seed is a legitimate run: no seed pairs, so nothing over seeds, said as ``None`` and in words;
    the k pair's divergence is plotted (here k = 2 is k = 1 bit for bit: a curve of zeros)."""
    out = tmp_path / "var"
    argv = ["variance", *TINY, "--k", "1", "2", "3", "--seeds", "1", "--out", str(out), "--json"]
    assert cli.main(argv) == 0
    payload = strict_json.loads(capsys.readouterr().out)
    assert strict_json.loads((out / "variance.json").read_text())["not_measured"] == payload["not_measured"]
    assert set(payload["not_measured"]) == {"over_seeds", "verdict"}
    assert "one seed" in payload["not_measured"]["over_seeds"]
    assert payload["std_over_seeds"] is None and payload["mean_std_over_seeds"] is None
    assert list(payload["std_over_k"]) == ["1"] and payload["mean_std_over_k"] >= 0
    for name in ("accuracy", "loss"):
        spread = payload["spread"][name]
        assert spread["over_seeds"] is None and spread["verdict"] is None and spread["ratio"] is None
        assert spread["over_k"]["ci_low"] <= spread["over_k"]["ci_high"]
    assert payload["churn"]["over_seeds"] is None and payload["churn"]["over_k"]["pairs"] == 3
    growth = payload["divergence"]
    assert growth["final"] == {"1": 0.0} and growth["seeds_final_median"] is None
    assert growth["seeds_first_step_above"] is None
    assert "Not measured: one seed" in payload["answer"]
    assert "seed_pairs" not in np.load(out / "divergence.npz")
    for name in ("variance.json", "variance.csv", "variance.png", "divergence.png"):
        assert (out / name).stat().st_size > 0
    assert cli.main(argv[:-1]) == 0  # the text, from the checkpoints
    text = capsys.readouterr().out
    assert "mean std over seeds (batch order): not measured" in text and "Not measured: one seed" in text


def _fake_runs(ks, seeds, traced):
    """Finished runs as :func:`jaxcfl.experiments.variance.summarise` reads them, without training."""
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    steps, images = 6, 20
    runs = {}
    for s in seeds:
        divergence = np.cumsum(rng.uniform(1e-4, 1e-2, (steps, len(ks))), axis=0)
        divergence[:, 0] = 0.0  # copy 0 against itself
        acc, loss = rng.uniform(0.8, 0.9, len(ks)), rng.uniform(0.3, 0.5, len(ks))
        runs[s] = SimpleNamespace(
            final_accuracy=lambda last=None, a=acc: a, final_loss=lambda last=None, x=loss: x,
            test_predictions=rng.integers(0, 10, (len(ks), images)), step_divergence=divergence,
            param_trace=rng.standard_normal((steps, 8 if traced else 0)).astype(np.float32),
            fingerprints=tuple(f"{s}-{i}" for i in range(len(ks))), compile_seconds=0.0, guard_lr=None)
    return runs


@pytest.mark.parametrize(
    "ks, seeds, traced, missing",
    [((1.0,), (1,), True, {"over_k", "over_seeds", "verdict"}),
     ((1.0,), (1, 2), True, {"over_k", "verdict"}),
     ((1.0, 3.0), (4,), True, {"over_seeds", "verdict"}),
     ((1.0, 3.0), (1, 2), False, {"seed_divergence"})],
)
def test_variance_summary_without_pairs(tmp_path, ks, seeds, traced, missing):
    from jaxcfl._core.results import ResultDir
    from jaxcfl.experiments import variance
    from jaxcfl.nn._preset import TrainConfig

    results = _fake_runs(ks, seeds, traced)
    curves = variance.divergence_curves(ks, seeds, results)
    payload = variance.summarise(TrainConfig(model="cnn", epochs=2), ks, seeds, results, curves, resamples=50)
    payload.update(seconds=0.0, files={})
    payload = strict_json.loads(json.dumps(payload, allow_nan=False))  # strict JSON: None, never NaN
    assert set(payload["not_measured"]) == missing
    several_k, several_seeds = len(ks) > 1, len(seeds) > 1
    assert (payload["std_over_k"] is None, payload["mean_std_over_k"] is None) == (not several_k,) * 2
    assert (payload["std_over_seeds"] is None, payload["mean_std_over_seeds"] is None) == (not several_seeds,) * 2
    assert (payload["churn"]["over_k"] is None, payload["churn"]["over_seeds"] is None) == (not several_k, not several_seeds)
    assert (payload["divergence"] is None) == (not several_k)
    assert (payload["spread"]["accuracy"]["verdict"] is None) == ("verdict" in missing)
    text = variance.render(payload)
    assert all(f"Not measured: {why}." in text for key, why in payload["not_measured"].items() if key != "verdict")
    files = variance._write_outputs(ResultDir(tmp_path, kind="variance"), payload, curves)
    assert (tmp_path / "variance.png").stat().st_size > 0
    assert ("divergence_plot" in files) == bool(curves)  # one k and one seed: nothing to plot
    if curves:
        assert (tmp_path / "divergence.png").stat().st_size > 0
