"""One-shot accelerator check: the benchmarks' key figures on this machine's device, in one JSON file.

One command, bounded in time (``--budget-s``: 480 s on an accelerator, 115 s on a CPU), that
records what the other benchmark scripts measure, at sizes that fit the budget, on whatever
device JAX runs on (a GPU when there is one):

``machine``
    the device (JAX's and PyTorch's view of it, ``nvidia-smi``), versions, ``XLA_FLAGS``.
``pde_step``
    config-steps/s of the batched nonlinear PDE step (``pde_step.py``) for each operator that
    the nonlinear model takes (``separable``, ``fft``; ``dense`` is for the linearised models
    only), with the ratio against the same algorithm in PyTorch on the same device.
``sweep``
    ``jaxcfl.sweep`` config-steps/s (``sweep.py``) for each operator (linear workload:
    separable, dense, FFT; nonlinear: separable, FFT), with the ratio against the per-config
    PyTorch loop on the same device.
``operator_choice``
    FFT against separable gradients for low-rank images (``operator_choice.py``): does
    ``operator="auto"`` pick the faster path on this device?
``train_step``
    training images/s of K lockstep copies (``train_step.py``), ``copies_mode="vmap"`` against
    ``"unroll"``, K separate single-copy steps, and PyTorch (K separate models) on the device.
``scan_step``
    the scanned training step (``scan_step.py``): SGD steps of a small conv net inside
    ``lax.scan`` against separate calls, with ``lax.conv_general_dilated`` and with
    :func:`jaxcfl.nn.nets.conv_general_dilated` (on XLA's CPU backend lax's gradients are
    30-50x slower in a loop, jax-ml/jax#12868: does a GPU have the problem?); and the
    trainer's network step with each convolution, one call per step and as the compiled loop
    of ``Lockstep.steps_per_call``, with whether the bits agree.
``k_powers``
    k against k 2^n: after a few lockstep steps on the device, copies with ``k = 1, 2, 4`` hold
    bit-identical weights and odd ``k`` differ, under ``vmap`` and ``unroll`` (the compiled steps
    of ``train_step`` are reused). The perturbation factors are those of ``jaxcfl determinism``.
``determinism``
    a few training steps of the same network (``copies_mode="auto"``; the K copies on an
    accelerator, one copy on a CPU) repeated in 2 separate processes
    (:func:`jaxcfl.run_in_processes`, with a timeout), once in the deterministic
    mode of ``jaxcfl --deterministic`` (its XLA flags and matmul precision) and once without
    it: are the fingerprints of the weights, batch statistics and optimiser state bit-identical?

PyTorch baselines run where torch is importable and sees the device (``torch.cuda`` on a GPU,
the CPU build on a CPU); otherwise the JSON says ``"torch: not available ..."`` and the ratios
are missing. Each section is written to the JSON as soon as it ends (atomically: a killed run
keeps the sections it finished, with ``"status": "running"``); a section that fails records its
error and the check goes on; a section the budget leaves no time for is recorded as skipped.
At the end a short table is printed (on stderr with ``--json``, which prints the JSON on stdout).

The child processes of ``determinism`` compile on the host while the device is busy, so on an
accelerator (and with ``--quick``) they run alongside the other sections (``--overlap``); on a
CPU run they wait for the timed sections, whose cores they would otherwise share.

    python benchmarks/accelerator_check.py --out accel.json           # the full check
    python benchmarks/accelerator_check.py --out accel.json --quick   # smoke test (seconds)

Results and how to run it on a GPU: ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

_START = time.perf_counter()
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.join(HERE, "..", "src"))  # an installed jaxcfl comes first; else this checkout's
if HERE not in sys.path:  # imported as a module (by the tests, or by a child process): the sibling scripts
    sys.path.insert(0, HERE)
# JAX would take 75% of an accelerator's memory at its first use; the child processes of the
# determinism section and PyTorch's baselines share the device with this process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import numpy as np

SECTIONS = ("pde_step", "sweep", "operator_choice", "train_step", "scan_step", "k_powers", "determinism")


# --- sizes ------------------------------------------------------------------------------------------

def presets(kind: str, quick: bool) -> dict[str, Any]:
    """The sizes of every section for a device ``kind`` (``"cpu"`` or ``"accelerator"``).

    Chosen so that the full check fits 8 minutes on one GPU and 2 minutes on a 2-core CPU, and
    ``quick`` about 20 seconds on that CPU. ``est_s``: the least time a section needs; one that the
    budget no longer leaves that much for is skipped.
    """
    from jaxcfl.experiments.determinism_check import ODD, POWERS

    if quick:
        ks = (POWERS[0], POWERS[1], ODD[0])  # k = 1, 2, 3
        return {
            "budget_s": 600.0,  # a smoke test: every section runs, however loaded the machine
            "pde_step": {"size": 32, "kernel": 4, "batches": [4], "steps": 10, "repeats": 2, "budget": 5.0},
            "sweep": {"argv": ["--size", "16", "--kernel-size", "4", "--grid", "4", "--steps", "20", "--subset-loop",
                               "2", "--subset-torch", "1", "--torch-trial-steps", "5", "--other-operators", "skip"],
                      "workloads": ["linear"]},
            "operator_choice": {"cases": [(32, 4)], "ranks": (1,), "batch": 2, "steps": 2, "repeats": 1},
            "train_step": {"model": "cnn", "batch": 4, "ks": ks, "repeats": 1},
            "scan_step": {"steps": 2, "batch": 4, "repeats": 1, "model": "cnn", "model_batch": 4},
            "k_powers": {"steps": 2},
            "determinism": {"ks": (1.0,), "steps": 2, "modes": ("deterministic",), "timeout": 120.0},
            "est_s": {},
        }
    if kind == "cpu":
        return {
            "budget_s": 115.0,
            "pde_step": {"size": 256, "kernel": 32, "batches": [16], "steps": 25, "repeats": 3, "budget": 10.0},
            "sweep": {"argv": ["--size", "32", "--kernel-size", "8", "--grid", "16", "--steps", "200",
                               "--subset-loop", "16", "--subset-torch", "4", "--torch-trial-steps", "20"],
                      "workloads": ["linear", "nonlinear"]},
            "operator_choice": {"cases": [(256, 32)], "ranks": (1, 8, 16), "batch": 8, "steps": 10, "repeats": 3},
            "train_step": {"model": "cnn", "batch": 32, "ks": POWERS + ODD, "repeats": 2},
            "scan_step": {"steps": 4, "batch": 32, "repeats": 2, "model": "cnn", "model_batch": 32},
            "k_powers": {"steps": 3},
            "determinism": {"ks": (1.0,), "steps": 2, "modes": ("deterministic", "default"), "timeout": 90.0},
            "est_s": {"pde_step": 5, "sweep": 15, "operator_choice": 4, "train_step": 10, "scan_step": 10,
                      "k_powers": 1, "determinism": 25},
        }
    return {
        "budget_s": 480.0,
        "pde_step": {"size": 256, "kernel": 32, "batches": [16, 256], "steps": 100, "repeats": 5, "budget": 20.0},
        "sweep": {"argv": ["--chunk-size", "4096"], "workloads": ["linear", "nonlinear"]},  # else sweep.py's defaults
        "operator_choice": {"cases": [(256, 16), (256, 32), (256, 64), (128, 5), (64, 8)], "ranks": (1, 2, 4, 8, 16),
                            "batch": 64, "steps": 20, "repeats": 3},
        "train_step": {"model": "resnet20", "batch": 128, "ks": POWERS + ODD[:1], "repeats": 3},
        "scan_step": {"steps": 8, "batch": 64, "repeats": 5, "model": "resnet20", "model_batch": 128},
        "k_powers": {"steps": 3},
        "determinism": {"ks": POWERS + ODD[:1], "steps": 2, "modes": ("deterministic", "default"), "timeout": 200.0},
        "est_s": {"pde_step": 20, "sweep": 40, "operator_choice": 20, "train_step": 60, "scan_step": 40,
                  "k_powers": 2, "determinism": 60},
    }


# --- the device and PyTorch ---------------------------------------------------------------------------

def device_kind() -> str:
    return "cpu" if jax.default_backend() == "cpu" else "accelerator"


def torch_device(kind: str, use_torch: bool = True) -> tuple[str | None, str]:
    """Where the PyTorch baselines run, and why (the ``torch`` note of the JSON)."""
    if not use_torch:
        return None, "torch: not used (--no-torch)"
    try:
        import torch
    except ImportError:
        return None, "torch: not available (not installed)"
    if kind == "cpu":
        return "cpu", f"torch {torch.__version__} on the CPU"
    if jax.default_backend() in ("gpu", "cuda", "rocm") and torch.cuda.is_available():
        return "cuda", f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}"
    return None, f"torch: not available on the {jax.default_backend()} device (torch {torch.__version__} sees no GPU)"


def _nvidia_smi() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], check=False, capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or out.stderr.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{type(exc).__name__}: {exc}"


def machine_section(ctx: Context) -> dict[str, Any]:
    import jaxlib
    from _machine import machine_info

    info = machine_info()
    dev = jax.devices()[0]
    info.update(
        jaxlib=jaxlib.__version__, device_kind=dev.device_kind, device_platform=dev.platform,
        device_count=jax.device_count(), platform_version=getattr(dev.client, "platform_version", None),
        xla_flags=os.environ.get("XLA_FLAGS", ""), preallocate=os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
        nvidia_smi=_nvidia_smi(), torch_device=ctx.torch_device, torch_note=ctx.torch_note,
        jax_default_matmul_precision=jax.config.jax_default_matmul_precision,  # None: TF32 may run on a GPU
    )
    if ctx.torch_device == "cuda":
        import torch

        info.update(torch_cuda=torch.version.cuda, torch_cudnn=torch.backends.cudnn.version(),
                    torch_device_name=torch.cuda.get_device_name(0),
                    torch_allow_tf32={"matmul": torch.backends.cuda.matmul.allow_tf32,
                                      "cudnn": torch.backends.cudnn.allow_tf32})
    info["summary"] = (f"{dev.device_kind} ({jax.default_backend()}, {jax.device_count()} device(s)); "
                       f"jax {jax.__version__}, jaxlib {jaxlib.__version__}; {ctx.torch_note}")
    return info


# --- the timed sections ---------------------------------------------------------------------------------

def pde_step_section(ctx: Context) -> dict[str, Any]:
    """``pde_step.bench_batch`` with jaxcfl's separable and FFT operators and their PyTorch twins."""
    import pde_step as ps

    import jaxcfl

    s = ctx.settings["pde_step"]
    n, w = s["size"], s["kernel"]
    image, k0 = ps.checkerboard_np(n), ps.initial_kernel(w, 0)
    beta, label, bias = 1.0, 1.0, 0.0
    impls = [ps.JaxCFL(image, w, k0, beta, label, bias, operator="separable"),
             ps.JaxCFL(image, w, k0, beta, label, bias, operator="fft")]
    twins = {"jaxcfl-separable": "torch-separable-batched", "jaxcfl-fft": "torch-fft-batched"}
    if ctx.torch_device is not None:
        impls += [ps.TorchFFTBatched(image, w, k0, beta, label, bias, device=ctx.torch_device),
                  ps.TorchSeparableBatched(image, w, k0, beta, label, bias, device=ctx.torch_device)]
    out = {"problem": {"N": n, "w": w, "model": "nonlinear", "scheme": "gd", "pool": "sum", "dtype": "float32"},
           "auto_operator": jaxcfl.make_problem(image, w).operator, "torch_device": ctx.torch_device,
           "batches": [], "summary": []}
    for batch in s["batches"]:
        ctx.log(f"[pde_step] B = {batch}, S = {s['steps']} ...")
        res = ps.bench_batch(batch, s["steps"], impls, None, s["repeats"], w, min(s["budget"], ctx.remaining()))
        out["batches"].append(res)
        rows = res["impls"]
        for name, twin in twins.items():
            row = {"operator": name.split("-", 1)[1], "batch": batch, "steps": s["steps"],
                   "config_steps_per_s": rows[name]["config_steps_per_s"], "compile_s": rows[name]["compile_s"]}
            if twin in rows:
                row.update(torch=twin, torch_config_steps_per_s=rows[twin]["config_steps_per_s"],
                           ratio_vs_torch=rows[name]["config_steps_per_s"] / rows[twin]["config_steps_per_s"],
                           torch_rel_err_K=rows[twin]["rel_err_final_K_vs_jaxcfl"])
            out["summary"].append(row)
    return out


def sweep_section(ctx: Context) -> dict[str, Any]:
    """``sweep.bench_workload`` for each workload: every operator, and the per-config PyTorch loop."""
    import sweep as sw

    s = ctx.settings["sweep"]
    args = sw.parse_args(s["argv"])
    args.torch_device = ctx.torch_device
    if ctx.torch_device == "cpu":
        import torch

        torch.set_flush_denormal(True)  # as sweep.py does: XLA flushes denormals on the CPU
    out = {"argv": s["argv"], "torch_device": ctx.torch_device, "workloads": {}, "summary": []}
    for name, wl in sw.workloads(args).items():
        if name not in s["workloads"]:
            continue
        ctx.log(f"[sweep] {name}: {args.grid} x {args.grid} grid, {args.steps} steps ...")
        res = sw.bench_workload(name, wl, args)
        out["workloads"][name] = res
        torch_rows = [r for r in res["rows"] if r["implementation"].startswith("B:")]
        for r in res["rows"]:
            if not r["implementation"].startswith("jaxcfl.sweep"):
                continue
            op = r["implementation"].split("operator=", 1)[1].rstrip(")")  # "auto -> separable", "fft", ...
            row = {"workload": name, "operator": op.split("-> ")[-1], "auto": op.startswith("auto"),
                   "configs_timed": r["configs_timed"], "config_steps_per_s": r["config_steps_per_s"]}
            if torch_rows:
                row.update(torch=torch_rows[0]["implementation"],
                           torch_config_steps_per_s=torch_rows[0]["config_steps_per_s"],
                           ratio_vs_torch=r["config_steps_per_s"] / torch_rows[0]["config_steps_per_s"])
            out["summary"].append(row)
    return out


def operator_choice_section(ctx: Context) -> dict[str, Any]:
    """``operator_choice.measure``: FFT against separable gradients, and what ``auto`` picks."""
    import operator_choice as oc

    from jaxcfl.pde import _operators as ops
    s = ctx.settings["operator_choice"]
    rows, other = oc.measure(s["cases"], s["ranks"], s["batch"], s["steps"], s["repeats"], np.random.default_rng(0),
                             out=None)
    faster = sum(oc.auto_is_faster(r) for r in rows)
    return {"fft_cost_factor": ops.FFT_COST_FACTOR, "auto_max_rank": ops.AUTO_MAX_RANK, "batch": s["batch"],
            "steps": s["steps"], "rows": rows, "other_load": other,
            "summary": {"auto_picks_faster": faster, "cases": len(rows),
                        "slower_picks": [{k: r[k] for k in ("N", "w", "rank", "ratio", "auto")}
                                         for r in rows if not oc.auto_is_faster(r)]}}


def train_step_section(ctx: Context) -> dict[str, Any]:
    """``train_step.bench_model``: vmap and unroll copies, separate steps, PyTorch on the device."""
    import train_step as ts

    from jaxcfl.nn._preset import resolve_copies_mode

    s = ctx.settings["train_step"]
    res = ts.bench_model(s["model"], s["batch"], len(s["ks"]), s["repeats"], ("vmap", "unroll"), ks=s["ks"],
                         torch_device=ctx.torch_device)
    ips = {name: row["images_per_s"] for name, row in res["impls"].items()}
    res["summary"] = {
        "model": s["model"], "batch": s["batch"], "copies": len(s["ks"]), "auto_mode": resolve_copies_mode("auto"),
        "images_per_s": ips, "vmap_over_unroll": ips["jaxcfl-vmap"] / ips["jaxcfl-unroll"],
        "compile_s": {name: row["compile_s"] for name, row in res["impls"].items() if "compile_s" in row},
    }
    if "torch-separate" in ips:
        res["summary"]["vs_torch"] = {m: ips[f"jaxcfl-{m}"] / ips["torch-separate"] for m in ("vmap", "unroll")}
    return res


def scan_step_section(ctx: Context) -> dict[str, Any]:
    """``scan_step.measure`` (both convolutions), then the trainer's single-copy network step with
    lax's and jaxcfl's convolution, per call and as one compiled loop of ``steps`` steps."""
    import scan_step as sc
    import train_step as ts
    from jax import lax

    s = ctx.settings["scan_step"]
    res: dict[str, Any] = {"small_net": sc.measure(("lax", "jaxcfl"), s["steps"], s["batch"], s["repeats"])}
    x, y = ts.random_batch(s["model_batch"])
    network: dict[str, Any] = {}
    finals = {}
    for name, conv in (("lax", lax.conv_general_dilated), ("jaxcfl", None)):
        steps = ts.JaxSteps(s["model"], (1.0,), "unroll", x, y, conv=conv)
        steps.step()
        per_call = min(ts.timed(steps.step) for _ in range(s["repeats"]))
        row = {"step_s": per_call, "images_per_s": s["model_batch"] / per_call}
        finals[name] = jax.tree.leaves(steps.state.params)  # after the same number of steps for both
        if name == "jaxcfl":  # lax's loop is the slow case being measured away: skip its (long) chunk on a CPU
            steps.chunk(s["steps"])
            loop = min(ts.timed(lambda: steps.chunk(s["steps"])) for _ in range(s["repeats"]))
            row["loop_step_s"] = loop / s["steps"]
            row["loop_over_calls"] = row["loop_step_s"] / per_call
        network[name] = row
    network["bits_equal"] = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(*finals.values()))
    network["jaxcfl_over_lax_per_call"] = network["lax"]["step_s"] / network["jaxcfl"]["step_s"]
    res["network"] = {"model": s["model"], "batch": s["model_batch"], **network}
    small = res["small_net"]
    res["summary"] = {"scan_over_separate": {k: small[k]["scan_over_separate"] for k in small},
                      "model": s["model"], "images_per_s": {k: network[k]["images_per_s"] for k in ("lax", "jaxcfl")},
                      "loop_over_calls": network["jaxcfl"]["loop_over_calls"], "bits_equal": network["bits_equal"]}
    return res


# --- bits ----------------------------------------------------------------------------------------------

def train_state(model: str, batch: int, ks: list[float], steps: int, mode: str = "auto") -> Any:
    """The lockstep state after ``steps`` steps of ``train_step.JaxSteps`` on its random batch.

    Module level, so that :func:`jaxcfl.run_in_processes` can run it in a new process.
    """
    from train_step import JaxSteps, random_batch

    x, y = random_batch(batch)
    steps_ = JaxSteps(model, tuple(float(k) for k in ks), mode, x, y)
    for _ in range(steps):
        steps_.step()
    return steps_.state


def k_powers_section(ctx: Context) -> dict[str, Any]:
    """k against k 2^n: per-copy fingerprints after a few steps, under vmap and unroll."""
    from jaxcfl.experiments.determinism_check import POWERS
    from jaxcfl.nn._lockstep import _copy_fingerprints

    t, s = ctx.settings["train_step"], ctx.settings["k_powers"]
    ks = [float(k) for k in t["ks"]]
    out = {"model": t["model"], "batch": t["batch"], "ks": ks, "steps": s["steps"], "modes": {}}
    for mode in ("vmap", "unroll"):
        prints = dict(zip(ks, _copy_fingerprints(train_state(t["model"], t["batch"], ks, s["steps"], mode))))
        out["modes"][mode] = {
            "fingerprints": {f"{k:g}": f for k, f in prints.items()},
            "powers_identical": all(prints[k] == prints[1.0] for k in ks if k in POWERS),
            "odd_differ": all(prints[k] != prints[1.0] for k in ks if k not in POWERS),
        }
    modes = out["modes"].values()
    out["summary"] = {
        "powers": [k for k in ks if k in POWERS], "odd": [k for k in ks if k not in POWERS],
        "powers_identical": all(m["powers_identical"] for m in modes),
        "odd_differ": all(m["odd_differ"] for m in modes),
        "vmap_equals_unroll": {f"{k:g}": out["modes"]["vmap"]["fingerprints"][f"{k:g}"]
                               == out["modes"]["unroll"]["fingerprints"][f"{k:g}"] for k in ks},
    }
    return out


def determinism_section(ctx: Context) -> dict[str, Any]:
    """``train_state`` (``copies_mode="auto"``) in 2 processes, with and without the deterministic mode."""
    from jaxcfl._core.determinism import run_in_processes

    t, s = ctx.settings["train_step"], ctx.settings["determinism"]
    kwargs = {"model": t["model"], "batch": t["batch"], "ks": [float(k) for k in s["ks"]], "steps": s["steps"]}
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, env.get("PYTHONPATH", "")) if p)
    out = {"target": "accelerator_check:train_state", "kwargs": kwargs, "processes": 2}
    for key, deterministic in (("deterministic", True), ("default", False)):
        if key not in s["modes"]:
            out[key] = {"skipped": "--quick: the deterministic mode only"}
            continue
        timeout = max(30.0, min(s["timeout"], ctx.remaining()))
        ctx.log(f"[determinism] 2 processes, deterministic mode {'on' if deterministic else 'off'} "
                f"(timeout {timeout:.0f} s each) ...")
        try:
            check = run_in_processes("accelerator_check:train_state", 2, kwargs=kwargs, deterministic=deterministic,
                                     env=env, timeout=timeout)
            out[key] = check.to_dict()
        except (subprocess.TimeoutExpired, RuntimeError) as exc:
            out[key] = {"error": f"{type(exc).__name__}: {str(exc)[-1500:]}"}
    out["summary"] = {"identical_deterministic": out["deterministic"].get("identical"),
                      "identical_default": out["default"].get("identical")}
    if "identical" not in out["deterministic"] and "identical" not in out["default"]:
        raise RuntimeError(out["deterministic"].get("error", "no process ran"))
    return out


# --- the run ---------------------------------------------------------------------------------------------

class Context:
    """What the sections share: their sizes, the torch device, the clock and the log."""

    def __init__(self, settings: dict[str, Any], budget_s: float, torch_dev: str | None, torch_note: str, stream):
        self.settings, self.budget_s = settings, budget_s
        self.torch_device, self.torch_note = torch_dev, torch_note
        self.stream = stream

    def elapsed(self) -> float:
        return time.perf_counter() - _START

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():5.0f} s] {message}", file=self.stream, flush=True)


def run_section(ctx: Context, name: str, fn: Callable[[Context], dict[str, Any]]) -> dict[str, Any]:
    """``fn(ctx)`` with its wall time; an exception becomes ``{"error", "traceback"}``."""
    t0 = time.perf_counter()
    try:
        res = fn(ctx)
    except Exception as exc:  # noqa: BLE001 - recorded; the check goes on with the next section
        res = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        ctx.log(f"[{name}] FAILED: {res['error']}")
    res["seconds"] = time.perf_counter() - t0
    return res


class Background(threading.Thread):
    """A section run in a thread (the determinism children, alongside the timed sections)."""

    def __init__(self, ctx: Context, name: str, fn: Callable[[Context], dict[str, Any]]):
        super().__init__(daemon=True)
        self.ctx, self.section, self.fn, self.result = ctx, name, fn, None

    def run(self) -> None:
        self.result = run_section(self.ctx, self.section, self.fn)


FUNCTIONS = {"pde_step": pde_step_section, "sweep": sweep_section, "operator_choice": operator_choice_section,
             "train_step": train_step_section, "scan_step": scan_step_section, "k_powers": k_powers_section,
             "determinism": determinism_section}


def _fmt(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.3g}".replace("e+0", "e").replace("e+", "e")


def table(doc: dict[str, Any]) -> str:
    """The short table printed at the end."""
    sec = doc["sections"]
    lines = [f"accelerator check, {doc['date']}: {sec.get('machine', {}).get('summary', '?')}",
             f"{'section':<16} {'what':<44} {'value':>10} {'vs torch':>9}"]

    def add(section, what, value, ratio=None):
        lines.append(f"{section:<16} {what:<44} {value:>10} {_fmt(ratio) if ratio is not None else '':>9}")

    for name in SECTIONS:
        res = sec.get(name)
        if res is None:
            add(name, "not run", "")
            continue
        if "skipped" in res:
            add(name, f"skipped: {res['skipped']}", "")
            continue
        if "error" in res and "summary" not in res:
            add(name, f"ERROR {res['error']}"[:44], "")
            continue
        summ = res.get("summary")
        if summ is None:
            add(name, f"status: {res.get('status', '?')}", "")
        elif name == "pde_step":
            for r in summ:
                add(name, f"{r['operator']} B={r['batch']} config-steps/s", _fmt(r["config_steps_per_s"]),
                    r.get("ratio_vs_torch"))
        elif name == "sweep":
            for r in summ:
                add(name, f"{r['workload']} {r['operator']}{' (auto)' if r['auto'] else ''} config-steps/s",
                    _fmt(r["config_steps_per_s"]), r.get("ratio_vs_torch"))
        elif name == "operator_choice":
            add(name, "auto picks the faster path", f"{summ['auto_picks_faster']}/{summ['cases']}")
        elif name == "train_step":
            for mode in ("vmap", "unroll"):
                add(name, f"{summ['model']} b{summ['batch']} K={summ['copies']} {mode} images/s",
                    _fmt(summ["images_per_s"][f"jaxcfl-{mode}"]), summ.get("vs_torch", {}).get(mode))
            add(name, f"vmap / unroll (auto = {summ['auto_mode']})", _fmt(summ["vmap_over_unroll"]))
        elif name == "scan_step":
            for conv, ratio in summ["scan_over_separate"].items():
                add(name, f"{conv} conv: scanned SGD / separate calls", _fmt(ratio))
            for conv, ips in summ["images_per_s"].items():
                add(name, f"{summ['model']} step, {conv} conv, images/s", _fmt(ips))
            add(name, "jaxcfl conv: trainer loop / separate calls", _fmt(summ["loop_over_calls"]))
            add(name, "lax and jaxcfl conv: same bits", "yes" if summ["bits_equal"] else "NO")
        elif name == "k_powers":
            yes = lambda b: "yes" if b else "NO"
            add(name, f"k = {', '.join(f'{k:g}' for k in summ['powers'])} bit-identical (vmap, unroll)",
                yes(summ["powers_identical"]))
            add(name, f"k = {', '.join(f'{k:g}' for k in summ['odd'])} differ from k = 1", yes(summ["odd_differ"]))
        elif name == "determinism":
            for key, what in (("deterministic", "deterministic mode"), ("default", "default flags")):
                b = summ[f"identical_{key}"]
                word = ("skipped" if "skipped" in res[key] else "ERROR") if b is None else ("identical" if b else "DIFFER")
                add(name, f"2 processes, {what}", word)
    lines.append(f"status {doc['status']}, {doc['seconds']:.0f} s (budget {doc['budget_s']:.0f} s); "
                 f"{sec.get('machine', {}).get('torch_note', '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="accelerator_check.json", help="the JSON file (default ./accelerator_check.json)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of every section (about 25 s on a quiet 2-core CPU)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds for the whole check (default 480 on an accelerator, 115 on a CPU, 600 with --quick); "
                        "a section the rest of the budget cannot hold is skipped")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="default: all")
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="run the determinism section's child processes alongside the timed sections "
                        "(default: on an accelerator and with --quick)")
    p.add_argument("--no-torch", action="store_true", help="no PyTorch baselines")
    p.add_argument("--json", action="store_true", help="print the JSON on stdout (progress and table on stderr)")
    args = p.parse_args(argv)
    stream = sys.stderr if args.json else sys.stdout

    from jaxcfl._core.results import json_text, write_json

    kind = device_kind()
    settings = presets(kind, args.quick)
    budget = args.budget_s if args.budget_s is not None else settings["budget_s"]
    overlap = args.overlap if args.overlap is not None else (args.quick or kind != "cpu")
    tdev, tnote = torch_device(kind, not args.no_torch)
    if tdev == "cpu":
        import torch

        torch.set_num_threads(os.cpu_count() or 1)  # as the benchmark scripts do
    ctx = Context(settings, budget, tdev, tnote, stream)
    command = " ".join(["python", os.path.relpath(sys.argv[0])] + (sys.argv[1:] if argv is None else list(argv)))
    doc: dict[str, Any] = {
        "check": "jaxcfl accelerator check", "status": "running",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "command": command,
        "host": platform.node(), "device": kind, "quick": args.quick, "budget_s": budget, "overlap": overlap,
        "settings": {k: v for k, v in settings.items() if k != "budget_s"}, "sections": {}, "seconds": None,
    }

    def save() -> None:
        doc["seconds"] = ctx.elapsed()
        write_json(args.out, doc)

    def stop(signum, frame):  # SIGTERM (a timeout): record what is done, then leave
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, stop)
    ctx.log(f"accelerator check on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
            f"budget {budget:.0f} s, {tnote}; writing {args.out}")
    background = None
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    try:
        with quiet:  # --json: stdout holds the JSON only; what the benchmark scripts print goes to stderr
            doc["sections"]["machine"] = run_section(ctx, "machine", machine_section)
            save()
            if overlap and "determinism" in args.sections:
                background = Background(ctx, "determinism", determinism_section)
                doc["sections"]["determinism"] = {"status": "running in the background"}
                background.start()
            for name in args.sections:
                if name == "determinism" and background is not None:
                    continue
                need = settings["est_s"].get(name, 0)
                if ctx.remaining() < need:
                    doc["sections"][name] = {"skipped": f"budget: {ctx.remaining():.0f} s left, the section needs ~{need} s"}
                    ctx.log(f"[{name}] skipped ({doc['sections'][name]['skipped']})")
                else:
                    ctx.log(f"[{name}] ...")
                    doc["sections"][name] = run_section(ctx, name, FUNCTIONS[name])
                    ctx.log(f"[{name}] done in {doc['sections'][name]['seconds']:.1f} s")
                save()
            if background is not None:
                background.join(max(1.0, ctx.remaining() + 60))
                doc["sections"]["determinism"] = background.result or {"error": "did not finish within the budget"}
        doc["status"] = "complete"
    except KeyboardInterrupt as exc:
        doc["status"] = f"interrupted ({exc})"
        if background is not None and background.result is not None:
            doc["sections"]["determinism"] = background.result
    finally:
        signal.signal(signal.SIGTERM, previous)
    save()
    print(table(doc), file=stream, flush=True)
    if args.json:
        print(json_text(doc))
    return 0 if doc["status"] == "complete" else 1


if __name__ == "__main__":
    sys.exit(main())
