"""Benchmark: jaxcfl's vectorised ``lr x alpha`` sweeps against per-configuration loops.

Workloads (float32, the ``N x N`` checkerboard or, with ``--image random``, an ``N x N``
N(0, 1) image of full rank, for which ``operator="auto"`` picks the FFT; forward Euler
``K <- K - lr G(K)``):

``linear``
    the linearised model (eq 20, ``a = -0.5``, ``beta = 1``, sum pooling) on a
    ``64 x 64`` grid, ``lr = geomspace(1e-5, 1e-3)``, ``alpha = geomspace(1e2, 1e5)``.
``nonlinear``
    the Swish model (eqs 11-13, mean pooling, ``y = 1``, ``b = 0``) on a ``64 x 64``
    grid, ``lr = geomspace(1e-3, 0.2)``, ``alpha = geomspace(1, 100)``.

Each grid point is one run of ``--steps`` iterations from the sweep's initial
kernel (N(0, 1) drawn from ``jax.random.key(0)``). Implementations, all timed in
the same process:

``jaxcfl.sweep``
    the whole grid as one vmapped, chunked jit program, end to end (set-up,
    runs, diagnostics, classification). Timed twice: the first call (compile +
    run, with ``lr`` scaled by ``1 + 1e-3`` so that nothing is cached but the
    compiled programs) and the second, steady-state call on the nominal grid,
    which is the number reported (with ``--repeats R``: the fastest of ``R``
    steady-state calls, and likewise for every baseline). Compile time = first - second (scaled to the
    grid size when ``--first-call chunk``), and separately the trace + lowering
    + XLA compile durations that ``jax.monitoring`` reports.
``jaxcfl.sweep operator=dense/fft``
    the same with the operators that ``operator="auto"`` did not pick (on the
    rank-1 checkerboard it picks the separable products): the dense
    ``w^2 x w^2`` normal matrix (linear model only) and the FFT correlations;
    by default timed (steady state) on one chunk and extrapolated.
``A: python loop, jaxcfl.integrate``
    one ``jaxcfl.integrate(..., record_every=steps)`` call per configuration
    (compiled once; new hyperparameter values are traced), timed on an evenly
    spread subset of the grid and extrapolated linearly to the grid.
``B: torch loop``
    a plain PyTorch loop, one configuration after the other, ``torch.no_grad``,
    explicit gradients with ``torch.fft`` (``rfft2``/``irfft2``); for the
    nonlinear model also ``F.conv2d`` + autograd. Each variant runs with
    ``torch.set_num_threads(os.cpu_count())`` and with one thread; the fastest
    on a short trial is timed on a subset and extrapolated. Denormals are
    flushed (``torch.set_flush_denormal(True)``, as XLA does on CPU; without it
    the overflowing runs of the linear grid are many times slower);
    ``--torch-keep-denormals`` turns that off.
``C: torch batched`` (``--torch-batch B``)
    PyTorch with ``B`` configurations in lock-step (``(B, w, w)`` kernels, the
    vectorised counterpart of ``jaxcfl.sweep``): the explicit ``torch.fft``
    gradient and, for the nonlinear model, the loss through ``torch.fft`` with
    ``loss.backward()``; ``--torch-threads``, or the faster of ``os.cpu_count()``
    and one thread in a short trial; timed on ``--subset-torch-batched`` evenly
    spread configurations.

The baselines compute only the final kernel; ``jaxcfl.sweep`` also records
diagnostics every ``steps/100`` iterations (loss, update norm, ...) and
classifies every run, so the comparison does not favour jaxcfl.

``--table5`` also times :func:`jaxcfl.empirical_bounds` for the rows of the
paper's Table 5 (256 checkerboard; Nesterov ``lr = 1e-4``, momentum 0.9, and gd
``lr = 1e-8``; ``alpha_range = (1e3, 1e11)``).

Other processes may share the CPU: each timing carries the fraction of all CPUs
that *other* processes used meanwhile (``other load``; 0.5 = one core of two).

Usage::

    python benchmarks/sweep.py               # the default workloads (a few minutes)
    python benchmarks/sweep.py --quick       # smoke test (seconds)
    python benchmarks/sweep.py --table5 --table5-kernels 16 32
    python benchmarks/sweep.py --json > out.json
    # the FFT path against batched PyTorch: a 256 x 256 noise image, 32 x 32 kernel, 16 x 100 config-steps
    python benchmarks/sweep.py --workloads nonlinear --image random --size 256 --kernel-size 32 \\
        --grid 4 --steps 100 --torch-batch 16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

try:  # the package is normally installed; fall back to the src layout of a checkout
    import jaxcfl  # noqa: F401
except ImportError:  # pragma: no cover - convenience for running from a checkout
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import jax
import jax.numpy as jnp
import jaxcfl
from _machine import OtherLoad, loadavg, machine_info

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover
    torch = None
    F = None

_OUT = sys.stdout  # human-readable output; stderr under --json


def log(*args) -> None:
    print(*args, file=_OUT, flush=True)


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- machine and load ---------------------------------------------------------------

class CompileMeter:
    """Sums the trace, lowering and XLA compile durations that ``jax.monitoring`` reports."""

    EVENTS = {
        "/jax/core/compile/jaxpr_trace_duration": "trace_s",
        "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
        "/jax/core/compile/backend_compile_duration": "xla_compile_s",
    }
    _log: list[tuple[str, float]] = []
    _registered = False

    @classmethod
    def register(cls) -> None:
        if not cls._registered:
            def listener(event, duration, **_):
                if event in cls.EVENTS:
                    cls._log.append((event, float(duration)))

            jax.monitoring.register_event_duration_secs_listener(listener)
            cls._registered = True

    def __enter__(self):
        self.register()
        self._n = len(self._log)
        return self

    def __exit__(self, *exc):
        events = self._log[self._n:]
        self.result = {name: 0.0 for name in self.EVENTS.values()}
        for event, duration in events:
            self.result[self.EVENTS[event]] += duration
        self.result["xla_programs"] = sum(e == "/jax/core/compile/backend_compile_duration" for e, _ in events)
        self.result["total_s"] = self.result["trace_s"] + self.result["lower_s"] + self.result["xla_compile_s"]
        return False


def timed(fn):
    mon = OtherLoad().start()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    return dt, out, mon.stop()


def timed_best(fn, repeats: int):
    """:func:`timed` ``repeats`` times; the fastest run's ``(seconds, output, other load)``."""
    return min((timed(fn) for _ in range(max(1, repeats))), key=lambda r: r[0])


def rel_diff(a, b) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


# --- workloads -------------------------------------------------------------------------

def workloads(args) -> dict:
    g = args.grid
    return {
        "linear": dict(model="linear", pool="sum", a=-0.5, beta=1.0,
                       lr=np.geomspace(1e-5, 1e-3, g), alpha=np.geomspace(1e2, 1e5, g)),
        "nonlinear": dict(model="nonlinear", pool="mean", a=-0.5, beta=1.0,
                          lr=np.geomspace(1e-3, 0.2, g), alpha=np.geomspace(1.0, 100.0, g)),
    }


def subset_indices(n_total: int, n: int) -> np.ndarray:
    """``n`` flat grid indices spread evenly over the grid (every lr row is represented)."""
    n = min(n, n_total)
    return np.unique(np.round(np.linspace(0, n_total - 1, n)).astype(int))


# --- PyTorch baselines ------------------------------------------------------------------

class TorchFFT:
    """One configuration at a time; explicit gradients with real FFTs (no autograd), on torch ``device``."""

    def __init__(self, image: np.ndarray, w: int, pool: str, model: str, a: float, beta: float,
                 label: float = 1.0, bias: float = 0.0, device: str = "cpu"):
        self.name = "B: torch loop, torch.fft explicit gradient"
        self.N = image.shape[0]
        self.w = w
        self.M = self.N - w + 1
        self.c = 1.0 if pool == "sum" else 1.0 / (self.M * self.M)
        self.model, self.a, self.beta, self.label, self.bias = model, float(a), float(beta), float(label), float(bias)
        self.device = device
        self.Ihat = torch.fft.rfft2(torch.from_numpy(np.array(image, np.float32)).to(device))
        self.Ibar = self._adjoint(torch.ones(self.M, self.M, device=device))

    def _correlate(self, K):  # Z = K * I (valid), M x M
        s = (self.N, self.N)
        return torch.fft.irfft2(torch.conj(torch.fft.rfft2(K, s=s)) * self.Ihat, s=s)[: self.M, : self.M]

    def _adjoint(self, u):  # C^T u, w x w
        s = (self.N, self.N)
        return torch.fft.irfft2(torch.conj(torch.fft.rfft2(u, s=s)) * self.Ihat, s=s)[: self.w, : self.w]

    def gradient(self, K, alpha: float):
        if self.model == "linear":
            ca2 = 0.5 * self.c * self.a
            return ca2 * (self.Ibar + self.beta * self._adjoint(self._correlate(K))) + alpha * K
        Z = self._correlate(K)
        s = torch.sigmoid(self.beta * Z)
        logit = self.c * torch.sum(Z * s) + self.bias
        residual = torch.sigmoid(logit) - self.label
        r_prime = s + self.beta * Z * s * (1.0 - s)
        return (self.c * residual) * self._adjoint(r_prime) + alpha * K

    def run(self, K0: np.ndarray, lr: float, alpha: float, steps: int) -> np.ndarray:
        with torch.no_grad():
            K = torch.from_numpy(np.array(K0, np.float32)).to(self.device)
            for _ in range(steps):
                K = K - lr * self.gradient(K, alpha)
        return K.cpu().numpy()  # waits for the device; a no-op on the CPU


class TorchConvAutograd:
    """One configuration at a time; ``F.conv2d`` forward and ``loss.backward()`` (nonlinear model)."""

    def __init__(self, image: np.ndarray, w: int, pool: str, beta: float, label: float = 1.0, bias: float = 0.0,
                 device: str = "cpu"):
        self.name = "B: torch loop, F.conv2d + autograd"
        self.device = device
        self.I = torch.from_numpy(np.array(image, np.float32)).to(device)[None, None]
        M = image.shape[0] - w + 1
        self.c = 1.0 if pool == "sum" else 1.0 / (M * M)
        self.beta, self.label, self.bias = float(beta), float(label), float(bias)

    def run(self, K0: np.ndarray, lr: float, alpha: float, steps: int) -> np.ndarray:
        K = torch.from_numpy(np.array(K0, np.float32)).to(self.device).requires_grad_(True)
        for _ in range(steps):
            Z = F.conv2d(self.I, K[None, None])  # valid cross-correlation
            r = F.silu(Z) if self.beta == 1.0 else Z * torch.sigmoid(self.beta * Z)
            logit = self.c * r.sum() + self.bias
            loss = F.softplus(logit) - self.label * logit + 0.5 * alpha * (K * K).sum()
            loss.backward()
            with torch.no_grad():
                K -= lr * K.grad
            K.grad = None
        return K.detach().cpu().numpy()


class TorchFFTBatched(TorchFFT):
    """Configurations in lock-step batches, ``(B, w, w)`` kernels; real FFTs (``rfft2``/``irfft2``).

    ``autograd=False``: the explicit gradient of :class:`TorchFFT`, batched. ``autograd=True``
    (nonlinear model): the loss ``softplus(z) - y z + alpha/2 ||K||^2`` through ``torch.fft`` and
    ``loss.sum().backward()``, then ``K -= lr K.grad`` under ``torch.no_grad()``.
    """

    def __init__(self, *args, autograd: bool = False, **kw):
        super().__init__(*args, **kw)
        if autograd and self.model != "nonlinear":
            raise ValueError("the autograd variant is for the nonlinear model")
        self.autograd = autograd
        self.name = f"C: torch batched, torch.fft {'autograd' if autograd else 'explicit'}"

    def _correlate(self, K):  # (B, M, M)
        s = (self.N, self.N)
        return torch.fft.irfft2(torch.conj(torch.fft.rfft2(K, s=s)) * self.Ihat, s=s)[..., : self.M, : self.M]

    def _adjoint(self, u):  # (B, w, w)
        s = (self.N, self.N)
        return torch.fft.irfft2(torch.conj(torch.fft.rfft2(u, s=s)) * self.Ihat, s=s)[..., : self.w, : self.w]

    def gradient(self, K, alpha):
        if self.model == "linear":
            ca2 = 0.5 * self.c * self.a
            return ca2 * (self.Ibar + self.beta * self._adjoint(self._correlate(K))) + alpha * K
        Z = self._correlate(K)
        s = torch.sigmoid(self.beta * Z)
        logit = self.c * torch.sum(Z * s, dim=(-2, -1), keepdim=True) + self.bias
        residual = torch.sigmoid(logit) - self.label
        r_prime = s + self.beta * Z * s * (1.0 - s)
        return (self.c * residual) * self._adjoint(r_prime) + alpha * K

    def _loss(self, K, alpha):
        Z = self._correlate(K)
        r = F.silu(Z) if self.beta == 1.0 else Z * torch.sigmoid(self.beta * Z)
        logit = self.c * r.sum(dim=(-2, -1), keepdim=True) + self.bias
        return F.softplus(logit) - self.label * logit + 0.5 * alpha * (K * K).sum(dim=(-2, -1), keepdim=True)

    def run_many(self, K0: np.ndarray, lr: np.ndarray, alpha: np.ndarray, steps: int) -> np.ndarray:
        """Final kernels ``(B, w, w)`` of ``len(lr)`` configurations run together."""
        as_t = lambda x: torch.from_numpy(np.asarray(x, np.float32)).to(self.device).view(-1, 1, 1)
        lr_t, alpha_t = as_t(lr), as_t(alpha)
        K = torch.from_numpy(np.array(K0, np.float32)).to(self.device).expand(lr_t.shape[0], self.w, self.w).clone()
        if not self.autograd:
            with torch.no_grad():
                for _ in range(steps):
                    K = K - lr_t * self.gradient(K, alpha_t)
            return K.cpu().numpy()
        K.requires_grad_(True)
        for _ in range(steps):
            self._loss(K, alpha_t).sum().backward()
            with torch.no_grad():
                K -= lr_t * K.grad
            K.grad = None
        return K.detach().cpu().numpy()

    def run(self, K0: np.ndarray, lr: float, alpha: float, steps: int) -> np.ndarray:
        return self.run_many(K0, np.array([lr]), np.array([alpha]), steps)[0]


def make_image(args) -> np.ndarray:
    """The workload's image: the ``N x N`` checkerboard, or (``--image random``) N(0, 1) noise of full rank."""
    if args.image == "random":
        return np.random.default_rng(args.image_seed).standard_normal((args.size, args.size)).astype(np.float32)
    return np.asarray(jaxcfl.checkerboard(args.size))


# --- one workload ------------------------------------------------------------------------

def bench_workload(name: str, wl: dict, args) -> dict:
    image_np = make_image(args)
    image = jnp.asarray(image_np)
    w, steps, chunk = args.kernel_size, args.steps, args.chunk_size
    model, pool, a, beta = wl["model"], wl["pool"], wl["a"], wl["beta"]
    lr_grid, alpha_grid = wl["lr"], wl["alpha"]
    n_total = lr_grid.size * alpha_grid.size
    total_cs = n_total * steps  # config-steps of the full grid
    common = dict(scheme="gd", model=model, pool=pool, a=a, beta=beta, steps=steps, chunk_size=chunk, progress=False)
    res = {"workload": name, "model": model, "pool": pool, "a": a, "beta": beta, "scheme": "gd", "image": args.size,
           "image_kind": args.image,
           "kernel_size": w, "steps": steps, "grid": [int(lr_grid.size), int(alpha_grid.size)], "configs": n_total,
           "lr_range": [float(lr_grid[0]), float(lr_grid[-1])], "alpha_range": [float(alpha_grid[0]), float(alpha_grid[-1])],
           "chunk_size": chunk, "rows": []}
    rows = res["rows"]

    def add_row(impl, seconds, n_configs, measured, load, **extra):
        rate = n_configs * steps / seconds
        rows.append(dict(implementation=impl, configs_timed=int(n_configs), seconds_timed=seconds,
                         config_steps_per_s=rate, full_grid_s=total_cs / rate, full_grid_measured=measured,
                         other_load=load, **extra))

    # -- jaxcfl.sweep: first call (compile + run), then the steady state on the nominal grid.
    chunks = lambda n: -(-n // chunk)
    if args.first_call == "chunk" and n_total > chunk:
        rows_first = -(-chunk // alpha_grid.size)  # enough lr rows to fill one chunk: the same compiled shape
        lr_first = lr_grid[:rows_first]
    else:
        lr_first = lr_grid
    n_first = lr_first.size * alpha_grid.size
    progress(f"[{name}] jaxcfl.sweep first call ({n_first} configs: compile + run) ...")
    with CompileMeter() as cm_first:
        t_first, _, load_first = timed(lambda: jaxcfl.sweep(image, w, lr_first * (1 + 1e-3), alpha_grid, **common))
    progress(f"[{name}]   {t_first:.2f} s; steady-state call ({n_total} configs) ...")
    with CompileMeter() as cm_steady:
        t_steady, result, load_steady = timed_best(lambda: jaxcfl.sweep(image, w, lr_grid, alpha_grid, **common),
                                                   args.repeats)
    progress(f"[{name}]   {t_steady:.2f} s")
    op = f"auto -> {result.spec.operator}"
    main_impl = f"jaxcfl.sweep (operator={op})"
    add_row(main_impl, t_steady, n_total, True, load_steady)
    steady_share = t_steady * chunks(n_first) / chunks(n_total)
    res["compile"] = dict(
        first_call_s=t_first, first_call_configs=n_first, first_call_other_load=load_first,
        steady_call_s=t_steady, steady_share_s=steady_share, compile_s=t_first - steady_share,
        monitored_first_call=cm_first.result, monitored_steady_call=cm_steady.result,
    )
    res["counts"] = result.counts()

    # -- jaxcfl.sweep with the other operators (dense: linear models only).
    others = [op for op in (("dense", "fft") if model != "nonlinear" else ("fft",)) if op != result.spec.operator]
    for other in others if args.linear_fft != "skip" else ():
        if args.linear_fft == "chunk" and n_total > chunk:
            lr_other = lr_grid[: -(-chunk // alpha_grid.size)]
        else:
            lr_other = lr_grid
        n_other = lr_other.size * alpha_grid.size
        progress(f"[{name}] jaxcfl.sweep operator={other} ({n_other} configs, compile + steady) ...")
        with CompileMeter() as cm_other:
            t_other_first, _, _ = timed(lambda: jaxcfl.sweep(image, w, lr_other * (1 + 1e-3), alpha_grid, operator=other, **common))
        t_other, _, load_other = timed_best(lambda: jaxcfl.sweep(image, w, lr_other, alpha_grid, operator=other, **common),
                                            args.repeats)
        progress(f"[{name}]   {t_other_first:.2f} s, {t_other:.2f} s")
        add_row(f"jaxcfl.sweep (operator={other})", t_other, n_other, n_other == n_total, load_other,
                first_call_s=t_other_first, compile_s=t_other_first - t_other, monitored_first_call=cm_other.result)

    # -- the configurations the loops time: an even spread over the grid.
    lr_flat = np.repeat(lr_grid, alpha_grid.size)
    alpha_flat = np.tile(alpha_grid, lr_grid.size)
    status_flat = result.status.ravel()
    kernel0 = jax.random.normal(jax.random.key(0), (w, w), jnp.float32)  # the sweep's default initial kernel
    kernel0_np = np.asarray(kernel0)

    # -- Baseline A: Python loop over jaxcfl.integrate.
    prob = jaxcfl.make_problem(image, w, pool=pool)

    def integrate_one(lr, alpha, n_steps=steps):
        hyper = jaxcfl.make_hyper(float(lr), float(alpha), a=a, beta=beta)
        return jaxcfl.integrate(prob, kernel0, hyper, scheme="gd", model=model, steps=n_steps, record_every=n_steps)

    idx_a = subset_indices(n_total, args.subset_loop)
    progress(f"[{name}] baseline A: jaxcfl.integrate loop, {idx_a.size} configs ...")
    with CompileMeter() as cm_a:
        t_warm_a, _, _ = timed(lambda: jax.block_until_ready(integrate_one(lr_flat[0] * 1.001, alpha_flat[0]).state.kernel))

    def loop_a():
        outs = [integrate_one(lr_flat[i], alpha_flat[i]).state.kernel for i in idx_a]
        return jax.block_until_ready(outs)

    t_a, _, load_a = timed_best(loop_a, args.repeats)
    progress(f"[{name}]   {t_a:.2f} s")
    add_row(f"A: python loop, jaxcfl.integrate ({prob.operator})", t_a, idx_a.size, idx_a.size == n_total, load_a,
            first_call_s=t_warm_a, monitored_first_call=cm_a.result,
            subset_counts={s: int(np.sum(status_flat[idx_a] == s)) for s in ("stable", "restrained", "divergent")})

    # -- Baseline B: PyTorch loop, on args.torch_device (default the CPU; None: no baseline B).
    device = getattr(args, "torch_device", "cpu")
    if torch is not None and device is not None:
        impls = [TorchFFT(image_np, w, pool, model, a, beta, device=device)]
        if model == "nonlinear":
            impls.append(TorchConvAutograd(image_np, w, pool, beta, device=device))
        threads = [args.torch_threads] if args.torch_threads else sorted({os.cpu_count() or 1, 1}, reverse=True)
        candidates = [(impl, n) for impl in impls for n in threads]
        trial = {}
        trial_steps = max(1, min(steps, args.torch_trial_steps))
        idx_trial = subset_indices(n_total, 3)
        for impl, n_threads in candidates:
            # warm-up (FFT plans, allocator, thread pool), then a short trial on 3 spread configurations
            torch.set_num_threads(n_threads)
            impl.run(kernel0_np, float(lr_flat[0]), float(alpha_flat[0]), min(steps, 10))
            t, _, _ = timed(lambda: [impl.run(kernel0_np, float(lr_flat[i]), float(alpha_flat[i]), trial_steps)
                                     for i in idx_trial])
            trial[f"{impl.name.split(', ', 1)[1]}, {n_threads} thread(s)"] = t / (trial_steps * idx_trial.size)
        chosen, chosen_threads = min(candidates, key=lambda c: trial[f"{c[0].name.split(', ', 1)[1]}, {c[1]} thread(s)"])
        torch.set_num_threads(chosen_threads)
        idx_b = subset_indices(n_total, args.subset_torch)
        impl_name = f"{chosen.name} ({chosen_threads} thr)"
        progress(f"[{name}] baseline B: {impl_name}, {idx_b.size} configs "
                 f"(trial s/step: {', '.join(f'{k}: {v:.2e}' for k, v in trial.items())}) ...")

        def loop_b():
            return [chosen.run(kernel0_np, float(lr_flat[i]), float(alpha_flat[i]), steps) for i in idx_b]

        t_b, _, load_b = timed_best(loop_b, args.repeats)
        progress(f"[{name}]   {t_b:.2f} s")
        add_row(impl_name, t_b, idx_b.size, idx_b.size == n_total, load_b,
                trial_seconds_per_step=trial, torch_threads=chosen_threads, flush_denormal=not args.torch_keep_denormals,
                subset_counts={s: int(np.sum(status_flat[idx_b] == s)) for s in ("stable", "restrained", "divergent")})

        # -- correctness: the baseline against jaxcfl on one stable configuration.
        stable = np.flatnonzero(status_flat == "stable")
        if stable.size:
            i = int(stable[stable.size // 2])
            k_jax = np.asarray(integrate_one(lr_flat[i], alpha_flat[i]).state.kernel)
            k_torch = chosen.run(kernel0_np, float(lr_flat[i]), float(alpha_flat[i]), steps)
            res["check"] = dict(
                lr=float(lr_flat[i]), alpha=float(alpha_flat[i]), status="stable", baseline=chosen.name,
                rel_diff_torch_vs_integrate=rel_diff(k_torch, k_jax),
                rel_change_of_kernel=rel_diff(k_jax, kernel0_np),
                # the sweep keeps ||K|| of each run: compare it with the integrate run
                rel_diff_sweep_norm_vs_integrate=abs(float(result.metrics["final_norm"].ravel()[i])
                                                     - float(np.linalg.norm(k_jax))) / float(np.linalg.norm(k_jax)),
            )
        else:
            res["check"] = dict(note="no stable configuration in the grid; nothing to compare")

    # -- Baseline C (--torch-batch B): PyTorch with the configurations in lock-step batches of B.
    if torch is not None and device is not None and args.torch_batch:
        threads = [args.torch_threads] if args.torch_threads else sorted({os.cpu_count() or 1, 1}, reverse=True)
        idx_c = subset_indices(n_total, max(args.subset_torch_batched, args.torch_batch))
        batches = [idx_c[i:i + args.torch_batch] for i in range(0, idx_c.size, args.torch_batch)]
        stable_c = [i for i in idx_c if status_flat[i] == "stable"]
        k_ref = np.asarray(integrate_one(lr_flat[stable_c[0]], alpha_flat[stable_c[0]]).state.kernel) if stable_c else None
        trial_steps = max(1, min(steps, args.torch_trial_steps))
        for autograd in (False, True) if model == "nonlinear" else (False,):
            impl = TorchFFTBatched(image_np, w, pool, model, a, beta, device=device, autograd=autograd)
            run_batch = lambda b, n: impl.run_many(kernel0_np, lr_flat[b], alpha_flat[b], n)
            trial = {}
            for n_threads in threads:  # warm-up, then a short trial on the first batch
                torch.set_num_threads(n_threads)
                run_batch(batches[0], min(steps, 5))
                trial[n_threads] = timed(lambda: run_batch(batches[0], trial_steps))[0] / (trial_steps * batches[0].size)
            n_threads = min(trial, key=trial.get)
            torch.set_num_threads(n_threads)
            progress(f"[{name}] baseline C: {impl.name}, {n_threads} thread(s), {idx_c.size} configs in batches of "
                     f"{args.torch_batch} (trial s/config-step: {', '.join(f'{n} thr {t:.2e}' for n, t in trial.items())}) ...")
            t_c, finals, load_c = timed_best(lambda: [run_batch(b, steps) for b in batches], args.repeats)
            progress(f"[{name}]   {t_c:.2f} s")
            extra = {}
            if k_ref is not None:  # the first stable configuration of the subset, against jaxcfl.integrate
                pos = int(np.flatnonzero(idx_c == stable_c[0])[0])
                extra["rel_diff_vs_integrate"] = rel_diff(np.concatenate(finals)[pos], k_ref)
            add_row(f"{impl.name} (B={args.torch_batch}, {n_threads} thr)", t_c, idx_c.size, idx_c.size == n_total,
                    load_c, torch_threads=n_threads, torch_batch=args.torch_batch,
                    trial_seconds_per_config_step={f"{n} thread(s)": t for n, t in trial.items()}, **extra)
    if torch is not None:
        torch.set_num_threads(os.cpu_count() or 1)

    main_rate = rows[0]["config_steps_per_s"]
    for row in rows:
        row["speed_ratio_jaxcfl_over_impl"] = main_rate / row["config_steps_per_s"]
    return res


# --- Table 5 -------------------------------------------------------------------------------

TABLE5 = (("nesterov", 1e-4), ("gd", 1e-8))


def bench_table5(args) -> list[dict]:
    size, steps = args.table5_size, args.table5_steps
    image = jaxcfl.checkerboard(size)
    rows = []
    for w in args.table5_kernels:
        for scheme, lr in TABLE5:
            progress(f"[table5] empirical_bounds {scheme} lr={lr:g} kernel {w} (image {size}) ...")
            with CompileMeter() as cm:
                wall, eb, load = timed(lambda: jaxcfl.empirical_bounds(
                    image, w, lr, scheme=scheme, momentum=0.9, alpha_range=(1e3, 1e11), steps=steps,
                    theory=False, progress=False))
            progress(f"[table5]   {wall:.1f} s, alpha in ({eb.alpha_min:.4g}, {eb.alpha_max:.4g}), {eb.evaluations} runs")
            row = dict(kernel_size=w, scheme=scheme, lr=lr, momentum=0.9 if scheme == "nesterov" else None,
                       alpha_min=eb.alpha_min, alpha_max=eb.alpha_max, evaluations=eb.evaluations, rounds=eb.rounds,
                       seconds=eb.seconds, wall_s=wall, other_load=load, monitored=cm.result, notes=list(eb.notes))
            if args.table5_loop_estimate:
                # One run of the full length with jaxcfl.integrate (FFT), compiled first: the
                # per-evaluation cost of a sequential loop. Screening runs are steps/5 long,
                # so evaluations x this is an upper bound for such a loop.
                prob = jaxcfl.make_problem(image, w)
                k0 = jax.random.normal(jax.random.key(0), (w, w), jnp.float32)
                alpha = math.sqrt(eb.alpha_min * eb.alpha_max) if np.isfinite(eb.alpha_min * eb.alpha_max) else 1e7
                run = lambda f: jax.block_until_ready(jaxcfl.integrate(
                    prob, k0, jaxcfl.make_hyper(lr * f, alpha, mu=0.9), scheme=scheme, model="linear", steps=steps,
                    record_every=steps).state.kernel)
                run(1.001)
                t_one, _, _ = timed(lambda: run(1.0))
                row["integrate_one_run_s"] = t_one
                row["loop_estimate_upper_s"] = t_one * eb.evaluations
            rows.append(row)
    return rows


# --- output ---------------------------------------------------------------------------------

def _fmt_s(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def _fmt_load(x) -> str:
    return "-" if x is None else f"{x:.2f}"


_IMAGE_WORDS = {"checkerboard": "checkerboard", "random": "N(0, 1) image (full rank)"}


def render_workload(res: dict) -> str:
    lines = [
        f"Workload {res['workload']}: model={res['model']}, pool={res['pool']}, scheme=gd (forward Euler), float32",
        f"  {res['image']}x{res['image']} {_IMAGE_WORDS[res.get('image_kind', 'checkerboard')]}, "
        f"{res['kernel_size']}x{res['kernel_size']} kernel, "
        f"{res['grid'][0]} x {res['grid'][1]} grid = {res['configs']} configs x {res['steps']} steps, "
        f"lr {res['lr_range'][0]:g}..{res['lr_range'][1]:g}, alpha {res['alpha_range'][0]:g}..{res['alpha_range'][1]:g}",
    ]
    head = (f"  {'implementation':<52} {'configs':>7} {'config-steps/s':>14} {'full-grid wall s':>22} "
            f"{'jaxcfl/impl':>11} {'other load':>10}")
    lines += [head, "  " + "-" * (len(head) - 2)]
    for row in res["rows"]:
        mark = "measured" if row["full_grid_measured"] else "extrapolated"
        lines.append(f"  {row['implementation']:<52} {row['configs_timed']:>7} {row['config_steps_per_s']:>14.4g} "
                     f"{_fmt_s(row['full_grid_s']) + ' (' + mark + ')':>22} {row['speed_ratio_jaxcfl_over_impl']:>11.3g} "
                     f"{_fmt_load(row['other_load']):>10}")
    c = res["compile"]
    m = c["monitored_first_call"]
    lines.append(f"  jaxcfl.sweep compile: first call {c['first_call_s']:.2f} s ({c['first_call_configs']} configs) - "
                 f"steady share {c['steady_share_s']:.2f} s = {c['compile_s']:.2f} s; jax.monitoring: "
                 f"trace {m['trace_s']:.2f} + lower {m['lower_s']:.2f} + XLA {m['xla_compile_s']:.2f} s "
                 f"({m['xla_programs']} programs); steady call recompiled {c['monitored_steady_call']['xla_programs']} "
                 f"programs ({c['monitored_steady_call']['total_s']:.2f} s)")
    lines.append("    (first - steady is within timing noise when the run dominates the call; the jax.monitoring sum "
                 "is measured directly)")
    for row in res["rows"][1:]:
        if "compile_s" in row:
            lines.append(f"  {row['implementation']}: first call {row['first_call_s']:.2f} s, compile ~ {row['compile_s']:.2f} s")
        elif row.get("first_call_s") is not None:
            lines.append(f"  {row['implementation']}: first (compiling) call {row['first_call_s']:.2f} s, "
                         f"not in the timing")
    for row in res["rows"]:
        if "trial_seconds_per_step" in row:
            trial = ", ".join(f"{k} {v * 1e6:.0f} us/step" for k, v in row["trial_seconds_per_step"].items())
            lines.append(f"  torch variant picked by a short trial (3 configs): {trial}; "
                         f"flush denormals {'on' if row['flush_denormal'] else 'off'}")
        if "subset_counts" in row:
            sc = row["subset_counts"]
            lines.append(f"  {row['implementation']}: subset of {row['configs_timed']} evenly spread configs "
                         f"(stable {sc['stable']}, restrained {sc['restrained']}, divergent {sc['divergent']}), "
                         f"extrapolated linearly to {res['configs']}")
    counts = res["counts"]
    lines.append(f"  sweep statuses: stable {counts['stable']}, restrained {counts['restrained']}, divergent {counts['divergent']}")
    chk = res.get("check", {})
    for row in res["rows"]:
        if "rel_diff_vs_integrate" in row:
            lines.append(f"  {row['implementation']}: final K rel. diff vs jaxcfl.integrate on a stable configuration "
                         f"{row['rel_diff_vs_integrate']:.2e}")
    if "rel_diff_torch_vs_integrate" in chk:
        lines.append(f"  check (lr={chk['lr']:.4g}, alpha={chk['alpha']:.4g}, stable): final K rel. diff torch vs jaxcfl.integrate "
                     f"{chk['rel_diff_torch_vs_integrate']:.2e} (K moved {chk['rel_change_of_kernel']:.3g} relative to K0); "
                     f"sweep ||K|| vs integrate {chk['rel_diff_sweep_norm_vs_integrate']:.2e}")
    elif chk:
        lines.append(f"  check: {chk.get('note')}")
    lines.append("  jaxcfl/impl = config-steps/s of the first row / this row (>1: jaxcfl.sweep is faster); "
                 "other load = CPU share of other processes during the timing")
    return "\n".join(lines)


def render_table5(rows: list[dict], size: int, steps: int) -> str:
    lines = [f"Table 5 rows: jaxcfl.empirical_bounds, {size}x{size} checkerboard, linear model, {steps} steps, "
             "alpha_range (1e3, 1e11), theory=False (time includes compilation)"]
    head = (f"  {'scheme':<9} {'lr':>6} {'kernel':>6} {'alpha_min':>10} {'alpha_max':>10} {'runs':>5} {'seconds':>8} "
            f"{'compile s':>9} {'programs':>8} {'runs/s':>7} {'loop est. s':>11} {'est./jaxcfl':>11} {'other load':>10}")
    lines += [head, "  " + "-" * (len(head) - 2)]
    for r in rows:
        est = r.get("loop_estimate_upper_s")
        est_s = "-" if est is None else f"<= {est:.0f}"
        est_ratio = "-" if est is None else f"<= {est / r['seconds']:.3g}"
        lines.append(f"  {r['scheme']:<9} {r['lr']:>6g} {r['kernel_size']:>6} {r['alpha_min']:>10.4g} {r['alpha_max']:>10.4g} "
                     f"{r['evaluations']:>5} {r['seconds']:>8.1f} {r['monitored']['total_s']:>9.1f} {r['monitored']['xla_programs']:>8} "
                     f"{r['evaluations'] / r['seconds']:>7.3g} {est_s:>11} {est_ratio:>11} {_fmt_load(r['other_load']):>10}")
    lines.append("  compile s = trace + lowering + XLA compile reported by jax.monitoring during the call "
                 "(programs = XLA compilations);")
    lines.append("  loop est. = runs x the time of one full-length jaxcfl.integrate run (an upper bound: screening runs are "
                 "steps/5 long)")
    notes = sorted({n for r in rows for n in r["notes"]})
    for n in notes:
        lines.append(f"  note: {n}")
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=32, help="image side N (default 32)")
    p.add_argument("--image", choices=("checkerboard", "random"), default="checkerboard",
                   help="the workloads' image: the checkerboard (rank 1: 'auto' picks separable products; default) "
                        "or N(0, 1) noise (full rank: 'auto' picks the FFT)")
    p.add_argument("--image-seed", type=int, default=0, help="numpy seed of --image random (default 0)")
    p.add_argument("--kernel-size", type=int, default=8, help="kernel side w (default 8)")
    p.add_argument("--grid", type=int, default=64, help="grid points per axis (default 64: 4096 configurations)")
    p.add_argument("--steps", type=int, default=1000, help="iterations per configuration (default 1000)")
    p.add_argument("--chunk-size", type=int, default=256, help="jaxcfl.sweep chunk_size (default 256)")
    p.add_argument("--workloads", nargs="*", choices=("linear", "nonlinear"), default=["linear", "nonlinear"],
                   help="workloads to run (default both; give the flag with no value to run only --table5)")
    p.add_argument("--first-call", choices=("full", "chunk"), default="full",
                   help="the compiling first jaxcfl.sweep call runs the full grid (default) or one chunk's worth of it")
    p.add_argument("--other-operators", "--linear-fft", dest="linear_fft", choices=("chunk", "full", "skip"), default="chunk",
                   help="time jaxcfl.sweep with the operators 'auto' did not pick on one chunk (default), the full grid, or skip")
    p.add_argument("--subset-loop", type=int, default=32, help="configurations timed for baseline A (default 32)")
    p.add_argument("--subset-torch", type=int, default=12, help="configurations timed for baseline B (default 12)")
    p.add_argument("--torch-trial-steps", type=int, default=50, help="steps of the trial that picks the torch variant")
    p.add_argument("--torch-batch", type=int, default=0,
                   help="also time baseline C: PyTorch with B configurations in lock-step (torch.fft, explicit gradient "
                        "and, for the nonlinear model, autograd), each at --torch-threads or the faster of "
                        "os.cpu_count() and 1 thread in a short trial (default 0: off)")
    p.add_argument("--subset-torch-batched", type=int, default=64,
                   help="configurations timed for baseline C (default 64, at least one batch)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch threads for baseline B (default: the faster of os.cpu_count() and 1 in the trial)")
    p.add_argument("--torch-keep-denormals", action="store_true",
                   help="do not torch.set_flush_denormal(True) (XLA on CPU flushes denormals; torch by default does not)")
    p.add_argument("--repeats", type=int, default=1,
                   help="time each steady-state run (the sweeps, loops A and B, baseline C) this many times and keep "
                        "the fastest (default 1)")
    p.add_argument("--table5", action="store_true", help="also time jaxcfl.empirical_bounds for the Table 5 rows (slow)")
    p.add_argument("--table5-kernels", type=int, nargs="+", default=None, help="kernel sizes (default 16 32 64)")
    p.add_argument("--table5-size", type=int, default=None, help="checkerboard side for --table5 (default 256)")
    p.add_argument("--table5-steps", type=int, default=None, help="steps per run for --table5 (default 1000)")
    p.add_argument("--no-table5-loop-estimate", dest="table5_loop_estimate", action="store_false",
                   help="skip the one-run jaxcfl.integrate timing behind the loop estimate")
    p.add_argument("--quick", action="store_true", help="smoke test: 8x8 grid, 100 steps, small subsets")
    p.add_argument("--json", action="store_true", help="print pure JSON on stdout (progress and tables to stderr)")
    args = p.parse_args(argv)
    if args.quick:
        args.grid, args.steps = min(args.grid, 8), min(args.steps, 100)
        args.subset_loop, args.subset_torch = min(args.subset_loop, 4), min(args.subset_torch, 2)
        args.subset_torch_batched = min(args.subset_torch_batched, 8)
        args.torch_trial_steps = min(args.torch_trial_steps, 20)
    if args.table5_kernels is None:
        args.table5_kernels = [8, 16] if args.quick else [16, 32, 64]
    if args.table5_size is None:
        args.table5_size = 64 if args.quick else 256
    if args.table5_steps is None:
        args.table5_steps = 100 if args.quick else 1000
    return args


def main(argv=None) -> int:
    global _OUT
    args = parse_args(argv)
    if args.json:
        _OUT = sys.stderr
    if torch is not None:
        torch.set_num_threads(os.cpu_count() or 1)
        torch.set_flush_denormal(not args.torch_keep_denormals)
    start = time.perf_counter()
    info = machine_info()
    log(f"machine: {info['cpu_model']}, nproc {info['nproc']}, {info['platform']}")
    log(f"versions: python {info['python']}, jax {info['jax']} ({info['jax_backend']}: {', '.join(info['jax_devices'])}), "
        f"jaxcfl {info['jaxcfl']}, numpy {info['numpy']}, torch {info['torch']} (threads {info['torch_threads']})")
    log(f"loadavg at start: {info['loadavg_at_start']}")
    log("")
    payload = {"machine": info, "args": vars(args), "workloads": {}, "table5": None}
    for name, wl in workloads(args).items():
        if name not in args.workloads:
            continue
        res = bench_workload(name, wl, args)
        payload["workloads"][name] = res
        log(render_workload(res))
        log("")
    if args.table5:
        rows = bench_table5(args)
        payload["table5"] = rows
        log(render_table5(rows, args.table5_size, args.table5_steps))
        log("")
    payload["total_s"] = time.perf_counter() - start
    payload["loadavg_at_end"] = loadavg()
    log(f"total {payload['total_s']:.0f} s; loadavg at end: {payload['loadavg_at_end']}")
    if args.json:
        print(json.dumps(_strict(payload), indent=1, default=_json_default, allow_nan=False))
    return 0


def _strict(x):
    """Non-finite floats become null (pure JSON)."""
    if isinstance(x, dict):
        return {str(k): _strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


if __name__ == "__main__":
    sys.exit(main())
