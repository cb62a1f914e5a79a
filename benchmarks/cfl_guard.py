"""Benchmark: the cost of the CFL guard (:func:`jaxcfl.cfl_guard`) as a share of training.

The guard estimates the top Hessian eigenvalue with ``iterations`` Hessian-vector products
(Lanczos, warm-started from the previous eigenvector) every ``every`` steps. This script
times one training step of the built-in-data network of ``jaxcfl variance`` (its default
model ``cnn``, batch 32, SGD with Nesterov momentum 0.9 and weight decay 5e-4, BatchNorm in
training mode, float32) four ways, in the same run:

``plain``
    the step without the guard (:func:`jaxcfl.perturbed_sgd`);
``guarded``
    the same step with ``cfl_guard`` chained after it, at the given ``every`` and
    ``iterations`` (defaults: the guard's defaults);
``refresh``
    the guarded step forced to refresh at every step (``every=1``): the cost of one estimate;
``in-program``
    the guarded step with the guard's own schedule (``refresh=None``: one program, a
    ``lax.cond`` on the step count chooses the first estimate, a refresh or neither).

``guarded`` and ``refresh`` refresh where the host says (``update(..., refresh=refresh_due(step,
every))``), one compiled program each way; ``in-program`` measures what the branch costs.

The overhead is ``guarded / plain - 1`` (the target: under 30% at the defaults).
Times are means over about ``--steps`` calls per variant, in 5 interleaved rounds, after a warm-up
(a median would skip the refreshes); compile time (the first calls
minus the mean) is reported apart; ``benchmarks/guard_compile.py`` measures it on its own. Run ``python benchmarks/cfl_guard.py --help``;
results are in ``benchmarks/README.md``.
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

import jax
import jax.numpy as jnp
import optax
from _machine import machine_info

from jaxcfl.nn import _data as data

from jaxcfl.nn import nets as nets
from jaxcfl.nn._guard import cfl_guard, guard_state, refresh_due
from jaxcfl.nn._perturb import perturbed_sgd
from jaxcfl.nn._preset import TrainConfig, _initialiser, cross_entropy


def _step(graphdef, every: int | None, iterations: int, refresh: bool | str | None):
    """One jitted training step; ``every=None``: no guard. Every number is traced; ``refresh`` is
    the guard's host-side choice (one program each)."""

    def step(params, stats, opt_state, x, y, lr, wd):
        def loss_fn(p):
            logits, new_stats = nets.apply(graphdef, p, stats, x, train=True)
            return cross_entropy(logits, y), new_stats

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        opt = _optimizer(lr, wd, every, iterations)
        extra = {} if every is None else {"refresh": refresh}
        updates, opt_state = opt.update(grads, opt_state, params, value_fn=lambda p: loss_fn(p)[0], **extra)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    return jax.jit(step)


def _optimizer(lr, wd, every, iterations):
    sgd = perturbed_sgd(lr, momentum=0.9, nesterov=True, weight_decay=wd)
    if every is None:
        return optax.chain(sgd)
    return optax.chain(sgd, cfl_guard(lr, momentum=0.9, nesterov=True, weight_decay=wd, every=every,
                                      iterations=iterations))


class _Variant:
    """One way to step: its programs (refresh or not), its own training state and its timings."""

    def __init__(self, programs, every, state, in_program: bool = False):
        self.programs, self.every, self.state, self.in_program = programs, every, state, in_program
        self.times: list[float] = []
        self.compile_s = 0.0
        self.step = 0

    def warm_up(self, batch, lr, wd) -> None:
        """Step 0 (the guard's first estimate, ``refresh="first"``) runs here, untimed; the other
        programs compile on a throw-away step. Timing starts at step 1."""
        first = None if self.in_program else "first" if self.every is not None else False
        for refresh in ((None,) if self.in_program else (first, True, False) if self.every is not None else (False,)):
            start = time.perf_counter()
            out = self.programs[refresh](*self.state, *batch, lr, wd)
            jax.block_until_ready(out)
            self.compile_s += time.perf_counter() - start
            if refresh == first:
                self.state, self.step = out[:3], 1

    def run(self, batches, lr, wd, n: int) -> None:
        params, stats, opt_state = self.state
        for _ in range(n):
            x, y = batches[self.step % len(batches)]
            refresh = None if self.in_program else self.every is not None and refresh_due(self.step, self.every)
            start = time.perf_counter()
            params, stats, opt_state, loss = self.programs[refresh](params, stats, opt_state, x, y, lr, wd)
            jax.block_until_ready(loss)
            self.times.append(time.perf_counter() - start)
            self.step += 1
        self.state = (params, stats, opt_state)

    def summary(self) -> dict:
        g = guard_state(self.state[2])
        extra = {} if g is None else {"lambda_max": float(g.lambda_max), "lr_eff": float(g.lr)}
        # The mean, not the median: a refresh comes once every `every` steps, and a median would skip it.
        mean = statistics.fmean(self.times)
        return {"mean_s": mean, "compile_s": max(self.compile_s - mean, 0.0), **extra}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200, help="timed steps per variant (the mean is reported)")
    parser.add_argument("--every", type=int, default=None, help="refresh interval (default: the guard's)")
    parser.add_argument("--iterations", type=int, default=None, help="Lanczos iterations (default: the guard's)")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    defaults = cfl_guard.__kwdefaults__
    every = defaults["every"] if args.every is None else args.every
    iterations = defaults["iterations"] if args.iterations is None else args.iterations

    x_train, y_train, _, _ = data.load("builtin")
    config = TrainConfig(model=args.model, dataset="builtin")
    x = (x_train.astype(np.float32) / 255.0)
    n_batches = min(len(x) // args.batch_size, 64)
    batches = [(jnp.asarray(x[i * args.batch_size:(i + 1) * args.batch_size]),
                jnp.asarray(y_train[i * args.batch_size:(i + 1) * args.batch_size])) for i in range(n_batches)]
    graphdef, initialise = _initialiser(config.model, x.shape[-1], int(y_train.max()) + 1, config.activation,
                                        config.beta)
    params, stats = initialise(jnp.uint32(0))
    lr, wd = jnp.float32(args.lr), jnp.float32(5e-4)
    variants = {}
    for name, ev in (("plain", None), ("guarded", every), ("refresh", 1), ("in-program", every)):
        in_program = name == "in-program"
        programs = {refresh: _step(graphdef, ev, iterations, refresh)
                    for refresh in ((None,) if in_program else ("first", True, False))}
        variants[name] = _Variant(programs, ev, (params, stats, _optimizer(lr, wd, ev, iterations).init(params)),
                                  in_program)
        variants[name].warm_up(batches[0], lr, wd)
    # Interleaved rounds, each a whole number of refresh periods, so that a slow spell of the
    # machine falls on every variant alike.
    rounds = 5
    per_round = every * max(1, -(-args.steps // (rounds * every)))
    for _ in range(rounds):
        for variant in variants.values():
            variant.run(batches, lr, wd, per_round)
    rows = {name: variant.summary() for name, variant in variants.items()}
    plain = rows["plain"]["mean_s"]
    result = {
        "model": args.model, "batch_size": args.batch_size, "every": every, "iterations": iterations,
        "params": int(sum(a.size for a in jax.tree.leaves(params))),
        "steps_timed": rounds * per_round, "variants": rows,
        "overhead": rows["guarded"]["mean_s"] / plain - 1.0,
        "refresh_cost_in_steps": (rows["refresh"]["mean_s"] - plain) / plain,
        "in_program_overhead": rows["in-program"]["mean_s"] / plain - 1.0,
        "machine": machine_info(),
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{args.model}, batch {args.batch_size}, {result['params']} parameters; guard every={every}, "
              f"iterations={iterations}")
        for name, row in rows.items():
            print(f"  {name:10s} {1e3 * row['mean_s']:8.2f} ms/step   (compile {row['compile_s']:.1f} s)")
        print(f"  overhead of the guard: {100 * result['overhead']:.1f}%  "
              f"(one refresh costs {result['refresh_cost_in_steps']:.2f} plain steps); with the schedule in the "
              f"program: {100 * result['in_program_overhead']:.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
