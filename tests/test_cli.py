import json
import subprocess
import sys

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
    from jaxcfl import theory

    assert cli.main(["theory", "--size", "32", "--kernel-size", "4", "8", "--json"]) == 0
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert "[theory]" in captured.err  # progress goes to stderr
    rows = payload["rows"]
    assert [(r["scheme"], r["kernel_size"]) for r in rows] == [("nesterov", 4), ("gd", 4), ("nesterov", 8), ("gd", 8)]
    img = np.where(np.indices((32, 32)).sum(0) % 2 == 0, -1.0, 1.0)
    lo, hi = theory.windowed_alpha_bounds(img, 8, 1e-4, scheme="nesterov")
    assert rows[2]["windowed_alpha_min"] == pytest.approx(lo) and rows[2]["windowed_alpha_max"] == pytest.approx(hi)
    assert rows[3]["paper_alpha_max"] == pytest.approx(2e8)


def test_theory_reads_npy_images(tmp_path, capsys):
    path = tmp_path / "img.npy"
    np.save(path, np.random.default_rng(0).standard_normal((12, 12)))
    assert cli.main(["theory", "--image", str(path), "--kernel-size", "3", "--scheme", "gd", "--lr", "1e-3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"][0]["kernel_size"] == 3


def test_heat_json(capsys):
    assert cli.main(["heat", "--dt", "0.4", "0.8", "--steps", "30", "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
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


def test_reproduce_table5_small(tmp_path, capsys):
    out = tmp_path / "t5"
    argv = ["reproduce", "table5", "--size", "32", "--kernel-size", "4", "--steps", "300", "--out", str(out), "--json"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert "[table5]" in captured.err
    rows = payload["rows"]
    assert [(r["scheme"], r["kernel_size"]) for r in rows] == [("nesterov", 4), ("gd", 4)]
    for r in rows:
        # At this toy size 300 steps of lr = 1e-8 cannot resolve alpha_min (h alpha_min ~ 3e-5 per step; see
        # test_bisect for the precision tests); alpha_max is resolved.
        assert r["empirical_alpha_max"] == pytest.approx(r["windowed_alpha_max"], rel=5e-3)
        assert r["empirical_alpha_min"] > 0
    for name in ("table5.csv", "table5.json", "stability_map.png"):
        assert (out / name).stat().st_size > 0
    # A second run reuses the finished rows instead of recomputing them.
    assert cli.main(argv) == 0
    assert "reusing" in capsys.readouterr().err
    # Another operator is another computation (not reused), with the same bounds to within rtol.
    assert cli.main(argv + ["--operator", "fft", "--no-map"]) == 0
    captured = capsys.readouterr()
    assert "reusing" not in captured.err
    for fft_row, row in zip(json.loads(captured.out)["rows"], rows):
        assert fft_row["operator"] == "fft" and row["operator"] == "auto"
        assert fft_row["empirical_alpha_max"] == pytest.approx(row["empirical_alpha_max"], rel=2e-3)


def test_deterministic_flag_enables_the_mode(monkeypatch, capsys):
    from jaxcfl import determinism

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
