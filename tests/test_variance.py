"""`jaxcfl variance` (appendix C) and `jaxcfl determinism` at toy sizes."""

from __future__ import annotations

import json

import _strict_json as strict_json
import numpy as np
import pytest

from jaxcfl import cli
from jaxcfl.determinism import ProcessCheck

TINY = ["--model", "cnn", "--train-size", "128", "--test-size", "64", "--batch-size", "64", "--epochs", "2"]


def test_variance_cli_json_and_resume(tmp_path, capsys):
    out = tmp_path / "var"
    argv = ["variance", *TINY, "--k", "1", "2", "3", "--seeds", "1", "2", "--out", str(out), "--json"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    payload = strict_json.loads(captured.out)  # stdout is pure JSON
    assert "[variance]" in captured.err
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
    from jaxcfl import determinism

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
