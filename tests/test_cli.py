import json
import subprocess
import sys

import _strict_json as strict_json
import numpy as np
import pytest

from jaxcfl import cli
def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "theory" in out and "heat" in out


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 0
    assert "usage" in capsys.readouterr().out


def test_theory_json_is_pure_json_and_matches_the_library(capsys):
    from jaxcfl.pde import _theory as theory
    assert cli.main(["theory", "--size", "32", "--kernel-size", "4", "8", "--json"]) == 0
    captured = capsys.readouterr()
    payload = strict_json.loads(captured.out)
    assert "[theory]" in captured.err  # progress goes to stderr
    rows = payload["rows"]
    assert [(r["scheme"], r["kernel_size"]) for r in rows] == [("nesterov", 4), ("gd", 4), ("nesterov", 8), ("gd", 8)]
    img = np.where(np.indices((32, 32)).sum(0) % 2 == 0, -1.0, 1.0)
    lo, hi = theory.windowed_alpha_bounds(img, 8, 1e-4, scheme="nesterov")
    assert rows[2]["windowed_alpha_min"] == pytest.approx(lo) and rows[2]["windowed_alpha_max"] == pytest.approx(hi)
    assert rows[3]["paper_alpha_max"] == pytest.approx(2e8)


def test_theory_reads_npy_images(tmp_path, capsys):
    from jaxcfl.pde import _theory as theory
    # A rank-one 32 x 32 image and a 4 kernel: the operator of the checkerboard test above, so the same
    # compiled Lanczos solver.
    rng = np.random.default_rng(0)
    img = np.outer(rng.standard_normal(32), rng.standard_normal(32))
    path = tmp_path / "img.npy"
    np.save(path, img)
    assert cli.main(["theory", "--image", str(path), "--kernel-size", "4", "--scheme", "gd", "--lr", "1e-3", "--json"]) == 0
    (row,) = strict_json.loads(capsys.readouterr().out)["rows"]
    assert row["kernel_size"] == 4
    lo, hi = theory.windowed_alpha_bounds(img, 4, 1e-3, scheme="gd")  # the bounds of this image
    assert row["windowed_alpha_min"] == pytest.approx(lo) and row["windowed_alpha_max"] == pytest.approx(hi)


def test_heat_json(capsys):
    assert cli.main(["heat", "--dt", "0.4", "0.8", "--steps", "30", "--json"]) == 0
    runs = strict_json.loads(capsys.readouterr().out)["runs"]
    assert runs[0]["cfl_stable"] and not runs[1]["cfl_stable"]
    assert runs[1]["measured_growth_factor"] == pytest.approx(runs[1]["von_neumann_factor"], rel=0.05)
    assert len(runs[0]["snapshots"]) == 3


@pytest.mark.parametrize(
    "argv, match",
    [
        (["theory", "--lr", "-1"], "lr"),
        (["theory", "--kernel-size", "0"], "kernel-size"),
        (["theory", "--size", "8", "--kernel-size", "9"], "kernel_size"),
        (["theory", "--scheme", "adam"], "scheme"),
        (["theory", "--momentum", "1.5"], "momentum"),
        (["theory", "--image", "/nonexistent.npy"], "image"),
        (["heat", "--dt", "nan"], "dt"),
    ],
)
def test_bad_arguments_exit_with_a_message(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code != 0
    assert match in capsys.readouterr().err + str(exc.value.code)


def test_console_script_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "jaxcfl.cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("jaxcfl ")


@pytest.mark.slow
def test_reproduce_table5_small(tmp_path, capsys):
    # The size, kernel and steps of notebooks/table5_figure3.ipynb's small branch: the bisection programs
    # compiled here are the ones the notebook test runs (tests/test_notebooks.py), so they compile once.
    out = tmp_path / "t5"
    argv = ["reproduce", "table5", "--size", "64", "--kernel-size", "8", "--steps", "1000", "--out", str(out), "--json"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    payload = strict_json.loads(captured.out)
    assert "[table5]" in captured.err
    rows = payload["rows"]
    assert [(r["scheme"], r["kernel_size"]) for r in rows] == [("nesterov", 8), ("gd", 8)]
    for r in rows:
        # At this toy size 1000 steps of the paper's lrs cannot resolve alpha_min (h alpha_min ~ 5e-4 per step;
        # see test_bounds and the notebook test for the precision tests); alpha_max is resolved.
        assert r["empirical_alpha_max"] == pytest.approx(r["windowed_alpha_max"], rel=5e-3)
        assert r["empirical_alpha_min"] > 0
    for name in ("table5.csv", "table5.json", "stability_map.png"):
        assert (out / name).stat().st_size > 0
    # A second run reuses the finished rows instead of recomputing them.
    assert cli.main(argv) == 0
    assert "reusing" in capsys.readouterr().err
    # Another operator is another computation (not reused), with the same bounds to within rtol. The dense
    # normal matrix (64 x 64 here) compiles fastest; the FFT path's statuses and bounds are tested on the
    # sweep engine that empirical_bounds calls (test_sweeps, test_separable).
    assert cli.main(argv + ["--operator", "dense", "--no-map"]) == 0
    captured = capsys.readouterr()
    assert "reusing" not in captured.err
    for dense_row, row in zip(strict_json.loads(captured.out)["rows"], rows):
        assert dense_row["operator"] == "dense" and row["operator"] == "auto"
        assert dense_row["empirical_alpha_max"] == pytest.approx(row["empirical_alpha_max"], rel=2e-3)


def test_deterministic_flag_enables_the_mode(monkeypatch, capsys):
    from jaxcfl._core import determinism as determinism
    calls = []
    monkeypatch.setattr(determinism, "enable_deterministic_mode", lambda: calls.append(1) or {})
    monkeypatch.delenv("JAXCFL_DETERMINISTIC", raising=False)
    assert cli.main(["heat", "--json", "--steps", "3"]) == 0
    assert calls == []
    assert cli.main(["--deterministic", "heat", "--json", "--steps", "3"]) == 0
    assert calls == [1]
    monkeypatch.setenv("JAXCFL_DETERMINISTIC", "1")
    assert cli.main(["heat", "--json", "--steps", "3"]) == 0
    assert calls == [1, 1]
    capsys.readouterr()


def test_top_level_commands_have_help(capsys):
    for command in ("variance", "determinism"):
        with pytest.raises(SystemExit) as exc:
            cli.main([command, "--help"])
        assert exc.value.code == 0
        assert "--json" in capsys.readouterr().out


# The parser imports an experiment module only when its command runs or shows its help: each call
# runs in a fresh interpreter, and reports which heavy modules it loaded.
_IMPORTS = """
import contextlib, io, json, sys
from jaxcfl import cli
seen = []
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            code = cli.main(argv)
        except SystemExit as exit:
            code = exit.code
    loaded = sorted(m for m in sys.modules
                    if m in ("flax", "jaxcfl.nn._preset", "jaxcfl.nn.nets")
                    or (m.startswith("jaxcfl.experiments.") and not m.startswith("jaxcfl.experiments._")))
    seen.append(dict(code=code, loaded=loaded))
print(json.dumps(seen))
"""


def _loaded_after(*argvs: list[str]) -> list[dict]:
    out = subprocess.run([sys.executable, "-c", _IMPORTS, json.dumps(argvs)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def loaded():
    """One fresh interpreter for the calls below, in this order; ``loaded`` accumulates, so
    ``theory`` runs first and every call before ``reproduce fig4 --help`` must load nothing."""
    theory, top, reproduce, fig4 = _loaded_after(["theory", "--size", "16", "--kernel-size", "4", "--scheme", "gd", "--json"],
                                                 ["--help"], ["reproduce", "--help"], ["reproduce", "fig4", "--help"])
    return dict(theory=theory, top=top, reproduce=reproduce, fig4=fig4)


def test_theory_loads_no_flax_and_no_experiment(loaded):
    assert loaded["theory"] == dict(code=0, loaded=[])


def test_help_loads_an_experiment_only_for_its_own_help(loaded):
    assert loaded["top"] == loaded["reproduce"] == dict(code=0, loaded=[])
    assert loaded["fig4"] == dict(code=0, loaded=["jaxcfl.experiments.fig4"])  # and still no Flax


def test_reproduce_help_lists_every_experiment(capsys):
    from jaxcfl.experiments import EXPERIMENTS

    with pytest.raises(SystemExit):
        cli.main(["reproduce", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, (_, help_text) in EXPERIMENTS.items():
        assert f"{name} {help_text}" in text


@pytest.mark.parametrize("command", [["reproduce", "table5"], ["reproduce", "fig4"], ["reproduce", "appendix-f"]])
def test_an_experiments_help_shows_its_docstring_and_its_options(command, capsys):
    import argparse
    import importlib

    from jaxcfl.experiments import EXPERIMENTS

    module = importlib.import_module(EXPERIMENTS[command[1]][0])
    reference = argparse.ArgumentParser()
    module.add_arguments(reference)
    with pytest.raises(SystemExit) as exc:
        cli.main([*command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert " ".join(module.__doc__.split("\n\n")[0].split()) in " ".join(text.split())
    for action in reference._actions:
        for option in action.option_strings:
            assert option in text
    assert "--json" in text
