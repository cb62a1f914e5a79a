"""``jaxcfl sweep`` and ``jaxcfl bounds`` on a user's own image (docs/cli.md), the grid syntax of their
``--lr`` / ``--alpha``, and :func:`jaxcfl.load_image`.

The commands run in-process (``cli.main``) on 16 x 16 images with a 4 x 4 kernel, so that each
compiled program is small; the runs they do are compared with the library called directly.
"""

import argparse
import contextlib
import io
import os
import subprocess
import sys
import warnings

import _strict_json as strict_json
import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxcfl
from jaxcfl import cli
from jaxcfl.experiments._cli_types import merge_grid, nonnegative_grid, parse_grid, positive_grid
from jaxcfl._core.images import LUMA_WEIGHTS, load_image

PIL = pytest.importorskip("PIL.Image")


def _run(argv, capsys):
    """``jaxcfl ARGV`` in this process: (exit status, stdout, stderr)."""
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _fails(argv, capsys) -> str:
    """The one-line message of a command that must exit with status 2."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2, err
    message = [line for line in err if not line.startswith("[")]  # progress lines may come first
    assert len(message) == 1 and "Traceback" not in "\n".join(err), err
    return message[0]


# --- the grid syntax ----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "tokens, expected",
    [
        (["1e-4"], [1e-4]),
        (["1e-4,2e-4, 5e-4"], [1e-4, 2e-4, 5e-4]),
        (["1e-5:1e-3:3"], [1e-5, 1e-4, 1e-3]),
        (["log:1e-3:1e-5:3"], [1e-5, 1e-4, 1e-3]),  # a descending range, sorted
        (["lin:0:10:6"], [0, 2, 4, 6, 8, 10]),
        (["1e-5:1e-3:3", "5e-4", "1e-4"], [1e-5, 1e-4, 5e-4, 1e-3]),  # merged, sorted, de-duplicated
        (["7:7:5"], [7.0]),
        (["2:8:1"], [2.0]),
    ],
)
def test_grid_tokens(tokens, expected):
    values = merge_grid([nonnegative_grid(t) for t in tokens])
    np.testing.assert_allclose(values, expected, rtol=1e-12)


@settings(max_examples=60, deadline=None)
@given(start=st.floats(1e-12, 1e12), stop=st.floats(1e-12, 1e12), n=st.integers(1, 300))
def test_a_log_range_is_n_log_spaced_values_with_exact_ends(start, stop, n):
    values = positive_grid(f"{start!r}:{stop!r}:{n}")
    assert values.shape == (n,) and values[0] == start
    if n > 1:
        assert values[-1] == stop
        np.testing.assert_allclose(np.diff(np.log(values)), np.log(stop / start) / (n - 1), atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1e30, allow_subnormal=False), min_size=1, max_size=20))
def test_a_list_is_its_values_sorted_and_unique(values):
    text = ",".join(map(repr, values))
    np.testing.assert_array_equal(merge_grid([nonnegative_grid(text)]), np.unique(values))


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "empty"),
        ("1e-4,", "not a number"),
        ("fast", "not a number"),
        ("1e-5:1e-3", "not a range"),
        ("1e-5:1e-3:2:4", "not a range"),
        ("1e-5:1e-3:2.5", "whole number"),
        ("1e-5:1e-3:0", "N of"),
        ("1e-5:1e-3:10000001", "N of"),
        ("0:1e-3:4", "START > 0"),
        ("lin:1", "range"),
        ("nan", "not finite"),
        ("1e-3:inf:3", "not finite"),
        ("-1e-3", "> 0"),
        ("lin:0:1:3", "> 0"),
    ],
)
def test_bad_grids_say_what_is_wrong(text, match):
    with pytest.raises(argparse.ArgumentTypeError, match=match):
        positive_grid(text)


def test_alpha_grids_may_hold_zero_but_nothing_negative():
    np.testing.assert_array_equal(nonnegative_grid("lin:0:1:3"), [0, 0.5, 1])
    with pytest.raises(argparse.ArgumentTypeError, match=">= 0"):
        nonnegative_grid("-1,2")
    assert parse_grid("-1,2").tolist() == [-1, 2]  # the syntax alone checks no sign


# --- images -------------------------------------------------------------------------------------

def _save(tmp_path, name, array, **kw):
    path = tmp_path / name
    PIL.fromarray(array).save(path, **kw)
    return path


def test_8_bit_grey_png_is_v_over_255(tmp_path):
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = load_image(_save(tmp_path, "g8.png", grey))
    assert image.dtype == np.float64 and image.shape == (16, 16)
    np.testing.assert_array_equal(image, grey / 255.0)
    assert image.min() == 0.0 and image.max() == 1.0


def test_16_bit_grey_png_keeps_all_16_bits(tmp_path):
    grey = (np.arange(256, dtype=np.uint16) * 257 + np.arange(256) % 7).astype(np.uint16).reshape(16, 16)
    grey[0, 0], grey[-1, -1] = 0, 65535
    path = _save(tmp_path, "g16.png", grey)
    assert PIL.open(path).mode.startswith("I")  # stored as 16-bit grey
    image = load_image(path)
    np.testing.assert_array_equal(image, grey / 65535.0)
    assert np.any(grey % 257)  # values between the 256 levels of 8 bits: kept exactly above


def test_colour_png_is_the_itu_r_601_luma(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    image = load_image(_save(tmp_path, "rgb.png", rgb))
    expected = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255.0
    np.testing.assert_allclose(image, expected, rtol=0, atol=1e-15)
    assert LUMA_WEIGHTS == (0.299, 0.587, 0.114)
    # Pillow's "L" mode uses the same weights, rounded to 8 bits.
    pillow = np.asarray(PIL.fromarray(rgb).convert("L"), np.float64) / 255.0
    assert np.abs(image - pillow).max() <= 0.5 / 255.0 + 1e-12
    # An alpha channel is ignored.
    rgba = np.concatenate([rgb, np.full((16, 16, 1), 17, np.uint8)], axis=-1)
    np.testing.assert_array_equal(load_image(_save(tmp_path, "rgba.png", rgba)), image)


def test_jpeg_is_read_as_its_decoded_luma(tmp_path):
    rgb = np.zeros((16, 24, 3), np.uint8)
    rgb[:, :12] = (200, 40, 90)
    path = _save(tmp_path, "photo.jpg", rgb, quality=95)
    image = load_image(path)
    assert image.shape == (16, 24)
    decoded = np.asarray(PIL.open(path).convert("RGB"), np.float64)
    np.testing.assert_allclose(image, decoded @ np.array(LUMA_WEIGHTS) / 255.0, atol=1e-15)
    assert image[:, :4].mean() == pytest.approx((0.299 * 200 + 0.587 * 40 + 0.114 * 90) / 255, abs=0.02)


def test_jpeg_exif_orientation_is_applied(tmp_path):
    picture = PIL.fromarray(np.zeros((8, 20, 3), np.uint8))
    exif = picture.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees to display"
    path = tmp_path / "rotated.jpg"
    picture.save(path, exif=exif)
    assert load_image(path).shape == (20, 8)


def test_npy_arrays_are_used_as_they_are(tmp_path):
    array = np.random.default_rng(1).standard_normal((5, 7)) * 1e3
    np.save(tmp_path / "a.npy", array)
    np.testing.assert_array_equal(load_image(tmp_path / "a.npy"), array)
    np.save(tmp_path / "i.npy", np.arange(6, dtype=np.int16).reshape(2, 3))
    assert load_image(str(tmp_path / "i.npy")).tolist() == [[0, 1, 2], [3, 4, 5]]


def test_checkerboard_by_name():
    np.testing.assert_array_equal(load_image("checkerboard", size=6), np.asarray(jaxcfl.checkerboard(6), np.float64))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda t: t / "missing.png", "no such file"),
        (lambda t: t, "a folder"),
        (lambda t: (t / "text.png").write_text("not a picture") and t / "text.png", "not a picture Pillow recognises"),
        (lambda t: np.save(t / "cube.npy", np.ones((2, 2, 2))) or t / "cube.npy", r"shape \(2, 2, 2\)"),
        (lambda t: np.save(t / "nan.npy", np.array([[1.0, np.nan]])) or t / "nan.npy", "NaN or infinite"),
        (lambda t: np.save(t / "s.npy", np.array([["a"]])) or t / "s.npy", "real numbers"),
        (lambda t: np.save(t / "o.npy", np.array([[None]], object)) or t / "o.npy", "cannot read"),
        (lambda t: np.save(t / "empty.npy", np.ones((0, 3))) or t / "empty.npy", "empty"),
        (lambda t: np.savez(t / "two.npz", a=1, b=2) or os.replace(t / "two.npz", t / "two.npy") or t / "two.npy",
         "several arrays"),
        (lambda t: (t / "cut.png").write_bytes(_png_bytes(t)[:60]) and t / "cut.png", "cannot read"),
    ],
    ids=["missing", "folder", "text", "3-D", "nan", "strings", "objects", "empty", "npz", "truncated png"],
)
def test_unreadable_images_name_the_file(make, match, tmp_path):
    path = make(tmp_path)
    with pytest.raises(ValueError, match=match) as err:
        load_image(path)
    assert str(path) in str(err.value)


def _png_bytes(tmp_path) -> bytes:
    return _save(tmp_path, "whole.png", np.random.default_rng(2).integers(0, 256, (32, 32), dtype=np.uint8)).read_bytes()


# --- jaxcfl sweep ------------------------------------------------------------------------------

GRID = ["--lr", "1e-3:1e-2:2", "--alpha", "0", "3e2:3e3:2"]  # 2 lr x 3 alpha; alpha = 0 is off the map's log axis
SMALL = ["--kernel-size", "4", "--steps", "60", "--record-points", "10", "--chunk-size", "4"]


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    """A 16 x 16 8-bit grey PNG (a smooth pattern plus noise) and its grey values."""
    folder = tmp_path_factory.mktemp("picture")
    m, n = np.indices((16, 16))
    grey = np.clip(128 + 100 * np.sin(m / 3.0) * np.cos(n / 5.0) + np.random.default_rng(3).normal(0, 10, (16, 16)), 0, 255)
    grey = grey.astype(np.uint8)
    path = _save(folder, "picture.png", grey)
    return path, grey / 255.0


@pytest.fixture(scope="module")
def swept(picture, tmp_path_factory):
    """``jaxcfl sweep --json`` on the picture into a fresh --out, run twice: both payloads, the folder, and the
    chunk files' (inode, mtime) after each run."""
    out = tmp_path_factory.mktemp("sweep") / "out"
    argv = ["sweep", "--image", str(picture[0]), *SMALL, *GRID, "--out", str(out), "--json"]
    payloads, stamps, errs = [], [], []
    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a rerun that finds a chunk damaged warns: none may
            payloads.append(_json_of(argv, errs))
        stamps.append({p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "sweep").glob("chunk_*.npz")})
    written = strict_json.loads((out / "sweep.json").read_text())
    return {"first": payloads[0], "second": payloads[1], "written": written, "out": out, "stamps": stamps, "errs": errs,
            "argv": argv}


def _json_of(argv, errs):
    """The strict JSON that ``jaxcfl ARGV`` prints (capsys is function-scoped: captured by hand)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        assert cli.main(argv) == 0
    errs.append(stderr.getvalue())
    return strict_json.loads(stdout.getvalue())


def test_sweep_runs_the_grid_on_the_picture_as_the_library_does(swept, picture):
    payload = swept["first"]
    spec = payload["spec"]
    assert spec["lr"] == [1e-3, 1e-2] and spec["alpha"] == [0.0, 300.0, 3000.0]
    assert payload["image"]["shape"] == [16, 16] and payload["image"]["source"].endswith("picture.png")
    assert sum(payload["counts"].values()) == 6 == len(payload["runs"])
    direct = jaxcfl.sweep(picture[1], 4, [1e-3, 1e-2], [0.0, 300.0, 3000.0], steps=60, record_points=10, chunk_size=4,
                          key=jax.random.key(0), progress=False)
    assert payload["status"] == direct.status.tolist()
    assert spec["image"] == direct.spec.image  # the same image, bit for bit: the grey values v / 255
    assert [r["final_loss"] for r in payload["runs"]] == [r["final_loss"] for r in direct.rows()]
    assert len(set(payload["status"][0] + payload["status"][1])) >= 2  # the grid crosses a boundary
    # The windowed theory at each lr is the library's.
    lo, hi = jaxcfl.pde._theory.windowed_alpha_bounds(picture[1], 4, 1e-2)
    assert payload["theory"]["windowed"]["alpha_min"][1] == pytest.approx(lo)
    assert payload["theory"]["windowed"]["alpha_max"][1] == pytest.approx(hi)
    assert 0 <= payload["theory"]["agree"] <= 6


def test_sweep_writes_the_map_the_csv_and_the_json(swept):
    out, payload = swept["out"], swept["first"]
    assert (out / "stability_map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (out / "sweep.csv").read_text().splitlines()
    assert lines[0].startswith("lr,alpha,status,") and len(lines) == 7
    printed = {k: v for k, v in swept["second"].items() if k != "non_finite"}  # stdout also says where values were NaN
    assert swept["written"] == printed
    assert set(payload["files"]) == {"png", "csv", "sweep", "json"}
    assert any("alpha = 0" in note for note in payload["notes"])  # left off the log axis, said so
    from jaxcfl.experiments import image_sweep

    declared = image_sweep.Options(lr=(1e-3,), alpha=(1.0,)).settings()
    assert list(payload["settings"]) == list(declared)  # the settings are the declared options
    assert payload["settings"]["lr"] == payload["spec"]["lr"] and payload["settings"]["seed"] == payload["seed"]


def test_a_rerun_reuses_every_chunk_and_gives_the_same_result(swept):
    first, second = swept["first"], swept["second"]
    assert first["chunks"] == 2 and first["chunks_on_disk"] == 0
    assert second["chunks_on_disk"] == second["chunks"] == 2
    assert "2 found in" in swept["errs"][1]
    assert swept["stamps"][0] == swept["stamps"][1]  # the chunk files were read, not written again
    assert second["runs"] == first["runs"] and second["status"] == first["status"]



def test_a_damaged_chunk_is_recomputed_and_not_counted_as_reused(swept, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(swept["out"], out)
    chunk = sorted((out / "sweep").glob("chunk_*.npz"))[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 1
    chunk.write_bytes(bytes(data))
    argv = [str(out) if a == str(swept["out"]) else a for a in swept["argv"] if a != "--json"]
    with pytest.warns(UserWarning, match="corrupt"):
        code, printed, _ = _run([*argv, "--no-progress"], capsys)
    assert code == 0
    assert "1 of 2 chunk(s) reused" in printed and "2 of 2" not in printed

def test_another_sweep_in_the_same_out_is_refused(swept, capsys):
    argv = [a if a != "3e2:3e3:2" else "3e2:3e3:3" for a in swept["argv"]]
    message = _fails(argv, capsys)
    assert "--out" in message and "alpha" in message


def test_sweep_prints_a_map_beside_the_theory(swept, capsys):
    argv = [a for a in swept["argv"] if a != "--json"]  # the same sweep: its chunks are reused
    code, out, err = _run([*argv, "--no-progress"], capsys)
    assert code == 0 and "[sweep]" in err
    lines = out.splitlines()
    assert "picture.png (16 x 16" in lines[0] and "6 runs" in lines[1]
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["lr", "map"])
    assert lines[header].split()[2:] == ["win", "a_min", "win", "a_max", "paper", "a_min", "paper", "a_max"]
    rows = [line.split() for line in lines[header + 2: header + 4]]
    assert [float(r[0]) for r in rows] == [1e-3, 1e-2]
    letters = {"stable": "S", "restrained": "R", "divergent": "D"}
    predicted = swept["first"]["theory"]["predicted_stable"]
    for row, status, theory in zip(rows, swept["first"]["status"], predicted):
        # upper case where the windowed theory agrees (stable iff a_min < alpha < a_max), lower case where not
        assert row[1] == "".join(letters[s] if (s == "stable") == p else letters[s].lower() for s, p in zip(status, theory))
    assert f"agrees with {swept['first']['theory']['agree']} of 6 runs" in out
    assert "stability_map.png" in out and "2 of 2 chunk(s) reused" in out


def test_sweep_help_runs_as_a_command():
    out = subprocess.run([sys.executable, "-m", "jaxcfl.cli", "sweep", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for text in ("--lr GRID", "--alpha GRID", "--compare-k", "--operator", "--out DIR", "--json",
                 "START:STOP:N", "lin:START:STOP:N", "ITU-R", "65535"):
        assert text in out, text
    for scheme in jaxcfl.SCHEMES:  # the choices come from the library
        assert scheme in out


# --- jaxcfl bounds -----------------------------------------------------------------------------

def test_bounds_prints_the_library_s_bounds(picture, capsys, tmp_path):
    # 12 steps (jaxcfl._core.classify.MIN_STEPS): the screening runs are the full runs, one compiled program.
    argv = ["bounds", "--image", str(picture[0]), "--kernel-size", "4", "--lr", "1e-2", "--steps", "12",
            "--alpha-range", "1:1e6", "--rtol", "1e-2"]
    code, out, _ = _run([*argv, "--json", "--out", str(tmp_path / "b")], capsys)
    (row,) = strict_json.loads(out)["rows"]
    found = jaxcfl.empirical_bounds(picture[1], 4, 1e-2, steps=12, alpha_range=(1.0, 1e6), rtol=1e-2,
                                    key=jax.random.key(0), progress=False)
    assert (row["empirical_alpha_min"], row["empirical_alpha_max"]) == (found.alpha_min, found.alpha_max)
    assert (row["windowed_alpha_min"], row["windowed_alpha_max"]) == pytest.approx(found.windowed)
    assert (row["paper_alpha_min"], row["paper_alpha_max"]) == pytest.approx(found.paper)
    assert row["empirical_alpha_max"] == pytest.approx(row["windowed_alpha_max"], rel=0.01)
    assert (tmp_path / "b" / "bounds.csv").exists() and (tmp_path / "b" / "bounds.json").exists()
    # The text is reproduce table5's table; a rerun reuses the row.
    code, out, err = _run([*argv, "--out", str(tmp_path / "b")], capsys)
    assert code == 0 and "reusing" in err
    from jaxcfl.experiments.table5 import bounds_table

    assert bounds_table([row]).splitlines()[0] in out
    assert f"{found.alpha_max:.4g}" in out


def test_bounds_points_at_a_stable_range_the_search_missed():
    from jaxcfl.experiments.image_bounds import _hint

    row = {"empirical_alpha_min": None, "windowed_alpha_min": 1881.2, "windowed_alpha_max": 2000.0}
    (hint,) = _hint(row)
    assert "(1881, 2000)" in hint and "--alpha-range 941:4e+03" in hint
    assert _hint({**row, "windowed_alpha_min": 2859.0}) == []  # no stable range: nothing to point at
    assert _hint({**row, "empirical_alpha_min": 1880.0}) == []  # found


# --- the same image through the other entry points ---------------------------------------------

def test_the_python_run_without_a_folder_writes_nothing(swept, picture):
    from jaxcfl.experiments import image_sweep

    payload = image_sweep.run(picture[1], [1e-3, 1e-2], [0.0, 300.0, 3000.0], kernel_size=4, steps=60, record_points=10,
                              chunk_size=4, progress=False, log=lambda line: None)
    assert payload["files"] == {} and payload["status"] == swept["first"]["status"]
    assert payload["image"]["fingerprint"] == swept["first"]["image"]["fingerprint"]  # v / 255 either way


def test_theory_reads_the_picture_too(swept, picture, capsys):
    _, out, _ = _run(["theory", "--image", str(picture[0]), "--kernel-size", "4", "--scheme", "gd", "--lr", "1e-2",
                         "--json"], capsys)
    (row,) = strict_json.loads(out)["rows"]
    windowed = swept["first"]["theory"]["windowed"]
    assert (row["windowed_alpha_min"], row["windowed_alpha_max"]) == pytest.approx(
        (windowed["alpha_min"][1], windowed["alpha_max"][1]))
