"""`jaxcfl reproduce open-question` (appendix A's open question): three arms of the variance set-up at a toy size."""

from __future__ import annotations

import json
import time

import _strict_json as strict_json
import numpy as np
import pytest

from jaxcfl import cli
from jaxcfl._core.results import json_text
from jaxcfl.experiments import open_question as oq
from jaxcfl.experiments import variance
from jaxcfl.nn._preset import TrainConfig

# 128 images in batches of 64 for 2 epochs: 4 steps, the lr divided by 10 after the first epoch.
# The guard re-estimates every step with 2 Lanczos iterations (its 3 programs compile fast), and
# safety 0.05 puts its limit below the decayed lr, so that it acts.
TINY = ["--model", "cnn", "--train-size", "128", "--test-size", "64", "--batch-size", "64", "--epochs", "2",
        "--k", "1", "3", "--seeds", "1", "2", "--iterations", "2", "--first-iterations", "2", "--every", "1",
        "--safety", "0.05", "--trace-params", "64", "--resamples", "200"]


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """The experiment, run once for the module: ``(payload, out, argv)``."""
    out = tmp_path_factory.mktemp("open_question")
    argv = ["reproduce", "open-question", *TINY, "--out", str(out)]
    args = cli.build_parser().parse_args(argv)
    payload = oq.main(args)
    return json.loads(json_text(payload)), out, argv


@pytest.mark.slow  # the three arms compile the trainer's programs: 40 s (the guard and variance are default elsewhere)
def test_arms_hold_every_statistic(first):
    payload, _, _ = first
    arms = payload["arms"]
    assert list(arms) == ["baseline", "guarded", "constant"]
    for name, arm in arms.items():
        assert sorted((r["k"], r["seed"]) for r in arm["runs"]) == [(k, s) for k in (1.0, 3.0) for s in (1, 2)]
        acc = arm["mean_accuracy"]
        assert 0 <= acc["ci_low"] <= acc["estimate"] <= acc["ci_high"] <= 100
        assert acc["estimate"] == pytest.approx(np.mean([r["final_accuracy"] for r in arm["runs"]]))
        for quantity in ("accuracy", "loss"):
            for side in ("over_k", "over_seeds"):
                d = arm["spread"][quantity][side]
                assert 0 <= d["ci_low"] <= d["ci_high"] and d["level"] == 0.95
        assert arm["churn"]["over_k"]["pairs"] == 2 and arm["churn"]["test_images"] == 64
        dv = arm["divergence"]
        assert (dv["reference_k"], dv["compared_k"], dv["level"], dv["steps"]) == (1.0, 3.0, 1e-2, 4)
        assert dv["crossed"] == sum(x is not None for x in dv["first_step_above"].values())
        assert dv["final_median"]["estimate"] == pytest.approx(np.median(list(dv["final"].values())))
        assert arm["seconds"] > 0 and arm["folder"].endswith(name)
        assert arm["guarded"] == (name == "guarded")
    assert arms["baseline"]["milestones"] == arms["guarded"]["milestones"] == [1]
    assert arms["constant"]["milestones"] == []
    for name in ("guarded", "constant"):
        cmp = payload["comparisons"][name]
        assert cmp["accuracy_difference"]["verdict"] in ("lower", "higher", "not distinguishable")
        assert cmp["spread"]["accuracy"]["over_k"]["verdict"] in ("smaller", "larger", "not distinguishable")
        assert cmp["divergence"]["seeds_later"] + cmp["divergence"]["seeds_earlier"] + cmp["divergence"]["seeds_same"] == 2


@pytest.mark.slow  # the three arms compile the trainer's programs: 40 s (the guard and variance are default elsewhere)
def test_constant_lr_is_the_smallest_limit_of_the_guarded_arm(first):
    payload, out, _ = first
    c = payload["constant_lr"]
    guard = np.load(out / "guarded" / "guard.npz")
    lr = np.stack([guard[f"lr_seed{s}"] for s in (1, 2)])  # (seeds, steps, copies)
    lam = np.stack([guard[f"lambda_seed{s}"] for s in (1, 2)])
    assert lr.shape == lam.shape == (2, 4, 2)
    base = 0.1
    config = TrainConfig(model="cnn", epochs=2, guard=True, guard_safety=0.05)
    limit = variance.guard_limit_lr(config, lam)  # min(lr, safety S / lambda) at every step
    assert c["lr"] == pytest.approx(limit.min(), rel=1e-12) and c["lr"] <= base
    assert payload["arms"]["constant"]["lr"] == c["lr"]
    assert c["min_effective_lr"] == pytest.approx(lr.min())
    assert c["max_lambda"] == pytest.approx(lam.max())
    # The guard's effective lr never exceeds the base lr nor the schedule's (0.1, then 0.01), and it
    # is the limit wherever that is lower: in the first epoch the two agree to float32.
    schedule = np.array([0.1, 0.1, 0.01, 0.01])[None, :, None]
    assert np.all(lr <= base * (1 + 1e-6)) and np.all(lr <= schedule * (1 + 1e-6))
    np.testing.assert_allclose(lr, np.minimum(schedule, limit), rtol=1e-5)
    np.testing.assert_allclose(lr[:, :2], limit[:, :2], rtol=1e-5)
    assert 0 < c["guard_clipped_fraction"] <= 1  # safety 0.05: the guard acts in the second epoch
    assert "lambda_max" in c["method"] and "min" in c["method"]


@pytest.mark.slow  # the three arms compile the trainer's programs: 40 s (the guard and variance are default elsewhere)
def test_answer_files_and_figure(first):
    payload, out, _ = first
    text = payload["answer"]
    for word in ("baseline", "guarded", "constant", "ANSWER", "std over k", "wall time"):
        assert word in text
    for name in ("open_question.csv", "open_question_summary.csv", "open_question.json", "open_question.png",
                 "open_question_curves.npz", "baseline/variance.json", "guarded/guard.npz", "constant/seed2/checkpoint.npz"):
        assert (out / name).stat().st_size > 0, name
    rows = (out / "open_question.csv").read_text().splitlines()
    assert rows[0] == "arm,k,seed,lr,guard,milestones,final_accuracy,final_loss" and len(rows) == 1 + 3 * 4
    summary = (out / "open_question_summary.csv").read_text().splitlines()
    assert summary[0].startswith("arm,lr,guard,milestones,mean_accuracy") and len(summary) == 4
    assert strict_json.loads((out / "open_question.json").read_text())["arms"].keys() == payload["arms"].keys()
    curves = np.load(out / "open_question_curves.npz")
    assert curves["baseline_k_seed1"].shape == (4,) and curves["guarded_lr_seed2"].shape == (4, 2)
    text = oq.render(payload)
    assert "constant lr" in text and "acc. std over k" in text and "ANSWER" in text


@pytest.mark.slow  # the three arms compile the trainer's programs: 40 s (the guard and variance are default elsewhere)
def test_rerun_reuses_everything_and_prints_strict_json(first, capsys):
    payload, _, argv = first
    start = time.perf_counter()
    assert cli.main([*argv, "--json"]) == 0
    seconds = time.perf_counter() - start
    captured = capsys.readouterr()
    again = strict_json.loads(captured.out)  # stdout is pure, strict JSON
    assert "finished before, reused" in captured.err and "[variance]" not in captured.err
    assert seconds < 10  # nothing trains (the figure is drawn again)
    assert again["arms"] == payload["arms"] and again["constant_lr"] == payload["constant_lr"]
    assert again["comparisons"] == payload["comparisons"] and again["answer"] == payload["answer"]


@pytest.mark.parametrize("extra, match", [
    (["--safety", "1.5"], "--safety"), (["--k", "1"], "--k"), (["--seeds", "1", "1"], "--seeds"),
    (["--every", "0"], "--every"), (["--iterations", "x"], "--iterations"), (["--seeds", "-1"], "--seeds"),
])
def test_bad_input(extra, match, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["reproduce", "open-question", *extra, "--out", str(tmp_path / "never")])
    assert exc.value.code == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "never").exists()  # refused before anything was written


def test_bad_input_from_python():
    # In Python the messages name the keyword argument; on the command line, the flag (test_bad_input).
    with pytest.raises(ValueError, match="^safety must be in"):
        oq.run(safety=0.0, out=None)
    with pytest.raises(ValueError, match="^first_iterations must be"):
        oq.run(first_iterations=0, out=None)
    with pytest.raises(ValueError, match="lr"):
        oq.run(lr=-1.0, out=None)


def test_help_shows_the_docstring_and_the_guard_options(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["reproduce", "open-question", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert " ".join(oq.__doc__.split("\n\n")[0].split()) in text
    for option in ("--safety", "--every", "--iterations", "--first-iterations", "--k", "--seeds", "--out", "--json"):
        assert option in text
