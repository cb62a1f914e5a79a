"""Nothing silently wrong in the library's newer surfaces (docs/reliability.md), replayed case by case.

* hangs: the distributed start-up refuses a malformed address at once, says what it waits for,
  and gives up after ``JAXCFL_STARTUP_TIMEOUT`` with one line (fault tests in subprocesses);
* the guard fails closed: a non-finite estimate keeps the last finite limit (or refuses the
  step), a schedule's negative lr is refused, and the state counts both;
* silently inaccurate: ``empirical_bounds`` reports the precision it achieved and warns when
  its runs are too short for ``rtol``;
* unclear errors: impossible sizes are refused with the memory estimate before anything is
  allocated; ragged tables, text and bad levels are refused naming the argument;
* silent oddities: a spread of one value is undefined (``None``), and comparing it is
  "undetermined", not "same size".
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcfl
from jaxcfl._core import distributed
from jaxcfl._core import statistics as st
from jaxcfl._core import validate as v
from jaxcfl._core.images import load_image
from jaxcfl.nn._guard import cfl_guard, guard_problems, refresh_due
from jaxcfl.pde._bounds import _achieved

RAGGED = [[1.0, 2.0], [3.0]]
HUGE = 10**6  # a 10^6 x 10^6 anything is terabytes


def _npy_header_only(path, shape, descr="<f8"):
    """A .npy file whose header claims ``shape`` and that holds no data."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": shape})
    return path


# --- refused at once, naming what to fix (table) ---------------------------------------------------

REFUSED = [
    # impossible sizes: the estimate, before any allocation
    ("checkerboard 1e6", lambda tmp: jaxcfl.checkerboard(HUGE), ValueError, r"^n: .*needs about 3\.64 TiB"),
    ("load_image checkerboard 1e6", lambda tmp: load_image("checkerboard", size=HUGE), ValueError,
     r"^size: .*needs about .* TiB"),
    ("npy header 1e5 x 1e5", lambda tmp: load_image(_npy_header_only(tmp / "big.npy", (100_000, 100_000))),
     ValueError, r"^source: .*100000 x 100000 float64.*needs about 74\.5 GiB"),
    ("npy header truncated", lambda tmp: load_image(_npy_header_only(tmp / "short.npy", (4, 4))), ValueError,
     r"truncated: its header claims a 4 x 4 float64 array \(128 bytes\), but the file holds 0 bytes"),
    ("sweep 1e6 x 1e6 grid", lambda tmp: jaxcfl.sweep(np.ones((4, 4)), 2, np.geomspace(1e-4, 1e-2, HUGE),
                                                       np.geomspace(1.0, 10.0, HUGE), steps=20, progress=False),
     ValueError, r"^lr x alpha: a sweep of 1000000 x 1000000 configurations .*needs about .*PiB"),
    ("bootstrap 1e12 resamples", lambda tmp: st.bootstrap_spread(np.ones((3, 3)), 0, resamples=10**12), ValueError,
     r"^resamples: .*needs about"),
    # statistics: ragged tables, text, scalar or bad levels, bad axes
    ("spread ragged", lambda tmp: st.spread(RAGGED, 0), ValueError, r"^table must be a rectangular array"),
    ("bootstrap ragged", lambda tmp: st.bootstrap_spread(RAGGED, 1), ValueError, r"^table must be a rectangular"),
    ("spread text", lambda tmp: st.spread([["a", "b"]], 0), TypeError, r"^table must hold real numbers"),
    ("spread axis True", lambda tmp: st.spread(np.ones((2, 2)), True), ValueError, r"^axis must be 0 or 1"),
    ("bootstrap level text", lambda tmp: st.bootstrap_spread(np.ones((2, 2)), 0, level="high"), ValueError,
     r"^level must be a number in \(0, 1\)"),
    ("bootstrap level list", lambda tmp: st.bootstrap_spread(np.ones((2, 2)), 0, level=[0.9, 0.95]), ValueError,
     r"^level must be a number"),
    ("compare non-interval", lambda tmp: st.compare_spreads(0.1, 0.2), ValueError, r"^perturbation must be an Interval"),
    ("std_interval ragged", lambda tmp: st.std_interval(RAGGED), ValueError, r"^values must be a rectangular"),
    ("churn ragged", lambda tmp: st.churn([1, 2], [[1], [2, 3]]), ValueError, r"^b must be a rectangular"),
    ("pairwise_churn ragged", lambda tmp: st.pairwise_churn([[[1, 2]], [[1]]], 0), ValueError,
     r"^predictions must be a rectangular array \(k, seeds, examples\)"),
    ("divergence_curve ragged", lambda tmp: st.divergence_curve(RAGGED, RAGGED), ValueError, r"^a must be a rectangular"),
    ("log_slope ragged", lambda tmp: st.log_slope([1, 2, 3], [[1], [2, 3]]), ValueError, r"^y must be a rectangular"),
    ("log_slope cap text", lambda tmp: st.log_slope([1, 2, 3], [1, 2, 3], cap="none"), ValueError, r"^cap must be"),
    ("first_crossing ragged", lambda tmp: st.first_crossing(RAGGED, [0.5]), ValueError, r"^curve must be a rectangular"),
    ("first_crossing text levels", lambda tmp: st.first_crossing([1.0, 2.0], ["a"]), TypeError,
     r"^levels must hold real numbers"),
    ("first_crossing NaN level", lambda tmp: st.first_crossing([1.0, 2.0], [float("nan")]), ValueError,
     r"^levels must be finite"),
    ("divergence_summary ragged levels", lambda tmp: st.divergence_summary([1e-5, 1e-4], levels=RAGGED), ValueError,
     r"^levels must be a rectangular"),
    ("pairwise_correlation ragged", lambda tmp: st.pairwise_correlation(RAGGED), ValueError, r"^outputs must be a"),
    ("pairwise_disagreement ragged", lambda tmp: st.pairwise_disagreement([[1, 2], [3]]), ValueError,
     r"^predictions must be a rectangular"),
    ("ensemble_gain ragged labels", lambda tmp: st.ensemble_gain(np.zeros((2, 2, 3)), [[0], [1, 2]]), ValueError,
     r"^labels must be a rectangular"),
    ("amplification text", lambda tmp: st.amplification(["a", "b"]), TypeError, r"^curve must hold real numbers"),
    # the guard's schedule
    ("refresh_due every 0", lambda tmp: refresh_due(5, 0), ValueError, r"every must be an integer >= 1, got 0"),
    ("refresh_due step -1", lambda tmp: refresh_due(-1, 3), ValueError, r"step must be an integer >= 0"),
    ("refresh_due step 2.5", lambda tmp: refresh_due(2.5, 3), ValueError, r"step must be an integer >= 0"),
    ("cfl_guard every 1e30", lambda tmp: cfl_guard(0.1, every=10**30), ValueError, r"^every must be an integer in"),
    ("cfl_guard key 5", lambda tmp: cfl_guard(0.1, key=5), TypeError, r"^key must be one PRNG key"),
    # the distributed start-up, before anything waits
    ("address garbage", lambda tmp: distributed.check_coordinator_address("garbage"), ValueError,
     r"^JAX_COORDINATOR_ADDRESS='garbage' is not host:port"),
    ("address garbage:notaport", lambda tmp: distributed.check_coordinator_address("garbage:notaport"), ValueError,
     r"the port 'notaport' must be a number in 1-65535"),
    ("address port 0", lambda tmp: distributed.check_coordinator_address("127.0.0.1:0"), ValueError, r"port '0'"),
    ("address port 70000", lambda tmp: distributed.check_coordinator_address("127.0.0.1:70000"), ValueError,
     r"port '70000'"),
    ("address no host", lambda tmp: distributed.check_coordinator_address(":1234"), ValueError, r"not host:port"),
    ("address unknown host", lambda tmp: distributed.check_coordinator_address("no-such-host.invalid:1234"),
     ValueError, r"cannot be resolved"),
    ("timeout text", lambda tmp: distributed.startup_timeout("soon"), ValueError, r"^timeout='soon'"),
    ("timeout 0", lambda tmp: distributed.startup_timeout(0), ValueError, r"must be a number of seconds > 0"),
    ("timeout env NaN", lambda tmp: distributed.startup_timeout(environ={"JAXCFL_STARTUP_TIMEOUT": "nan"}), ValueError,
     r"^JAXCFL_STARTUP_TIMEOUT='nan'"),
    ("env garbage:notaport", lambda tmp: distributed.initialize_from_env(
        {"JAXCFL_NUM_PROCESSES": "2", "JAXCFL_PROCESS_ID": "1", "JAX_COORDINATOR_ADDRESS": "garbage:notaport"}),
     ValueError, r"^JAX_COORDINATOR_ADDRESS='garbage:notaport'"),
    ("env no address", lambda tmp: distributed.initialize_from_env({"JAXCFL_NUM_PROCESSES": "2", "JAXCFL_PROCESS_ID": "0"}),
     ValueError, r"needs JAX_COORDINATOR_ADDRESS=host:port"),
    ("env process id out of range", lambda tmp: distributed.initialize_from_env(
        {"JAXCFL_NUM_PROCESSES": "2", "JAXCFL_PROCESS_ID": "2", "JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234"}),
     ValueError, r"^JAXCFL_PROCESS_ID=2 must lie in \[0, 1\]"),
    ("env zero processes", lambda tmp: distributed.initialize_from_env(
        {"JAXCFL_NUM_PROCESSES": "0", "JAXCFL_PROCESS_ID": "0", "JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234"}),
     ValueError, r"^JAXCFL_NUM_PROCESSES=0"),
    ("env bad timeout", lambda tmp: distributed.initialize_from_env(
        {"JAXCFL_NUM_PROCESSES": "2", "JAXCFL_PROCESS_ID": "0", "JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234",
         "JAXCFL_STARTUP_TIMEOUT": "-5"}), ValueError, r"^JAXCFL_STARTUP_TIMEOUT='-5'"),
    # an all-black image has no stability bound to find
    ("bounds on a black image", lambda tmp: jaxcfl.empirical_bounds(np.zeros((8, 8)), 4, 1e-3, steps=50, progress=False),
     ValueError, r"^image is all zeros"),
]


@pytest.mark.parametrize("call, error, match", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused_at_once_naming_what_to_fix(call, error, match, tmp_path):
    start = time.perf_counter()
    with pytest.raises(error, match=match) as info:
        call(tmp_path)
    assert "\n" not in str(info.value)  # one line
    assert time.perf_counter() - start < 10  # before any expensive work (no allocation, no wait)
    assert not jax.distributed.is_initialized()


def test_the_memory_check_and_its_units():
    assert v.format_bytes(8e12) == "7.28 TiB" and v.format_bytes(512) == "512 B" and v.format_bytes(3 * 2**30) == "3 GiB"
    assert v.check_memory("n", 100, "a small array", limit=1000) == 100
    with pytest.raises(ValueError, match=r"^n: a big array needs about 1\.95 KiB of memory, more than the 1000 B"):
        v.check_memory("n", 2000, "a big array", limit=1000)
    machine = v.machine_memory()
    assert machine is None or machine > 2**26


def test_a_picture_larger_than_memory_is_refused_from_its_header(tmp_path, monkeypatch):
    from PIL import Image

    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "rgb.png")
    assert load_image(tmp_path / "rgb.png").shape == (20, 30)
    monkeypatch.setattr(v, "machine_memory", lambda: 4096)  # a machine of 4 KiB
    with pytest.raises(ValueError, match=r"^source: .*a 30 x 20 RGB picture.*needs about 23\.4 KiB of memory, more "
                                         r"than the 4 KiB this machine has; give a smaller image"):
        load_image(tmp_path / "rgb.png")


def test_images_that_fit_still_load(tmp_path):
    np.save(tmp_path / "f32.npy", np.arange(12, dtype=np.float32).reshape(3, 4))
    image = load_image(tmp_path / "f32.npy")
    assert image.dtype == np.float64 and image.shape == (3, 4) and image[2, 3] == 11.0
    assert load_image("checkerboard", size=4).shape == (4, 4)


# --- undefined spreads (silent oddities) -----------------------------------------------------------

ONE_PER_GROUP = [
    ("one seed", np.array([[0.5], [0.6], [0.7]]), 1),
    ("one k", np.array([[0.5, 0.6, 0.7]]), 0),
    ("1 x 1", np.array([[0.5]]), 1),
    ("1 x 1 other axis", np.array([[0.5]]), 0),
]


@pytest.mark.parametrize("table, axis", [c[1:] for c in ONE_PER_GROUP], ids=[c[0] for c in ONE_PER_GROUP])
def test_a_spread_of_one_value_is_undefined_not_zero(table, axis):
    assert st.spread(table, axis) is None
    iv = st.bootstrap_spread(table, axis, resamples=50)
    assert not iv.defined and iv.estimate is None and iv.low is None and iv.high is None
    assert str(iv) == "undefined (one value per group)"
    assert json.loads(json.dumps(iv.to_dict(), allow_nan=False))["std"] is None
    other = st.bootstrap_spread(np.array([[0.1, 0.9, 0.5], [0.2, 0.8, 0.4]]), 1, resamples=50)
    assert other.defined
    assert st.compare_spreads(iv, other) == st.UNDETERMINED == st.compare_spreads(other, iv)
    assert st.verdict_sentence("k vs seed", iv, other, "points").startswith("k vs seed: undetermined (std undefined vs ")


def test_two_equal_values_are_a_measured_zero_spread():
    iv = st.bootstrap_spread(np.array([[0.5, 0.5], [0.25, 0.25]]), 1, resamples=50)
    assert iv.defined and iv.estimate == 0.0 and st.spread([[0.5, 0.5]], 1) == 0.0


def test_tables_of_any_real_dtype_are_accepted():
    table = np.array([[1.0, 3.0], [2.0, 2.0]])
    for dtype in (np.float32, np.int64, jnp.bfloat16):
        assert st.spread(jnp.asarray(table, dtype) if dtype is jnp.bfloat16 else table.astype(dtype), 1) == 0.5


def test_scalar_levels_are_one_level():
    assert st.first_crossing([0.1, 0.2, 0.3], 0.15) == {0.15: 2}
    assert st.divergence_summary([1e-5, 1e-4, 1e-3], levels=1e-4).first_step == {1e-4: 3}


# --- the guard fails closed ------------------------------------------------------------------------

SPECTRUM = jnp.array([10.0, 1.0])


def _loss(p):
    return 0.5 * jnp.sum(SPECTRUM * p["w"] ** 2)


def _nan_loss(p):
    return _loss(p) * jnp.nan


def _step(opt, value_fns):
    """One jitted guard update per ``value_fn`` in turn, from ``w = 1``, each a refresh (chosen on the host:
    no branch to compile); returns the updates and state of each."""
    params = {"w": jnp.ones(2)}
    state, out = opt.init(params), []
    for i, fn in enumerate(value_fns):
        step = jax.jit(lambda p, s, fn=fn, i=i: opt.update(jax.grad(_loss)(p), s, p, value_fn=fn,
                                                           refresh="first" if i == 0 else True))
        u, state = step(params, state)
        out.append((np.asarray(u["w"]), state))
    return out


def test_a_nan_estimate_keeps_the_last_finite_limit():
    (_, first), (update, state) = _step(cfl_guard(1.0, every=1, iterations=2, first_iterations=2), [_loss, _nan_loss])
    assert float(first.lambda_max) == pytest.approx(10.0, rel=1e-4)
    assert float(state.lambda_max) == float(first.lambda_max)  # kept, not NaN
    assert float(state.lr) == pytest.approx(0.9 * 2 / 10.0, rel=1e-4)  # still capped
    np.testing.assert_allclose(update, float(state.lr) * np.asarray(SPECTRUM), rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(state.vector)))  # the warm start stays finite too
    assert (int(state.failed_estimates), int(state.refused_steps), int(state.bad_lr)) == (1, 0, 0)
    assert "non-finite estimate" in guard_problems(state)[0]


def test_a_nan_first_estimate_refuses_the_step():
    ((update, state),) = _step(cfl_guard(1.0, every=1, iterations=2, first_iterations=2), [_nan_loss])
    assert np.all(update == 0) and float(state.lr) == 0.0
    assert (int(state.failed_estimates), int(state.refused_steps)) == (1, 1)
    assert any("no finite lambda_max" in p for p in guard_problems(state))


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("-inf")], ids=["negative", "nan", "-inf"])
def test_a_schedules_bad_lr_is_refused(bad):
    ((update, state),) = _step(cfl_guard(lambda count: bad, iterations=2, first_iterations=2), [_loss])
    assert np.all(update == 0) and float(state.lr) == 0.0
    assert (int(state.bad_lr), int(state.refused_steps)) == (1, 1)
    assert "negative or non-finite learning rate" in guard_problems(state)[0]


def test_a_healthy_guard_reports_nothing_and_an_eager_step_warns():
    ((update, state),) = _step(cfl_guard(0.01, iterations=2, first_iterations=2), [_loss])
    assert guard_problems(state) == [] and np.all(update != 0)
    opt = cfl_guard(lambda count: -1.0, iterations=2, first_iterations=2)
    params = {"w": jnp.ones(2)}
    with pytest.warns(RuntimeWarning, match="negative or not finite; the step is refused"):
        opt.update(jax.grad(_loss)(params), opt.init(params), params, value_fn=_loss, refresh="first")


# --- bounds: the precision achieved ------------------------------------------------------------------

ACHIEVED = [
    # (alpha_min, alpha_max, exact, rtol) -> (achieved_rtol, limited_by_steps)
    ("exact bounds met", 100.05, 2000.0, (100.0, 2000.0), 1e-3, 1e-3, False),
    ("alpha_min 7.6% low", 92.4, 2000.0, (100.0, 2000.0), 1e-3, 0.076, True),
    ("alpha_max 1% high", 100.0, 2020.0, (100.0, 2000.0), 1e-3, 0.01, True),
    ("an end outside the range", float("nan"), 2000.0, (100.0, 2000.0), 1e-3, 1e-3, False),
    ("no exact bound", 92.4, 2000.0, None, 1e-3, None, None),
]


@pytest.mark.parametrize("lo, hi, exact, rtol, achieved, limited", [c[1:] for c in ACHIEVED], ids=[c[0] for c in ACHIEVED])
def test_the_achieved_precision_against_the_exact_bound(lo, hi, exact, rtol, achieved, limited):
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _achieved(lo, hi, exact, rtol, 50, notes)
    assert got[1] is limited and (got[0] is None if achieved is None else got[0] == pytest.approx(achieved))
    assert bool(caught) == bool(limited) == bool(notes)
    if limited:
        assert "raise steps" in notes[0] and "50 steps" in notes[0]


@pytest.mark.slow
def test_too_few_steps_are_reported_not_hidden():
    """The issue's case in small: 50 steps miss a small alpha_min by far more than rtol."""
    n = 16
    y, x = np.mgrid[0:n, 0:n] / n
    with pytest.warns(RuntimeWarning, match=r"alpha_min = .* from the exact windowed bound"):
        res = jaxcfl.empirical_bounds((x + y) / 20, 4, 1e-3, steps=50, screen_steps=50, alpha_range=(1.0, 1e4),
                                      initial_points=16, candidates=7, progress=False)
    assert res.limited_by_steps is True and res.achieved_rtol > 10 * res.rtol
    assert res.achieved_rtol == pytest.approx(max(abs(g) for g in res.gap_windowed if np.isfinite(g)))
    d = res.to_dict()
    assert d["limited_by_steps"] is True and d["achieved_rtol"] == res.achieved_rtol


# --- the start-up never hangs silently (fault tests, in subprocesses) --------------------------------

JOIN = "import sys; from jaxcfl.cli import main; sys.exit(main(sys.argv[1:]))"
"""The command line, started the way a user starts it (``jaxcfl theory ...``)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(process_id: int, address: str, timeout: str | None = "2", limit: float = 15.0):
    env = {k: val for k, val in os.environ.items() if not k.startswith(("JAXCFL_", "JAX_COORDINATOR"))}
    env.update(JAXCFL_NUM_PROCESSES="2", JAXCFL_PROCESS_ID=str(process_id), JAX_COORDINATOR_ADDRESS=address,
               JAX_PLATFORMS="cpu")
    if timeout is not None:
        env["JAXCFL_STARTUP_TIMEOUT"] = timeout
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", JOIN, "theory", "--kernel-size", "4", "--size", "16"], env=env,
                          capture_output=True, text=True, timeout=limit)
    return done, time.perf_counter() - start


def test_a_malformed_address_fails_at_once():
    done, seconds = _launch(1, "garbage:notaport", timeout=None)  # the default timeout: no wait at all
    assert done.returncode == 2 and seconds < 15
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert lines[0].startswith("jaxcfl: error: JAX_COORDINATOR_ADDRESS='garbage:notaport'")
    assert done.stdout == ""


@pytest.mark.parametrize("process_id", [0, pytest.param(1, marks=pytest.mark.slow)],
                         ids=["process 0 without its peer", "process 1 without a coordinator"])
def test_a_missing_peer_times_out_with_one_line(process_id):
    address = f"127.0.0.1:{_free_port()}"
    done, seconds = _launch(process_id, address, timeout="2")
    assert done.returncode == distributed.STARTUP_TIMEOUT_STATUS and seconds < 15
    lines = [line for line in done.stderr.splitlines() if line.startswith("jaxcfl:")]
    assert len(lines) == 2 and "Traceback" not in done.stderr and "Check failure" not in done.stderr
    waiting, error = lines
    assert f"process {process_id} of 2" in waiting and address in waiting and "all 2 processes" in waiting
    assert "JAXCFL_STARTUP_TIMEOUT" in waiting
    assert error.startswith("jaxcfl: error: ") and "within 2 s" in error and "JAXCFL_STARTUP_TIMEOUT" in error
    assert "JAX_COORDINATOR_ADDRESS" in error


# --- failing closed: a refused step is zero, a bad estimate keeps the last good one -----------------

@pytest.mark.parametrize("case", ["nan lr", "nan estimate"])
def test_a_refused_step_is_exactly_zero_even_when_the_update_is_nan(case):
    """The update before the guard is already scaled by the (bad) lr, or holds a NaN gradient:
    refusing it must give zeros, not NaN * 0."""
    import optax

    nan_lr = lambda count: jnp.asarray(jnp.nan)
    lr = nan_lr if case == "nan lr" else 0.1
    tx = optax.chain(optax.sgd(lr), cfl_guard(lr, every=1, iterations=2, first_iterations=2))
    params = jnp.ones(3)
    value_fn = (lambda p: jnp.sum(p ** 2)) if case == "nan lr" else (lambda p: jnp.nan * jnp.sum(p ** 2))
    grads = jnp.full(3, 2.0) if case == "nan lr" else jnp.full(3, jnp.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        updates, state = tx.update(grads, tx.init(params), params, value_fn=value_fn)
    np.testing.assert_array_equal(updates, np.zeros(3))
    assert guard_problems(state[1])


def test_a_first_manifest_write_killed_midway_leaves_a_usable_folder(tmp_path):
    from jaxcfl._core.folder import LOCK, ResultFolder

    (tmp_path / LOCK).write_text("123\n")
    (tmp_path / ".manifest.json.abc123.partial").write_text("{")
    with ResultFolder(tmp_path, kind="test", settings={"a": 1}) as folder:
        folder.commit("x", b"1")
    assert not list(tmp_path.glob("*.partial"))
    with ResultFolder(tmp_path, kind="test", settings={"a": 1}) as folder:
        assert folder.read("x") == (b"1", "ok")


def test_the_pde_guard_keeps_its_last_finite_estimate():
    """A refresh at a kernel where the gradient is NaN keeps lambda and its direction, so the step
    stays capped (forward Euler's 2 safety / lambda), not the nominal dt."""
    from jaxcfl.pde._controllers import estimate_curvature
    from jaxcfl.pde._state import init

    state = init(jnp.ones((2, 2)))
    state = state.__class__(**{**state.__dict__, "curvature": jnp.asarray(4.0), "direction": jnp.ones(4) / 2})
    hyper = jaxcfl.make_hyper(0.1, 1.0)
    kept = estimate_curvature(state, lambda k, h: jnp.nan * k, hyper, iterations=3)
    assert float(kept.curvature) == 4.0
    np.testing.assert_array_equal(kept.direction, state.direction)
    fresh = estimate_curvature(state, lambda k, h: 3.0 * k, hyper, iterations=3)
    assert float(fresh.curvature) == pytest.approx(3.0, rel=1e-4)
