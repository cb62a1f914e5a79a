"""Benchmark: compile time and step time of the guarded lockstep step, Lanczos looped vs unrolled.

The CFL guard (:func:`jaxcfl.cfl_guard`) estimates the top Hessian eigenvalue with Lanczos on
Hessian-vector products. This script builds the trainer's guarded step (the preset engine of
:class:`jaxcfl.train.TrainConfig` with ``guard=True``: perturbed SGD, Nesterov 0.9, weight
decay 5e-4, the guard's defaults: a first estimate of 20 iterations, then 4 every 20 steps,
refreshes chosen on the host) for a built-in network and ``--copies`` copies in lockstep, once
per ``--variants`` (:data:`VARIANTS`; default ``loop``, the guard, and ``unrolled``, the guard
before its Lanczos became a loop).

For each it reports, in one process:

* the compile time, wall and CPU (``lower`` + ``compile``, ahead of time; the CPU time counts
  every thread of this process, and moves less than the wall time when others share the
  machine), of the programs a guarded run compiles: ``first`` (step 0: the first estimate),
  ``refresh`` (a warm-started refresh) and ``plain`` (the steps between; it holds no Lanczos,
  so it is the same program in every variant). Since 2026-12-08 the guard's first estimate
  and its refreshes are one program (a traced iteration count) that ``Lockstep`` runs on its
  own before the plain step, so ``loop``'s ``first`` is that estimate program alone and its
  ``refresh`` costs nothing (reported as 0: the run reuses ``first``'s program). The other
  variants are the guard before, the step with the estimate inside, a program for each count;
* the run time of each program (for ``loop``, a refresh step is the estimate program, then the
  plain step), the minimum over ``--repeats`` rounds that call every program
  of every variant once, and the mean step over one refresh period,
  ``(refresh + (every - 1) plain) / every``;
* the ratios of each variant to ``loop``.

``cnn`` runs on the built-in digits (28 x 28 x 1), ``resnet20`` on random 32 x 32 x 3 images.
Run ``python benchmarks/guard_compile.py --help``; ``--json`` prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time

import numpy as np

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import jax
import jax.numpy as jnp
from _machine import loadavg, machine_info

from jaxcfl._core import spectral
from jaxcfl.nn import _data as data
from jaxcfl.nn import _guard
from jaxcfl.nn._lockstep import probe_mask
from jaxcfl.nn._preset import TrainConfig, copies_of, engine_of, init_lockstep, preset_engine

PROGRAMS = (("first", 0), ("refresh", None), ("plain", 1))
"""The three programs of a guarded run and the step that selects each (``None``: ``every``)."""


VARIANTS = {"loop": (False, True), "unrolled": (True, False), "loop-plain": (False, False)}
"""``name: (unroll, canonical)``. ``loop`` is the guard: a ``fori_loop`` over ``canonical_convs`` of
its Hessian-vector product, the iteration count traced. ``unrolled`` is the guard before
2026-12-07: the product unrolled ``first_iterations`` or ``iterations`` times (a program for
each), no rewrite (XLA canonicalises the entry computation's convolutions itself).
``loop-plain`` is a loop without the rewrite, a program for each count (the guard of 2026-12-07
without its rewrite)."""


@contextlib.contextmanager
def guard_variant(name: str, iterations: int | None = None):
    """The guard's Lanczos as ``VARIANTS[name]`` says, for the programs traced inside the block;
    ``iterations``: a fixed (static) count instead of the guard's traced one."""
    unroll, canonical = VARIANTS[name]
    saved = _guard.lanczos_eigh, _guard.canonical_convs

    def fixed(matvec, start, key, *, iterations: int, k: int, active=None):
        del active  # the guard before: the count static, one program per count
        return spectral.lanczos_eigh(matvec, start, key, iterations=count, k=k, unroll=unroll)

    count = iterations
    if iterations is not None:
        _guard.lanczos_eigh = fixed
    if not canonical:
        _guard.canonical_convs = lambda fn: fn
    preset_engine.cache_clear()  # a fresh engine: its programs are traced anew
    try:
        yield
    finally:
        _guard.lanczos_eigh, _guard.canonical_convs = saved
        preset_engine.cache_clear()


def batch_for(model: str, size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``(x, y, classes)``: the built-in digits for ``cnn``, random 32 x 32 x 3 images otherwise."""
    if model == "cnn":
        x, y, _, _ = data.load("builtin")
        return (x[:size].astype(np.float32) / 255.0), y[:size].astype(np.int32), int(y.max()) + 1
    rng = np.random.default_rng(0)
    return rng.standard_normal((size, 32, 32, 3)).astype(np.float32), rng.integers(0, 10, size).astype(np.int32), 10


def _fused_step(engine, copies, state, xs, ys):
    """The guarded step with the estimate inside, as the engine ran a refresh before 2026-12-08:
    ``(program, arguments)``."""
    per_copy, shared = engine._hyper_arrays(copies)
    mask = probe_mask(state.copy(0).params, engine.probe)
    fn = engine._step_fn(per_copy_data=False, per_copy_names=tuple(per_copy), shared_names=tuple(shared),
                         mask=mask, guarded=True, refresh=True)[0]
    return fn, (state, per_copy, shared, xs, ys, None)


def compile_variant(model: str, copies: int, variant: str, batch: int) -> tuple[dict, dict, tuple]:
    """Compile the guarded run's programs under ``variant``: ``(times, programs, arguments)``.

    ``loop`` (the guard now) compiles the estimate program (``first``; ``refresh`` shares it) and
    the plain step; its ``first`` and ``refresh`` run the estimate, then the plain step. The other
    variants compile the step with the estimate inside, one program per iteration count, as the
    engine did before 2026-12-08."""
    config, xs, ys, classes = _set_up(model, batch)
    every = config.guard_every
    out = {"every": every, "compile_s": {}, "compile_cpu_s": {}, "loadavg": {}}
    programs = {}
    shared = variant == "loop"
    counts = {"first": config.guard_first_iterations, "refresh": config.guard_iterations, "plain": None}
    for name, at in PROGRAMS:
        with guard_variant(variant, None if shared else counts[name]):
            engine, the_copies, state = _engine(config, copies, xs, classes)
            step = engine.step_function(the_copies, state)
            start, cpu = time.perf_counter(), time.process_time()
            if shared and name == "refresh":
                pass  # the same compiled programs as "first"
            elif name == "plain":
                programs[name] = functools.partial(step.compile(state, xs, ys, 1), step=1)
            elif shared:  # the estimate program alone; the run then takes the plain step's
                fn, args = step._estimate(state, xs, ys, 0)
                estimate = fn.lower(*args).compile()
            else:
                fn, args = _fused_step(engine, the_copies, state, xs, ys)
                compiled = fn.lower(*args).compile()
                programs[name] = lambda s, x_, y_, c=compiled, a=args: c(s, *a[1:])  # the batch of `args`
            shared_program = shared and name == "refresh"
            out["compile_s"][name] = 0.0 if shared_program else time.perf_counter() - start
            out["compile_cpu_s"][name] = 0.0 if shared_program else time.process_time() - cpu
            out["loadavg"][name] = loadavg()
            if not shared or name == "plain":
                jax.block_until_ready(programs[name](state, xs, ys))  # a first call, untimed
    if shared:  # a refresh step: the estimate, then the plain step
        plain = programs["plain"]
        programs["first"] = programs["refresh"] = lambda s, x_, y_: plain(estimate(s, *args[1:]), x_, y_)
        jax.block_until_ready(programs["first"](state, xs, ys))
    for times in (out["compile_s"], out["compile_cpu_s"]):
        times["total"] = sum(times[name] for name, _ in PROGRAMS)
    # The first estimate runs on the state of step 0, the others on a later one (guard count > 0:
    # the shared program then takes the refresh's iteration count).
    later = programs["plain"](state, xs, ys)[0]
    arguments = {"first": (state, xs, ys), "refresh": (later, xs, ys), "plain": (later, xs, ys)}
    return out, programs, arguments


def _set_up(model: str, batch: int) -> tuple[TrainConfig, jax.Array, jax.Array, int]:
    """``(config, x, y, classes)``: the trainer's guarded set-up for ``model`` and one batch."""
    x, y, classes = batch_for(model, batch)
    config = TrainConfig(model=model, batch_size=batch, guard=True, milestones=(), augment=False)
    return config, jnp.asarray(x), jnp.asarray(y), classes


def _engine(config: TrainConfig, copies: int, xs, classes: int):
    """``(engine, copies, state)``: a fresh engine of ``config`` and the initial state of
    ``copies`` copies (k = 1, 3, 5, ...)."""
    ks = tuple(float(2 * i + 1) for i in range(copies))
    engine = engine_of(config, steps_per_epoch=1, in_channels=xs.shape[-1], num_classes=classes)
    return engine, copies_of(config, ks, 0), init_lockstep(config, ks, xs.shape[-1], classes)[1]


def warm_up(model: str, copies: int, batch: int) -> None:
    """Compile and run the plain guarded step of a throwaway engine (nothing is timed)."""
    config, xs, ys, classes = _set_up(model, batch)
    preset_engine.cache_clear()
    engine, the_copies, state = _engine(config, copies, xs, classes)
    jax.block_until_ready(engine.step_function(the_copies, state)(state, xs, ys, 1))
    preset_engine.cache_clear()


def measure(model: str, copies: int, variants: list[str], batch: int, repeats: int) -> dict:
    """Compile times of each variant's programs, then their run times: the minimum over ``repeats``
    rounds, each of which calls every program of every variant once (a slow spell of the machine
    falls on all alike). Before any is timed, the network's plain step compiles once, untimed: the
    first compile of a process pays XLA's and the tracer's one-time set-up, which would otherwise
    fall on whichever variant comes first."""
    warm_up(model, copies, batch)
    rows, compiled = {}, {}
    for variant in variants:
        rows[variant], programs, arguments = compile_variant(model, copies, variant, batch)
        compiled[variant] = programs, arguments
        rows[variant]["run_s"] = {name: float("inf") for name, _ in PROGRAMS}
    for _ in range(repeats):
        for variant, (programs, arguments) in compiled.items():
            for name, program in programs.items():
                start = time.perf_counter()
                jax.block_until_ready(program(*arguments[name]))
                run = rows[variant]["run_s"]
                run[name] = min(run[name], time.perf_counter() - start)
    for row in rows.values():
        every = row["every"]
        row["mean_step_s"] = (row["run_s"]["refresh"] + (every - 1) * row["run_s"]["plain"]) / every
    return rows


def _ratios(other: dict, loop: dict) -> dict:
    """``other / loop`` for the compile times (wall and CPU) and the run times."""
    keys = ("first", "refresh", "total")
    run = {k: other["run_s"][k] / loop["run_s"][k] for k in ("first", "refresh")}
    run["mean_step"] = other["mean_step_s"] / loop["mean_step_s"]
    ratio = lambda a, b: a / b if b > 0 else None  # noqa: E731 - a program the variant does not compile
    return {"compile": {k: ratio(other["compile_s"][k], loop["compile_s"][k]) for k in keys},
            "compile_cpu": {k: ratio(other["compile_cpu_s"][k], loop["compile_cpu_s"][k]) for k in keys}, "run": run}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "resnet20"])
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 6])
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=["loop", "unrolled"],
                        help="how the guard runs Lanczos (VARIANTS; loop: the guard, unrolled: the guard before)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed rounds (each calls every program once; the minimum is kept)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    for model in args.models:
        for copies in args.copies:
            row = {"model": model, "copies": copies, "batch_size": args.batch_size}
            row.update(measure(model, copies, args.variants, args.batch_size, args.repeats))
            row["ratios"] = {variant: _ratios(row[variant], row["loop"]) for variant in args.variants
                             if variant != "loop" and "loop" in row}
            rows.append(row)
            if not args.json:
                print(f"{model}, {copies} cop{'y' if copies == 1 else 'ies'}, batch {args.batch_size} "
                      f"(loadavg now {' '.join(map(str, loadavg() or []))})", flush=True)
                for variant in args.variants:
                    r = row[variant]
                    c, p, t = r["compile_s"], r["compile_cpu_s"], r["run_s"]
                    print(f"  {variant:10s} compile (wall / CPU s) first {c['first']:5.1f} / {p['first']:5.1f}  "
                          f"refresh {c['refresh']:5.1f} / {p['refresh']:5.1f}  plain {c['plain']:4.1f} / "
                          f"{p['plain']:4.1f}  total {c['total']:5.1f} / {p['total']:5.1f} | run (ms) first "
                          f"{1e3 * t['first']:7.1f}  refresh {1e3 * t['refresh']:6.1f}  plain {1e3 * t['plain']:5.1f}  "
                          f"mean step {1e3 * r['mean_step_s']:5.1f}", flush=True)
                x_ = lambda r: "shared" if r is None else f"{r:.2f}x"  # noqa: E731
                for variant, ratio in row["ratios"].items():
                    cr, pr, rr = ratio["compile"], ratio["compile_cpu"], ratio["run"]
                    print(f"  {variant} / loop: compile (wall / CPU) first {x_(cr['first'])} / {x_(pr['first'])}, "
                          f"refresh {x_(cr['refresh'])} / {x_(pr['refresh'])}, total {x_(cr['total'])} / "
                          f"{x_(pr['total'])}; run first {rr['first']:.2f}x, refresh {rr['refresh']:.2f}x, "
                          f"mean step {rr['mean_step']:.2f}x", flush=True)
    if args.json:
        print(json.dumps({"machine": machine_info(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
