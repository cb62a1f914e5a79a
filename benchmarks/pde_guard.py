"""Benchmark: the cost of the CFL guard on the PDE (the scheme ``guarded_gd``) against forward Euler.

Figure 4's column (256 x 256 checkerboard, 32 x 32 kernel, nonlinear model, mean pooling, alpha = 20,
the paper's eight learning rates, 1000 iterations, k = 1 vs 3, every iteration recorded): one
:func:`jaxcfl.sweep` call per scheme and schedule, as ``jaxcfl reproduce pde-guard`` makes it. Each is
called ``--repeats + 1`` times in the same process with a slightly different alpha (same shapes: the
compiled program is reused); the first call's excess over the median of the others is the compile
time, reported apart. The ratio is ``guarded / forward Euler`` of the medians.
Run ``python benchmarks/pde_guard.py --help``; results are in ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import jaxcfl  # noqa: E402
from _machine import machine_info  # noqa: E402
from jaxcfl.experiments.fig4 import PAPER_ALPHA, PAPER_LR  # noqa: E402

VARIANTS = {
    "gd": ("gd", None),
    "guarded (every 10, warmup 20)": ("guarded_gd", jaxcfl.GuardSchedule()),
    "guarded (every 20, warmup 10)": ("guarded_gd", jaxcfl.GuardSchedule(every=20, warmup=10)),
}


def time_variant(image: np.ndarray, scheme: str, guard, *, size: int, kernel: int, steps: int, repeats: int) -> dict:
    seconds = []
    for rep in range(repeats + 1):
        start = time.perf_counter()
        jaxcfl.sweep(image, kernel, list(PAPER_LR), [PAPER_ALPHA * (1 + 1e-6 * rep)], scheme=scheme, guard=guard,
                     model="nonlinear", pool="mean", label=1.0, compare_k=3.0, steps=steps, record_points=steps,
                     chunk_size=len(PAPER_LR), progress=False)
        seconds.append(time.perf_counter() - start)
    run = statistics.median(seconds[1:])
    return {"seconds": run, "compile_seconds": seconds[0] - run, "all_seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--kernel-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    image = np.asarray(jaxcfl.checkerboard(args.size), np.float64)
    rows = {name: time_variant(image, scheme, guard, size=args.size, kernel=args.kernel_size, steps=args.steps,
                               repeats=args.repeats) for name, (scheme, guard) in VARIANTS.items()}
    base = rows["gd"]["seconds"]
    for row in rows.values():
        row["ratio_vs_gd"] = row["seconds"] / base
    if args.json:
        print(json.dumps({"machine": machine_info(), "settings": vars(args), "rows": rows}, indent=1))
        return 0
    print(f"Figure 4's column, {len(PAPER_LR)} lr x k = 1 vs 3, {args.steps} steps, {args.size}/{args.kernel_size}")
    print(f"{'variant':<32} {'run s':>7} {'compile s':>10} {'x gd':>6}")
    for name, row in rows.items():
        print(f"{name:<32} {row['seconds']:7.2f} {row['compile_seconds']:10.2f} {row['ratio_vs_gd']:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
