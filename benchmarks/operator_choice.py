"""Benchmark: FFT against separable correlations, to calibrate ``operator="auto"``.

For an image of rank ``r`` the nonlinear gradient (two correlations and the
Swish terms) costs ``r (w^2 M + w M^2)`` multiply-adds per correlation with the
separable Toeplitz products, against four ``N x N`` FFTs. This script times
``jaxcfl.pde.gradient(..., "nonlinear")`` both ways, batched (``vmap`` over ``--batch``
configurations, ``--steps`` gradient steps inside one ``jit``), on random images of
exact rank ``r``, and prints the speed ratio FFT time / separable time against
``work = r (w^2 M + w M^2) / (N^2 log2 N^2)``. The break-even (ratio 1) sets
``jaxcfl.pde._operators.FFT_COST_FACTOR``; the last column says what ``make_problem``'s
``operator="auto"`` picks (``separable_pays`` with the current factor, and at most
``AUTO_MAX_RANK`` factors).

    PYTHONPATH=src python benchmarks/operator_choice.py [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

try:
    import jaxcfl  # noqa: F401
except ImportError:  # pragma: no cover - running from a checkout
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import jax
import jax.numpy as jnp
import jaxcfl
from jaxcfl.pde import _operators as ops
from jaxcfl.pde import _problem as pb
from _machine import OtherLoad, machine_info

CASES = [(256, 16), (256, 32), (256, 64), (128, 5), (64, 8)]
RANKS = (1, 2, 4, 8, 16)


def seconds_per_config_step(prob, batch, steps, repeats, rng):
    w = prob.kernel_size
    kernels = jnp.asarray(rng.normal(size=(batch, w, w)) * 1e-3, prob.dtype)
    hyper = jaxcfl.make_hyper(jnp.full(batch, 1e-6), jnp.full(batch, 1.0))
    grads = jax.vmap(lambda k, h: jaxcfl.pde.gradient(prob, k, h, "nonlinear"))
    run = jax.jit(lambda k, h: jax.lax.fori_loop(0, steps, lambda i, kk: kk - 1e-6 * grads(kk, h), k))
    run(kernels, hyper).block_until_ready()  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run(kernels, hyper).block_until_ready()
        times.append(time.perf_counter() - t)
    return min(times) / (batch * steps)


def auto_is_faster(row: dict) -> bool:
    """Whether ``operator="auto"`` picked the faster path in a row of :func:`measure`."""
    return (row["ratio"] < 1) == (row["auto"] == "fft")


def measure(cases, ranks, batch, steps, repeats, rng, out=sys.stdout) -> tuple[list[dict], float | None]:
    """Time the FFT and separable gradients for every ``(N, w)`` of ``cases`` and rank of ``ranks``
    (one FFT timing per case), printing a table row per rank to ``out`` (``None``: silent).

    Returns the rows and the CPU share other processes used meanwhile. A row: ``N, w, rank, fft_us,
    separable_us`` (microseconds per config-step), ``ratio`` (FFT time over separable time), ``work``
    and ``auto`` (what ``make_problem(image, w)`` picks).
    """
    say = (lambda *a, **k: None) if out is None else (lambda *a, **k: print(*a, **k, file=out, flush=True))
    say(f"{'N':>4} {'w':>3} {'fft us/cs':>10} {'r':>3} {'sep us/cs':>10} {'fft/sep':>8} {'work':>6} {'auto':>10}")
    rows = []
    load = OtherLoad().start()
    for n, w in cases:
        m = n - w + 1
        base = rng.normal(size=(n, 64)) @ rng.normal(size=(64, n))
        fft = seconds_per_config_step(jaxcfl.make_problem(base.astype(np.float32), w, operator="fft"),
                                      batch, steps, repeats, rng)
        for r in ranks:
            image = (rng.normal(size=(n, r)) @ rng.normal(size=(r, n))).astype(np.float32)
            prob = jaxcfl.make_problem(image, w, operator="separable", max_rank=r)
            assert prob.rank == r
            sep = seconds_per_config_step(prob, batch, steps, repeats, rng)
            work = r * (w * w * m + w * m * m) / (n * n * np.log2(n * n))
            auto = jaxcfl.make_problem(image, w).operator  # what operator="auto" picks for this image
            rows.append(dict(N=n, w=w, rank=r, fft_us=1e6 * fft, separable_us=1e6 * sep, ratio=fft / sep,
                             work=work, auto=auto))
            say(f"{n:>4} {w:>3} {1e6 * fft:>10.1f} {r:>3} {1e6 * sep:>10.1f} {fft / sep:>8.2f} {work:>6.2f} "
                f"{auto:>10}" + ("" if auto_is_faster(rows[-1]) else "  <- auto picks the slower path"))
    return rows, load.stop()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8, help="configurations per call (default 8, the sweep engine's group)")
    p.add_argument("--steps", type=int, default=20, help="gradient steps per call (default 20)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls; the fastest is kept (default 3)")
    p.add_argument("--json", action="store_true", help="print JSON on stdout (the table goes to stderr)")
    args = p.parse_args(argv)
    out = sys.stderr if args.json else sys.stdout
    rng = np.random.default_rng(0)
    info = machine_info()
    print(f"cpu: {info['cpu_model']} (nproc {info['nproc']}), jax {info['jax']} ({info['jax_backend']}); "
          f"FFT_COST_FACTOR = {ops.FFT_COST_FACTOR}, AUTO_MAX_RANK = {ops.AUTO_MAX_RANK}", file=out)
    rows, other = measure(CASES, RANKS, args.batch, args.steps, args.repeats, rng, out)
    wrong = [r for r in rows if not auto_is_faster(r)]
    print(f"auto picks the faster path in {len(rows) - len(wrong)} of {len(rows)} cases; "
          f"other processes used {100 * (other or 0):.0f}% of the CPUs", file=out)
    if args.json:
        json.dump(dict(machine=info, fft_cost_factor=ops.FFT_COST_FACTOR, batch=args.batch, steps=args.steps,
                       rows=rows, other_load=other), sys.stdout, indent=1)
        print()


if __name__ == "__main__":
    main()
