"""Multi-process runs on jax.distributed: 2 local CPU processes x 2 forced host devices each.

The processes are started here (a coordinator on 127.0.0.1), each through
``jaxcfl._core.distributed.initialize_from_env`` as the CLI does; every launch is bounded by a
timeout, and a process left behind is killed. One launch dies (SIGKILL of process 0 after
the first committed chunk); the next resumes it. The single-process references run in
this test process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import jaxcfl
from jaxcfl._core import distributed as distributed
HERE = Path(__file__).resolve().parent
IMAGE_SIZE, KERNEL = 16, 4
SWEEP = {"lr": [1e-3, 5e-4], "alpha": np.geomspace(100.0, 1e4, 6).tolist(), "steps": 80, "chunk_size": 4, "compare_k": 3.0}
"""12 configurations in 3 chunks: one configuration per device and chunk on the 4-device global mesh."""
BOUNDS = {"lr": 1e-3, "steps": 80, "screen_steps": 80, "alpha_range": (100.0, 1e4), "initial_points": 8, "candidates": 3,
          "rtol": 1e-2}
"""One run length (no screening): one compiled program."""
VARIANCE = {"epochs": 1, "ks": (1.0,), "seeds": (1, 2), "train_size": 64, "test_size": 32, "batch_size": 32,
            "resamples": 20, "trace_params": 0}
"""The tiny grid: one copy, two steps per seed, one seed per process."""
VARIANCE_SLOW = {"epochs": 2, "ks": (1.0, 2.0, 3.0), "seeds": (1, 2, 3), "train_size": 128, "test_size": 64,
                 "batch_size": 64, "resamples": 50, "trace_params": 64}
"""Three seeds: process 0 trains two of them (seeds 1 and 3), process 1 one."""
TABLE5 = ["--kernel-size", "4", "--size", "16", "--steps", "60", "--rtol", "1e-2"]
"""Both schemes' bounds and the stability map (a 6 x 16 sweep)."""
LAUNCH_TIMEOUT = 240


# --- the runs, as the worker processes and the reference run them ----------------------------------

def run_sweep(out: str | None = None) -> dict:
    res = jaxcfl.sweep(np.asarray(jaxcfl.checkerboard(IMAGE_SIZE)), KERNEL, out=out, progress=False, **SWEEP)
    return {"status": res.status.tolist(), "norm": res.metrics["final_norm"].tolist(),
            "div": res.metrics["divergence"].tolist()}


def run_mismatch(out: str) -> dict:
    """A different sweep on a sweep's folder: process 0 refuses it, and so does every process."""
    try:
        jaxcfl.sweep(np.asarray(jaxcfl.checkerboard(IMAGE_SIZE)), KERNEL, out=out, progress=False,
                     **{**SWEEP, "steps": SWEEP["steps"] + 20})
    except Exception as err:  # noqa: BLE001 - the error is the result
        return {"error": type(err).__name__, "message": str(err)}
    return {"error": None}


def run_bounds() -> dict:
    b = jaxcfl.empirical_bounds(np.asarray(jaxcfl.checkerboard(IMAGE_SIZE)), KERNEL, theory=False, progress=False, **BOUNDS)
    return {"alpha_min": b.alpha_min, "alpha_max": b.alpha_max, "evaluations": b.evaluations}


def run_table5(out: str) -> dict:
    """``jaxcfl reproduce table5`` at a toy size, through the CLI (which calls ``initialize_from_env`` again)."""
    import contextlib
    import io

    from jaxcfl import cli
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        status = cli.main(["reproduce", "table5", *TABLE5, "--out", out, "--json"])
    return {"status": status, "stdout": stdout.getvalue()}


def run_variance(out: str | None = None, slow: bool = False) -> dict:
    from jaxcfl.experiments import variance

    payload = variance.run(out=out, log=lambda message: None, progress=False, **(VARIANCE_SLOW if slow else VARIANCE))
    return {key: payload[key] for key in ("runs", "fingerprints", "std_over_k", "std_over_seeds", "files")}


WORKER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    start = time.perf_counter()
    spec = json.loads(sys.argv[1])
    sys.path.insert(0, spec["tests"])
    from jaxcfl._core import distributed as distributed
    assert distributed.initialize_from_env()
    import jax
    assert jax.process_count() == 2 and len(jax.devices()) == 4 and len(jax.local_devices()) == 2, jax.devices()
    from jaxcfl.pde import _sweeps as sweeps
    from jaxcfl._core.folder import ResultFolder
    import test_distributed as cases

    writes, batches = [], [0]
    replace = os.replace
    def recording_replace(src, dst, *args, **kwargs):  # every atomic write ends in os.replace
        writes.append(str(dst))
        return replace(src, dst, *args, **kwargs)
    os.replace = recording_replace
    run_batch = sweeps._run_batch
    def counting_run_batch(*args, **kwargs):
        batches[0] += 1
        return run_batch(*args, **kwargs)
    sweeps._run_batch = counting_run_batch
    if spec.get("kill_after_chunks"):  # process 0 dies like kill -9 once that many chunks are committed
        commit = ResultFolder._commit_here
        def dying_commit(self, name, data):
            out = commit(self, name, data)
            if sum(n.startswith("chunk_") for n in self._files) >= spec["kill_after_chunks"]:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        ResultFolder._commit_here = dying_commit

    result = {"process": jax.process_index(), "tasks": {}, "start_seconds": time.perf_counter() - start}
    for name, kind, out in spec["tasks"]:
        before, written, clock = batches[0], len(writes), time.perf_counter()
        if kind == "sweep":
            value = cases.run_sweep(out)
        elif kind == "bounds":
            value = cases.run_bounds()
        elif kind == "table5":
            value = cases.run_table5(out)
        elif kind == "mismatch":
            value = cases.run_mismatch(out)
        else:
            value = cases.run_variance(out, slow=kind == "variance_slow")
        result["tasks"][name] = dict(value, batches=batches[0] - before, writes=writes[written:],
                                     seconds=time.perf_counter() - clock)
    print("JAXCFL-RESULT " + json.dumps(result), flush=True)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    """``tasks`` (name, kind, out) running in 2 worker processes, started at once; :meth:`results` waits for them.

    Their output goes to files in ``logs`` (a pipe that nobody reads could fill and stall a process).
    """

    def __init__(self, tasks: list[tuple[str, str, str | None]], logs: Path, *, kill_after_chunks: int | None = None):
        self.kill_after_chunks = kill_after_chunks
        port = _free_port()
        spec = json.dumps({"tasks": tasks, "tests": str(HERE), "kill_after_chunks": kill_after_chunks})
        logs.mkdir(parents=True, exist_ok=True)
        self.procs, self.logs = [], []
        for index in range(2):
            # A clean environment, but the suite's compilation cache (tests/conftest.py): a program
            # that the killed launch or this test process compiled loads instead of compiling again.
            env = {k: v for k, v in os.environ.items() if not k.startswith(("JAXCFL_", "JAX_"))
                   or k in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
            env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
                       JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAXCFL_NUM_PROCESSES="2",
                       JAXCFL_PROCESS_ID=str(index))
            out, err = logs / f"process{index}.out", logs / f"process{index}.err"
            with open(out, "w") as stdout, open(err, "w") as stderr:
                self.procs.append(subprocess.Popen([sys.executable, "-c", WORKER, spec], env=env, stdout=stdout,
                                                   stderr=stderr))
            self.logs.append((out, err))

    def results(self, timeout: float = LAUNCH_TIMEOUT) -> list[dict | None]:
        """Each process's result (``None`` for one that died). Bounded: a process still running after
        ``timeout`` seconds (20 s after process 0 died, in a killed launch) is killed."""
        try:
            for index, proc in enumerate(self.procs):
                # A survivor of a dead process 0 may wait in a collective: a short grace, then it is stopped.
                wait = timeout if self.kill_after_chunks is None or index == 0 else 20
                try:
                    proc.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    if self.kill_after_chunks is None:
                        raise AssertionError(f"process {index} still runs after {wait} s:\n"
                                             f"{self.logs[index][1].read_text()[-3000:]}") from None
        finally:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        results = []
        for proc, (out, err) in zip(self.procs, self.logs):
            lines = out.read_text().splitlines()
            assert not [l for l in lines if l.startswith("[Gloo]")]  # native prints go to stderr
            line = next((l for l in lines if l.startswith("JAXCFL-RESULT ")), None)
            if self.kill_after_chunks is None:
                assert proc.returncode == 0 and line is not None, err.read_text()[-3000:]
            results.append(None if line is None else json.loads(line.split(" ", 1)[1]))
        return results


# --- the launches ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Two launches of the sweep: one killed after its first chunk (the single-process reference runs
    here meanwhile); then one that resumes it, runs a sweep, runs it a second time on the same folder,
    and a different sweep there. The variance grid and the bounds launch their own runs (slow tests)."""
    root = tmp_path_factory.mktemp("distributed")
    outs = {name: str(root / name) for name in ("sweep", "killed")}
    killed = Launch([("killed", "sweep", outs["killed"])], root / "logs_killed", kill_after_chunks=1)
    reference = {"sweep": run_sweep()}
    killed_results = killed.results()
    tasks = [("killed", "sweep", outs["killed"]), ("sweep", "sweep", outs["sweep"]), ("sweep_again", "sweep", outs["sweep"]),
             ("mismatch", "mismatch", outs["sweep"])]
    processes = Launch(tasks, root / "logs").results()
    return {"outs": outs, "killed": killed_results, "processes": processes, "reference": reference}


@pytest.fixture(scope="module")
def reference(runs) -> dict:
    """The same runs in this single process (one device)."""
    return runs["reference"]


def _task(runs: dict, name: str) -> list[dict]:
    """Task ``name`` as each process saw it."""
    return [result["tasks"][name] for result in runs["processes"]]


def _check_sweep(got: dict, want: dict) -> None:
    """The 4-device test's comparison (tests/test_sweeps.py): statuses identical, values to its tolerance."""
    assert got["status"] == want["status"]
    np.testing.assert_allclose(np.array(got["norm"], float), np.array(want["norm"], float), rtol=1e-5)
    np.testing.assert_allclose(np.array(got["div"], float), np.array(want["div"], float), rtol=1e-4, atol=5e-6)


def _check_variance(got: dict, want: dict) -> None:
    assert got["fingerprints"] == want["fingerprints"]  # each seed trains in one process, bit for bit as alone
    assert got["runs"] == want["runs"] and got["std_over_k"] == want["std_over_k"]


def test_a_sweep_spans_both_processes_and_matches_one_process(runs, reference):
    for got in _task(runs, "sweep"):
        _check_sweep(got, reference["sweep"])
        assert got["batches"] == 3  # 12 configurations in chunks of 4: every process ran every chunk's program


@pytest.mark.slow
def test_bounds_span_both_processes_and_match_one_process(tmp_path):
    launched = Launch([("bounds", "bounds", None)], tmp_path / "logs")
    want = run_bounds()
    leader, follower = (result["tasks"]["bounds"] for result in launched.results())
    for name in ("alpha_min", "alpha_max"):
        assert leader[name] == pytest.approx(want[name], rel=BOUNDS["rtol"])
    assert np.isfinite([want["alpha_min"], want["alpha_max"]]).all()
    same = lambda task: {k: task[k] for k in ("alpha_min", "alpha_max", "evaluations", "batches")}
    assert same(leader) == same(follower)  # every process took the same bisection steps


@pytest.mark.slow  # the default suite's multi-process runs are the sweep's (its largest fixture)
def test_variance_seeds_are_dealt_out_and_gathered(tmp_path):
    out = str(tmp_path / "variance")
    launched = Launch([("variance", "variance", out), ("variance_again", "variance", out)], tmp_path / "logs")
    want = run_variance()
    tasks = launched.results()
    for result in tasks:
        _check_variance(result["tasks"]["variance"], want)
        _check_variance(result["tasks"]["variance_again"], want)  # a rerun resumes without recomputing
        assert not [w for w in result["tasks"]["variance_again"]["writes"] if "checkpoint" in w]
    _check_seed_folders([result["tasks"]["variance"] for result in tasks], out, VARIANCE["seeds"])


def _check_seed_folders(tasks: list[dict], out: str, seeds, *, figures: tuple[str, ...] = ("variance.png",)) -> None:
    """Process p trained seeds[p::2], each in its own seed folder; process 0 wrote the table and figures once."""
    for index, seed in enumerate(seeds):
        mine = [w for w in tasks[index % 2]["writes"] if Path(w).parent.name == f"seed{seed}"]
        theirs = [w for w in tasks[1 - index % 2]["writes"] if f"seed{seed}" in w]
        assert any(w.endswith("checkpoint.npz") for w in mine) and not theirs
    leader, follower = (t["writes"] for t in tasks)
    assert not [w for w in follower if Path(w).parent == Path(out)]
    for name in ("variance.json", "variance.csv", *figures):
        assert leader.count(os.path.join(out, name)) == 1
        assert (Path(out) / name).stat().st_size > 0


def test_only_process_zero_writes_a_shared_sweep(runs):
    out = runs["outs"]["sweep"]
    leader, follower = (t["writes"] for t in _task(runs, "sweep"))
    assert not [w for w in follower if w.startswith(os.path.join(out, ""))]
    for name in ("result.json", "result.csv", "chunk_00000.npz", "chunk_00001.npz", "chunk_00002.npz"):
        assert leader.count(os.path.join(out, name)) == 1
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["chunk_00000.npz", "chunk_00001.npz", "chunk_00002.npz", "result.csv", "result.json"]


def test_process_zeros_refusal_is_every_processs(runs):
    leader, follower = _task(runs, "mismatch")
    assert leader["error"] == follower["error"] == "FolderMismatch" and "steps" in leader["message"]
    assert leader["message"] == follower["message"] and not leader["writes"] + follower["writes"]


def test_a_rerun_resumes_without_recomputing(runs, reference):
    for got in _task(runs, "sweep_again"):
        _check_sweep(got, reference["sweep"])
        assert got["batches"] == 0 and not [w for w in got["writes"] if "chunk_" in w]


def test_a_killed_sweep_resumes(runs, reference):
    assert runs["killed"] == [None, None]  # process 0 died after its first chunk; the other was stopped
    for got in _task(runs, "killed"):
        _check_sweep(got, reference["sweep"])
        assert got["batches"] == 2  # chunk 0 was reused
    written = [Path(w).name for w in _task(runs, "killed")[0]["writes"]]
    assert "chunk_00000.npz" not in written and {"chunk_00001.npz", "chunk_00002.npz"} <= set(written)


@pytest.mark.slow
def test_a_larger_variance_grid_with_an_uneven_share(tmp_path):
    out = str(tmp_path / "variance")
    launched = Launch([("first", "variance_slow", out), ("again", "variance_slow", out)], tmp_path / "logs")
    want = run_variance(slow=True)
    tasks = launched.results()
    firsts = [result["tasks"]["first"] for result in tasks]
    for got in firsts + [result["tasks"]["again"] for result in tasks]:
        _check_variance(got, want)
    _check_seed_folders(firsts, out, VARIANCE_SLOW["seeds"], figures=("variance.png", "divergence.npz", "divergence.png"))
    assert not [w for result in tasks for w in result["tasks"]["again"]["writes"] if "checkpoint" in w]


@pytest.mark.slow
def test_reproduce_table5_in_two_processes(tmp_path):
    import _strict_json as strict_json

    out = str(tmp_path / "table5")
    launched = Launch([("table5", "table5", out)], tmp_path / "logs")
    want = strict_json.loads(run_table5(str(tmp_path / "alone"))["stdout"])
    results = launched.results()
    for result in results:
        task = result["tasks"]["table5"]
        got = strict_json.loads(task["stdout"])  # stdout is pure JSON on every process
        assert task["status"] == 0 and len(got["rows"]) == len(want["rows"]) == 2
        for row, ref in zip(got["rows"], want["rows"]):
            for name in ("empirical_alpha_min", "empirical_alpha_max"):
                assert row[name] == pytest.approx(ref[name], rel=1e-2)
    leader, follower = (r["tasks"]["table5"]["writes"] for r in results)
    assert not [w for w in follower if w.startswith(out)]
    for name in ("table5.json", "table5.csv", "stability_map.png", "rows/gd_w4.json", "map_sweep_auto_24x24/result.json"):
        assert leader.count(os.path.join(out, name)) == 1


# --- without processes ------------------------------------------------------------------------------

def test_single_process_helpers_are_local_operations(tmp_path):
    import jax

    assert not distributed.is_multiprocess() and distributed.is_leader() and distributed.process_index() == 0
    assert distributed.share({"a": 1}) == {"a": 1} and distributed.gather_objects(3) == [3]
    assert distributed.on_leader(lambda: 5) == 5 and distributed.local_share([1, 2, 3]) == [1, 2, 3]
    mesh = jaxcfl.config_mesh()
    x = distributed.put_global(np.arange(4.0), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    np.testing.assert_array_equal(distributed.gather({"x": x})["x"], np.arange(4.0))
    assert not distributed.initialize_from_env({})  # nothing asked: nothing started


def test_initialize_from_env_refuses_half_a_configuration():
    with pytest.raises(ValueError, match="JAXCFL_PROCESS_ID"):
        distributed.initialize_from_env({"JAXCFL_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="integers"):
        distributed.initialize_from_env({"JAXCFL_NUM_PROCESSES": "two", "JAXCFL_PROCESS_ID": "0"})
