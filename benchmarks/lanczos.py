"""Benchmark: ``jaxcfl.lanczos_extremes`` against the iteration count, with NumPy and SciPy baselines.

Operators (float32, as ``jaxcfl.sharpness`` runs them):

``diagonal``
    ``v -> d * v`` with ``d = linspace(-1, 3, n)``, ``n = 55,210`` (the size the original version was timed at):
    the mat-vec is trivial, so the time is the solver's own work, the
    re-orthogonalisation against the stored basis.
``dense``
    ``v -> A v`` with a random symmetric ``4096 x 4096`` matrix (the size of the
    ``w = 64`` normal matrix of the dense operator): the mat-vec dominates.

For each iteration count (``--iterations``, default 20 64 128 256) it times, in one run:

``jaxcfl``
    ``jaxcfl.lanczos_extremes(matvec, start, iterations=m)`` (a ``jax.tree_util.Partial``
    mat-vec, so one compiled program per shape), steady state: the best of ``--repeats``
    calls after a first call. Compile time is reported separately: the first call minus
    the steady time, and the trace + lowering + XLA compile durations that
    ``jax.monitoring`` reports.
``numpy``
    the same algorithm in a NumPy loop (best of ``--repeats``): ``m`` steps, two classical
    Gram-Schmidt passes against the filled rows of the basis (dynamic shapes: on average
    half the rows that the compiled loop, with its fixed-shape basis, multiplies), restart
    on breakdown, ``eigh`` of the tridiagonal matrix. ``numpy / jaxcfl > 1``: jaxcfl is faster.
``eigsh`` (if SciPy is installed)
    ``scipy.sparse.linalg.eigsh`` on a ``LinearOperator`` (ARPACK, implicitly restarted
    Lanczos), both ends (``k=2, which="BE"``), ``ncv = m`` Lanczos vectors, run until its
    relative accuracy reaches the one jaxcfl's ``m`` steps reached (``tol`` = the larger
    ``residual / |Ritz value|`` of the two ends). ARPACK cannot stop after exactly ``m``
    steps and return its estimates, so this is time to equal accuracy; its mat-vec count is
    printed. ``eigsh / jaxcfl > 1``: jaxcfl is faster.

``--before FILE`` (optional)
    ``lanczos_extremes`` of an older copy of ``jaxcfl/_core/spectral.py`` (for example
    ``git show REV:src/jaxcfl/_core/spectral.py > old.py``; ``src/jaxcfl/spectral.py`` before fb1e471), timed alternately with the current
    one, call by call, so that both see the same load: ``before / jaxcfl > 1`` means the
    current version is faster.

``--hvp`` (a separate run)
    Hessian-vector products of a mean loss over ``N`` examples (a one-hidden-layer tanh
    network, logistic loss, float32), in one call and accumulated over chunks of ``b``
    examples (the ``physical_batch_size`` of ``jaxcfl.sharpness``): the steady time per product,
    XLA's temporary memory of the compiled product, the relative difference to the
    one-call product, and the steady time of ``jaxcfl.sharpness`` (``--hvp-iterations``
    Lanczos steps) with the same chunks.

The Ritz values of the NumPy loop and of jaxcfl agree to rounding (``ritz diff``, relative).
Other processes may share the CPU: each row carries the fraction of all CPUs that *other*
processes used meanwhile (``other``; 0.5 = one core of two).

Usage::

    python benchmarks/lanczos.py              # about 2 minutes on 2 cores
    python benchmarks/lanczos.py --quick      # smoke test (seconds)
    python benchmarks/lanczos.py --json > out.json
    python benchmarks/lanczos.py --before old_spectral.py   # before/after ratios in one run
    python benchmarks/lanczos.py --hvp        # chunked against one-call Hessian-vector products
"""

from __future__ import annotations

import argparse
import importlib.util
import json
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
from jax.tree_util import Partial

from _machine import OtherLoad, machine_info
from jaxcfl._core.spectral import lanczos_extremes

try:
    from jaxcfl._core.spectral import BREAKDOWN
except ImportError:  # jaxcfl before the rounding floor (to time the previous version: before/after ratios)
    BREAKDOWN = 64

try:
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh
except ImportError:  # pragma: no cover
    eigsh = None

DIAGONAL_N = 55_210
DENSE_N = 4096

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_log: list[float] = []


def _listener(event: str, duration: float, **_) -> None:
    if event in _COMPILE_EVENTS:
        _compile_log.append(duration)


def operators(rng: np.random.Generator, quick: bool):
    """``(name, n, jax mat-vec, numpy mat-vec)`` of the two operators."""
    n = 4096 if quick else DIAGONAL_N
    d = np.linspace(-1.0, 3.0, n).astype(np.float32)
    yield "diagonal", n, Partial(jnp.multiply, jnp.asarray(d)), lambda v: d * v
    n = 1024 if quick else DENSE_N
    g = rng.standard_normal((n, n), dtype=np.float32)
    a = (g + g.T) / np.float32(2 * np.sqrt(n))
    yield "dense", n, Partial(jnp.dot, jnp.asarray(a)), lambda v: a @ v


def numpy_lanczos(matvec, start: np.ndarray, iterations: int, seed: int = 0):
    """The same Lanczos as ``jaxcfl.lanczos_extremes`` in a NumPy loop: ``(ritz, residuals)``."""
    n, dtype = start.size, start.dtype
    eps = np.finfo(dtype).eps
    rng = np.random.default_rng(seed)
    basis = np.zeros((iterations + 1, n), dtype)
    basis[0] = start / np.linalg.norm(start)
    alphas, betas, scale = np.zeros(iterations, dtype), np.zeros(iterations, dtype), 0.0
    for j in range(iterations):
        q, filled = basis[j], basis[: j + 1]
        w = matvec(q)
        alphas[j] = q @ w
        for _ in range(2):
            w = w - (filled @ w) @ filled
        beta = np.linalg.norm(w)
        scale = max(scale, abs(alphas[j]) + beta)
        if beta <= BREAKDOWN * eps * scale:  # breakdown: a fresh direction orthogonal to the basis
            w = rng.standard_normal(n).astype(dtype)
            for _ in range(2):
                w = w - (filled @ w) @ filled
            basis[j + 1], betas[j] = w / np.linalg.norm(w), 0.0
        else:
            basis[j + 1], betas[j] = w / beta, beta
    ritz, vecs = np.linalg.eigh(np.diag(alphas) + np.diag(betas[:-1], 1) + np.diag(betas[:-1], -1))
    return ritz, np.abs(betas[-1] * vecs[-1, :])


def load_before(path: str):
    """The module of an older copy of ``jaxcfl/_core/spectral.py`` (it imports only JAX and jaxcfl)."""
    spec = importlib.util.spec_from_file_location("spectral_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def best_of(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def run_eigsh(np_matvec, n: int, start: np.ndarray, ncv: int, tol: float) -> dict:
    count = [0]

    def mv(v):
        count[0] += 1
        return np_matvec(np.asarray(v, np.float32).ravel())

    op = LinearOperator((n, n), matvec=mv, dtype=np.float32)
    t = time.perf_counter()
    try:
        vals = eigsh(op, k=2, which="BE", ncv=max(ncv, 4), tol=tol, v0=start, maxiter=10_000,
                     return_eigenvectors=False)
        converged = True
    except ArpackNoConvergence as err:
        vals, converged = err.eigenvalues, False
    return dict(seconds=time.perf_counter() - t, matvecs=count[0], converged=converged,
                minimum=float(np.min(vals)) if len(vals) else None, maximum=float(np.max(vals)) if len(vals) else None)


def hvp_loss(params, x, y):
    """Mean logistic loss of a one-hidden-layer tanh network (the ``--hvp`` benchmark's loss)."""
    return jnp.mean(jax.nn.softplus(-y * (jnp.tanh(x @ params["W"].T) @ params["v"])))


def hvp_rows(examples: int, chunks: list[int], iterations: int, repeats: int, out) -> list[dict]:
    """Chunked against one-call Hessian-vector products (``--hvp``): one row per chunk size."""
    from jax.flatten_util import ravel_pytree

    from jaxcfl._core.curvature import _ChunkedHVP, _hvp, sharpness

    rng = np.random.default_rng(0)
    features, hidden = 64, 256
    x = jnp.asarray(rng.standard_normal((examples, features)), jnp.float32)
    y = jnp.asarray(np.sign(rng.standard_normal(examples)), jnp.float32)
    params = {"W": jnp.asarray(rng.standard_normal((hidden, features)) / np.sqrt(features), jnp.float32),
              "v": jnp.asarray(rng.standard_normal(hidden) / np.sqrt(hidden), jnp.float32)}
    n = ravel_pytree(params)[0].size
    vec = jnp.asarray(rng.standard_normal(n), jnp.float32)
    loss_fn, alpha = Partial(hvp_loss), jnp.float32(0.0)
    print(f"hvp: N = {examples} examples, {n} parameters; sharpness with {iterations} iterations", file=out)
    print(f"{'chunk':>6} {'compile s':>9} {'hvp ms':>8} {'temp MiB':>9} {'rel diff':>9} {'sharpness s':>11} {'other':>5}",
          file=out, flush=True)
    rows, whole = [], None
    for chunk in [None, *chunks]:
        load = OtherLoad().start()
        hvp = _hvp if chunk is None else _ChunkedHVP(chunk)
        fn = jax.jit(lambda p, x, y, v, hvp=hvp: hvp(loss_fn, p, (x, y), alpha, v))
        t = time.perf_counter()
        compiled = fn.lower(params, x, y, vec).compile()
        compile_s = time.perf_counter() - t
        stats = compiled.memory_analysis()
        temp = None if stats is None else stats.temp_size_in_bytes
        steady, result = best_of(lambda c=compiled: c(params, x, y, vec).block_until_ready(), repeats)
        whole = result if whole is None else whole
        diff = float(jnp.max(jnp.abs(result - whole)) / jnp.max(jnp.abs(whole)))
        sharp = lambda b=chunk: sharpness(hvp_loss, params, x, y, iterations=iterations, physical_batch_size=b)
        sharp()  # compile
        sharp_s, value = best_of(sharp, repeats)
        row = dict(chunk=chunk, examples=examples, parameters=n, compile_s=compile_s, hvp_s=steady,
                   temp_bytes=temp, rel_diff=diff, sharpness_s=sharp_s, sharpness=value, other_load=load.stop())
        print(f"{'all' if chunk is None else chunk:>6} {compile_s:>9.2f} {1e3 * steady:>8.1f} "
              f"{'-' if temp is None else f'{temp / 2**20:.1f}':>9} {diff:>9.1e} {sharp_s:>11.3f} "
              f"{100 * (row['other_load'] or 0):>4.0f}%", file=out, flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, nargs="+", default=[20, 64, 128, 256])
    p.add_argument("--repeats", type=int, default=3,
                   help="timed calls (jaxcfl: after the first) of jaxcfl and numpy; the best is kept")
    p.add_argument("--quick", action="store_true", help="small operators, 20 and 64 iterations, one repeat")
    p.add_argument("--no-eigsh", action="store_true", help="skip the SciPy baseline")
    p.add_argument("--before", metavar="FILE", help="an older jaxcfl/_core/spectral.py to time alongside (before/after)")
    p.add_argument("--json", action="store_true", help="print JSON on stdout (the table goes to stderr)")
    p.add_argument("--hvp", action="store_true", help="only: chunked against one-call Hessian-vector products")
    p.add_argument("--hvp-examples", type=int, default=16_384, help="--hvp: examples N (default 16384)")
    p.add_argument("--hvp-chunks", type=int, nargs="+", default=[4096, 1024, 1000, 256],
                   help="--hvp: chunk sizes (physical_batch_size)")
    p.add_argument("--hvp-iterations", type=int, default=20, help="--hvp: Lanczos iterations of the sharpness")
    args = p.parse_args(argv)
    if args.hvp:
        out = sys.stderr if args.json else sys.stdout
        info = machine_info()
        print(f"cpu: {info['cpu_model']} (nproc {info['nproc']}), jax {info['jax']} ({info['jax_backend']}); float32",
              file=out)
        rows = hvp_rows(args.hvp_examples, args.hvp_chunks, args.hvp_iterations, args.repeats, out)
        if args.json:
            json.dump(dict(machine=info, hvp=rows), sys.stdout, indent=1)
            print()
        return
    old = load_before(args.before) if args.before else None
    if args.quick:
        args.iterations, args.repeats = [20, 64], 1
    out = sys.stderr if args.json else sys.stdout
    jax.monitoring.register_event_duration_secs_listener(_listener)
    info = machine_info()
    use_eigsh = eigsh is not None and not args.no_eigsh
    print(f"cpu: {info['cpu_model']} (nproc {info['nproc']}), jax {info['jax']} ({info['jax_backend']}), "
          f"numpy {info['numpy']}, scipy {'(not used)' if not use_eigsh else __import__('scipy').__version__}; "
          f"float32", file=out)
    head = (f"{'operator':>8} {'n':>6} {'iters':>5} {'compile s':>9} {'(monitor)':>9} {'jaxcfl s':>9} {'ms/iter':>8} "
            f"{'numpy s':>8} {'np/jax':>7} {'ritz diff':>9}")
    if use_eigsh:
        head += f" {'eigsh s':>8} {'matvecs':>7} {'eigsh/jax':>9}"
    if old is not None:
        head += f" {'before s':>8} {'before/jax':>10}"
    print(head + f" {'other':>5}", file=out, flush=True)
    rng = np.random.default_rng(0)
    rows = []
    start_all = time.perf_counter()
    for name, n, matvec, np_matvec in operators(rng, args.quick):
        start = rng.standard_normal(n).astype(np.float32)
        for m in args.iterations:
            m = min(m, n)
            load = OtherLoad().start()
            before = len(_compile_log)
            t = time.perf_counter()
            first = lanczos_extremes(matvec, jnp.asarray(start), iterations=m)
            first_s = time.perf_counter() - t
            monitored = sum(_compile_log[before:])
            call = lambda f=lanczos_extremes: f(matvec, jnp.asarray(start), iterations=m)
            if old is None:
                steady, ext = best_of(call, args.repeats)
            else:  # alternate the two versions call by call: both see the same load
                old_ext = call(old.lanczos_extremes)  # compile
                pairs = [(best_of(call, 1), best_of(lambda: call(old.lanczos_extremes), 1)) for _ in range(args.repeats)]
                steady, ext = min(a[0] for a, _ in pairs), pairs[0][0][1]
                before_s = min(b[0] for _, b in pairs)
            assert ext == first
            np_s, (ritz, _) = best_of(lambda: numpy_lanczos(np_matvec, start, m), args.repeats)
            scale = max(abs(ritz[0]), abs(ritz[-1]))
            diff = float(max(abs(ritz[0] - ext.minimum), abs(ritz[-1] - ext.maximum)) / scale)
            row = dict(operator=name, n=n, iterations=m, first_call_s=first_s, compile_s=first_s - steady,
                       monitored_compile_s=monitored, jaxcfl_s=steady, numpy_s=np_s, numpy_over_jaxcfl=np_s / steady,
                       ritz_rel_diff=diff, minimum=ext.minimum, maximum=ext.maximum,
                       residual_min=ext.residual_min, residual_max=ext.residual_max,
                       rounding_floor=getattr(ext, "rounding_floor", None))
            line = (f"{name:>8} {n:>6} {m:>5} {row['compile_s']:>9.2f} {monitored:>9.2f} {steady:>9.3f} "
                    f"{1e3 * steady / m:>8.2f} {np_s:>8.3f} {np_s / steady:>7.2f} {diff:>9.1e}")
            if use_eigsh:
                tol = float(max(ext.residual_min / abs(ext.minimum), ext.residual_max / abs(ext.maximum)))
                e = run_eigsh(np_matvec, n, start, min(m, n - 1), tol)
                row.update(eigsh_tol=tol, eigsh_s=e["seconds"], eigsh_matvecs=e["matvecs"],
                           eigsh_converged=e["converged"], eigsh_over_jaxcfl=e["seconds"] / steady)
                line += f" {e['seconds']:>8.3f} {e['matvecs']:>7} {e['seconds'] / steady:>9.2f}"
                if not e["converged"]:
                    line += " (eigsh: no convergence)"
            if old is not None:
                row.update(before_s=before_s, before_over_jaxcfl=before_s / steady, before_minimum=old_ext.minimum,
                           before_maximum=old_ext.maximum)
                line += f" {before_s:>8.3f} {before_s / steady:>10.2f}"
            row["other_load"] = load.stop()
            line += f" {100 * (row['other_load'] or 0):>4.0f}%"
            print(line, file=out, flush=True)
            rows.append(row)
    total = time.perf_counter() - start_all
    print(f"total {total:.0f} s", file=out)
    if args.json:
        json.dump(dict(machine=info, rows=rows, total_s=total), sys.stdout, indent=1)
        print()


if __name__ == "__main__":
    main()
