"""Benchmark: SGD steps of a conv net inside ``lax.scan`` against the same steps as separate calls.

XLA's CPU backend runs the gradient convolutions of ``lax.conv_general_dilated`` very slowly
inside a loop body (jax-ml/jax#12868): it rewrites them into the canonical ``b01f_01io->b01f``
form that its Eigen/YNNPACK kernels take only in the entry computation, and emits the rest as
a naive loop nest. :func:`jaxcfl.nn.nets.conv_general_dilated` writes its derivative so that
JAX's transposition produces the canonical form directly.

The set-up is the reproduction of the problem: a two-layer 3x3 conv net (16 and 32 channels,
ReLU, global average pool, linear classifier) in NHWC/HWIO, batch 64 of 32x32x3 float32,
cross-entropy and plain SGD (lr 0.01), ``--steps`` steps (8). For each convolution (``lax``:
``lax.conv_general_dilated``; ``jaxcfl``: ``jaxcfl.nn.nets.conv_general_dilated``) it times

``separate``  ``--steps`` calls of one jitted step;
``scan``      one jitted ``lax.scan`` over the steps;
``unrolled``  the same scan with ``unroll=True`` (a straight-line program);
``forward``   the forward pass only, scanned against separate calls (no gradient: no penalty
              expected);

and prints ``scan / separate`` (the target: at most 1.0). Times are medians over
``--repeats`` rounds after one untimed call; compile time (first call minus the median) is
reported apart. The script also checks that the scanned parameters equal the separate calls'
bit for bit, and counts the convolutions of the compiled scan that are not in canonical form.

Run ``python benchmarks/scan_step.py --help``; results are in ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from _machine import OtherLoad, loadavg, machine_info

from jaxcfl.nn.nets import conv_general_dilated

CONVS: dict[str, Callable] = {"lax": lax.conv_general_dilated, "jaxcfl": conv_general_dilated}
DN = ("NHWC", "HWIO", "NHWC")


def make_problem(steps: int, batch: int, seed: int = 0):
    k = jax.random.split(jax.random.key(seed), 5)
    params = {"w1": jax.random.normal(k[0], (3, 3, 3, 16)) * 0.1, "w2": jax.random.normal(k[1], (3, 3, 16, 32)) * 0.1,
              "w3": jax.random.normal(k[2], (32, 10)) * 0.1}
    xs = jax.random.normal(k[3], (steps, batch, 32, 32, 3))
    ys = jax.random.randint(k[4], (steps, batch), 0, 10)
    return params, xs, ys


def programs(conv: Callable, params, xs, ys) -> dict[str, Callable[[], object]]:
    def net(p, x):
        h = jax.nn.relu(conv(x, p["w1"], (1, 1), "SAME", dimension_numbers=DN))
        h = jax.nn.relu(conv(h, p["w2"], (1, 1), "SAME", dimension_numbers=DN))
        return h.mean(axis=(1, 2)) @ p["w3"]

    def loss(p, x, y):
        return -jnp.mean(jnp.sum(jax.nn.log_softmax(net(p, x)) * jax.nn.one_hot(y, 10), axis=-1))

    def step(p, xy):
        g = jax.grad(loss)(p, *xy)
        return jax.tree.map(lambda a, b: a - 0.01 * b, p, g), None

    def forward(p, xy):
        return p, net(p, xy[0])

    one, one_forward = jax.jit(step), jax.jit(forward)
    scan = jax.jit(lambda p: lax.scan(step, p, (xs, ys))[0])
    unrolled = jax.jit(lambda p: lax.scan(step, p, (xs, ys), unroll=True)[0])
    scan_forward = jax.jit(lambda p: lax.scan(forward, p, (xs, ys))[1])

    def separate():
        p = params
        for i in range(xs.shape[0]):
            p, _ = one(p, (xs[i], ys[i]))
        return p

    def separate_forward():
        return [one_forward(params, (xs[i], ys[i]))[1] for i in range(xs.shape[0])]

    return {"separate": separate, "scan": lambda: scan(params), "unrolled": lambda: unrolled(params),
            "forward separate": separate_forward, "forward scan": lambda: scan_forward(params),
            "_hlo": lambda: scan.lower(params).compile().as_text()}


def non_canonical(hlo: str) -> int:
    labels = re.findall(r"convolution\(.*?dim_labels=([^,\s]+)", hlo)
    return sum(label != "b01f_01io->b01f" for label in labels)


def measure(convs: tuple[str, ...] = tuple(CONVS), steps: int = 8, batch: int = 64, repeats: int = 5,
            say: Callable[[str], None] = lambda msg: None) -> dict[str, dict]:
    """Time every item of :func:`programs` for each convolution in ``convs``; one row each."""
    params, xs, ys = make_problem(steps, batch)
    results: dict[str, dict] = {}
    for name in convs:
        progs = programs(CONVS[name], params, xs, ys)
        t0 = time.perf_counter()
        hlo = progs.pop("_hlo")()  # compiles the scan (its first call below reuses the executable)
        scan_compile = time.perf_counter() - t0
        row: dict = {"non_canonical_convolutions_in_scan": non_canonical(hlo), "seconds": {}, "compile_seconds": {}}
        outputs = {}
        for item, fn in progs.items():
            t0 = time.perf_counter()
            outputs[item] = jax.block_until_ready(fn())
            first = time.perf_counter() - t0
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(fn())
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            row["seconds"][item] = med
            row["compile_seconds"][item] = scan_compile if item == "scan" else max(first - med, 0.0)
            say(f"  {name:7s} {item:17s} {med:8.3f} s   (compile {row['compile_seconds'][item]:5.1f} s)")
        row["scan_over_separate"] = row["seconds"]["scan"] / row["seconds"]["separate"]
        row["unrolled_over_separate"] = row["seconds"]["unrolled"] / row["seconds"]["separate"]
        row["forward_scan_over_separate"] = row["seconds"]["forward scan"] / row["seconds"]["forward separate"]
        row["scan_bits_equal_separate"] = all(
            np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(jax.tree.leaves(outputs["scan"]), jax.tree.leaves(outputs["separate"])))
        results[name] = row
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8, help="SGD steps per call (default 8)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--convs", nargs="+", choices=tuple(CONVS), default=list(CONVS))
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    args = p.parse_args(argv)
    out = sys.stderr if args.json else sys.stdout
    say = lambda msg="": print(msg, file=out, flush=True)
    info = machine_info()
    say(f"== scan_step: {args.steps} SGD steps of a 2-layer conv net, batch {args.batch}, 32x32x3 ==")
    say(f"cpu {info['cpu_model']} (nproc {info['nproc']}), jax {info['jax']} ({info['jax_backend']}), "
        f"loadavg {loadavg()}")
    other = OtherLoad().start()
    results = measure(tuple(args.convs), args.steps, args.batch, args.repeats, say)
    share = other.stop()
    say()
    say(f"{'conv':8s} {'scan/separate':>14s} {'unrolled/sep':>13s} {'fwd scan/sep':>13s} {'bits':>6s} {'non-canonical':>14s}")
    for name, row in results.items():
        say(f"{name:8s} {row['scan_over_separate']:14.2f} {row['unrolled_over_separate']:13.2f} "
            f"{row['forward_scan_over_separate']:13.2f} {'same' if row['scan_bits_equal_separate'] else 'diff':>6s} "
            f"{row['non_canonical_convolutions_in_scan']:14d}")
    if "lax" in results and "jaxcfl" in results:
        say(f"jaxcfl's scan against lax's scan: {results['lax']['seconds']['scan'] / results['jaxcfl']['seconds']['scan']:.1f}x faster")
    say(f"CPU used by other processes: {100 * share:.0f}%" if share is not None else "")
    say(f"loadavg at end {loadavg()}")
    if args.json:
        print(json.dumps({"machine": info, "settings": vars(args), "results": results, "other_load": share,
                          "loadavg_end": loadavg()}, indent=1))


if __name__ == "__main__":
    main()
