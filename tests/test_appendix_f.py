"""`jaxcfl reproduce appendix-f`: max stable lr against 2/alpha (Sun et al., JMLR 2024, appendix F, eqs 49-51)."""

from __future__ import annotations

import contextlib
import csv
import io
import json

import _strict_json as strict_json
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcfl import cli, plot
from jaxcfl.experiments import EXPERIMENTS, appendix_f

# Two cheap models at a tiny size; resnet20 takes minutes on a CPU (see the slow test). The notebook test
# (tests/test_notebooks.py) runs appendix F at this train size and these steps, reusing the compiled searches.
TINY_ARGS = ["--models", "mlp", "cnn", "--alphas", "1", "1000", "--train-size", "16", "--steps", "20"]


def _cli(*argv: str) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(list(argv))
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One CLI run at the tiny size with --json: (rows, stderr, out dir)."""
    out = tmp_path_factory.mktemp("appendix_f") / "out"
    code, stdout, stderr = _cli("reproduce", "appendix-f", *TINY_ARGS, "--out", str(out), "--json")
    assert code == 0
    assert stdout.lstrip().startswith("[")  # nothing but the JSON list on stdout
    return strict_json.loads(stdout), stderr, out


def test_registered():
    assert EXPERIMENTS["appendix-f"][0] == "jaxcfl.experiments.appendix_f"
    for name in ("add_arguments", "main", "render", "run"):
        assert callable(getattr(appendix_f, name))
    # its networks; jaxcfl.MODELS names the PDE's right-hand sides
    assert appendix_f.ARCHITECTURES == ("mlp", "cnn", "resnet20") and not hasattr(appendix_f, "MODELS")


def test_json_is_a_list_of_rows_with_the_ratio(tiny):
    rows, stderr, _ = tiny
    assert isinstance(rows, list) and len(rows) == 4
    assert [(r["model"], r["alpha"]) for r in rows] == [("mlp", 1.0), ("mlp", 1000.0), ("cnn", 1.0), ("cnn", 1000.0)]
    assert "[appendix-f]" in stderr
    for r in rows:
        assert set(appendix_f.ROW_KEYS) <= set(r)
        assert r["status"] == "found" and r["max_lr"] > 0
        assert r["ratio"] == pytest.approx(r["max_lr"] * r["alpha"] / 2, rel=1e-12)
        assert r["bracket"][0] < r["max_lr"] < r["bracket"][1] and r["bracket"][1] / r["bracket"][0] - 1 <= 0.05 + 1e-12
        assert r["predicted_lr"] == pytest.approx(2 / (r["alpha"] + r["sharpness"]))  # eq 50 with F_max = l_max
        assert (r["train_size"], r["steps"]) == (16, 20)


def test_ratio_tends_to_one_as_alpha_grows(tiny):
    rows, _, _ = tiny
    for model in ("mlp", "cnn"):
        small, large = (r for r in rows if r["model"] == model)
        assert large["ratio"] == pytest.approx(1.0, abs=0.05)  # eq 51: 2/alpha once alpha dominates
        assert small["ratio"] < large["ratio"]


def test_files_written_and_rows_reused(tiny):
    rows, _, out = tiny
    assert json.loads((out / "appendix_f.json").read_text()) == rows
    with open(out / "appendix_f.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [(t["model"], float(t["alpha"]), float(t["ratio"])) for t in table] == [
        (r["model"], r["alpha"], pytest.approx(r["ratio"])) for r in rows]
    assert (out / "appendix_f.png").stat().st_size > 0
    assert len(list((out / "rows").glob("*.json"))) == 4
    code, stdout, stderr = _cli("reproduce", "appendix-f", *TINY_ARGS, "--out", str(out), "--json")
    assert code == 0 and strict_json.loads(stdout) == rows
    assert stderr.count("reusing") == 4 and "searching" not in stderr
    # Other settings are another run: refused in this folder (docs/reliability.md), searched in another.
    other = ("reproduce", "appendix-f", "--models", "mlp", "--alphas", "30", "--train-size", "16", "--steps", "20")
    with pytest.raises(SystemExit) as exit_, contextlib.redirect_stderr(io.StringIO()) as err:
        cli.main([*other, "--out", str(out)])
    assert exit_.value.code == 2 and "differs in: alphas, models" in err.getvalue()
    code, stdout, stderr = _cli(*other, "--out", str(out.parent / "other"))
    assert code == 0 and stderr.count("reusing") == 0 and stderr.count("searching") == 1
    assert "mlp" in stdout and "ratio" in stdout and "-----" in stdout  # the rendered table


def _quadratic(p, mat):
    return 0.5 * p @ mat @ p


def test_exactly_quadratic_loss_gives_alpha_over_alpha_plus_lmax():
    """For ``0.5 p^T A p`` the limit is exactly ``2 / (alpha + l_max)`` (eq 50): ratio ``alpha / (alpha + l_max)`` -> 1."""
    eigs = np.array([0.5, 1.0, 2.0, 5.0, 10.0])
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((5, 5)))
    mat = jnp.asarray((q * eigs) @ q.T, jnp.float32)
    params = jnp.asarray(np.random.default_rng(1).standard_normal(5), jnp.float32)
    ratios = []
    for alpha in (1.0, 10.0, 100.0, 1000.0):
        row = appendix_f.measure(_quadratic, params, mat, alpha=alpha, steps=300, rtol=0.01, sharpness_max=10.0)
        assert row["status"] == "found"
        assert row["ratio"] == pytest.approx(alpha / (alpha + 10.0), rel=0.01)
        assert row["ratio"] == pytest.approx(row["predicted_ratio"], rel=0.01)
        ratios.append(row["ratio"])
    assert np.all(np.diff(ratios) > 0) and ratios[-1] == pytest.approx(1.0, abs=0.02)
    # Without the sharpness the search starts from 2/alpha and still brackets the limit.
    row = appendix_f.measure(_quadratic, params, mat, alpha=10.0, steps=300, rtol=0.01)
    assert row["ratio"] == pytest.approx(0.5, rel=0.01) and row["predicted_lr"] is None


def test_the_mlp_at_large_alpha_reaches_the_bound():
    work = appendix_f.workload("mlp", train_size=8)
    assert work.num_params == 784 * 128 + 128 + 128 * 10 + 10
    row = appendix_f.measure(work.loss_fn, work.params, *work.args, alpha=1e4, steps=50, rtol=0.02)
    assert row["ratio"] == pytest.approx(1.0, abs=0.02)


def test_cnn_convolution_matches_lax_conv():
    rng = np.random.default_rng(0)
    x, w = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in [(2, 6, 6, 3), (3, 3, 3, 4)])
    b = jnp.arange(4.0)
    ref = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
    np.testing.assert_allclose(appendix_f._conv3x3(x, w, b), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--alphas", "0"], "expected a finite number > 0"),
        (["--alphas", "-3"], "expected a finite number > 0"),
        (["--models", "vgg99"], "invalid choice: 'vgg99'"),
        (["--train-size", "0"], "expected an integer > 0"),
    ],
)
def test_cli_rejects_bad_input(argv, message, tmp_path):
    with pytest.raises(SystemExit) as err:
        _cli("reproduce", "appendix-f", *argv, "--out", str(tmp_path))
    assert err.value.code == 2
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit):
        cli.main(["reproduce", "appendix-f", *argv, "--out", str(tmp_path)])
    assert message in stderr.getvalue()


def test_run_rejects_bad_input():
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        appendix_f.run(models=("mlp",), alphas=(1.0, 0.0), out=None)
    with pytest.raises(ValueError, match="unknown model 'lenet'"):
        appendix_f.run(models=("lenet",), alphas=(1.0,), out=None)
    with pytest.raises(ValueError, match="train_size must be at most 1433"):
        appendix_f.workload("mlp", train_size=10**6)


def test_ratio_vs_alpha_plot():
    pytest.importorskip("matplotlib")
    rows = [dict(model="a", alpha=1.0, ratio=0.2, predicted_ratio=0.1), dict(model="a", alpha=10.0, ratio=0.9),
            dict(model="b", alpha=1.0, ratio=None), dict(model="b", alpha=10.0, ratio=0.95)]
    fig = plot.ratio_vs_alpha(rows)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    labels = [line.get_label() for line in ax.lines]
    assert labels[:2] == ["a", "a: alpha/(alpha + l_max)"] and "b" in labels
    np.testing.assert_allclose(ax.lines[-1].get_ydata(), 1.0)  # the line of eq 51


@pytest.mark.slow
def test_resnet20_row(tmp_path):
    rows = appendix_f.run(models=("resnet20",), alphas=(1000.0,), steps=5, out=tmp_path)
    assert rows[0]["status"] == "found" and rows[0]["ratio"] == pytest.approx(1.0, abs=0.1)
    assert rows[0]["train_size"] == appendix_f.DEFAULT_WORKLOAD["resnet20"][0]
