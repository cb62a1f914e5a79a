"""The lockstep engine's speed-up: n copies in one compiled step against n separate one-copy steps.

For each model and n, the same engine (:class:`jaxcfl.Lockstep`) runs (a) one step of n copies
(``Copies(k=(1, 3, 5, ...))``, one compiled program) and (b) n calls of its one-copy step, on the
same batch; both are timed after compiling (compile time reported apart), best of ``--repeats``
rounds of ``--steps`` steps. The ratio (b)/(a) is the lockstep speed-up. Models: the built-in
``cnn`` with the paper's perturbed SGD (the preset ``jaxcfl.train``), and the example NNX MLP
with AdamW (``jaxcfl.examples.digits``).

    python benchmarks/lockstep.py --copies 2 4 8 --json
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from _machine import machine_info
from jaxcfl.nn._lockstep import Copies, Lockstep


def _engines(mode: str):
    import optax

    from jaxcfl.examples import digits
    from jaxcfl.nn._preset import TrainConfig, copies_of, engine_of

    config = TrainConfig(model="cnn", dataset="builtin")
    cnn = engine_of(config, steps_per_epoch=1, in_channels=1, num_classes=10, copies_mode=mode)
    t = digits.training()
    mlp = Lockstep(t["model"], optax.adamw(1e-3, weight_decay=1e-4), copies_mode=mode)
    (x, y), _ = digits.digits()
    batch = (x[:128], y[:128])
    return {"cnn (perturbed SGD)": (cnn, lambda ks: copies_of(config, ks, 1), batch),
            "nnx mlp (adamw)": (mlp, lambda ks: Copies(k=ks), batch)}


def _time(fn, state, x, y, steps: int, repeats: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    state, _ = fn(state, x, y)
    jax.block_until_ready(state)
    first = time.perf_counter() - t0
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            state, _ = fn(state, x, y)
        jax.block_until_ready(state)
        best = min(best, (time.perf_counter() - t0) / steps)
    return best, first


def run(copies: list[int], steps: int, repeats: int, mode: str) -> dict:
    rows = []
    for name, (engine, copies_for, (x, y)) in _engines(mode).items():
        one = copies_for((1.0,))
        state1 = engine.init(one)
        single, single_compile = _time(engine.step_function(one, state1), state1, x, y, steps, repeats)
        for n in copies:
            many = copies_for(tuple(float(2 * i + 1) for i in range(n)))
            state = engine.init(many)
            together, compile_s = _time(engine.step_function(many, state), state, x, y, steps, repeats)
            rows.append(dict(model=name, copies=n, lockstep_ms=1e3 * together, separate_ms=1e3 * n * single,
                             speedup=n * single / together, compile_s=compile_s - together,
                             single_compile_s=single_compile - single))
            print(f"{name:>20}  n={n:<3d} lockstep {1e3 * together:8.2f} ms/step  separate {1e3 * n * single:8.2f} "
                  f"ms  speed-up {n * single / together:5.2f}x  (compile {compile_s - together:.1f} s)", flush=True)
    return {"machine": machine_info(), "mode": mode, "steps": steps, "repeats": repeats, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mode", choices=("auto", "vmap", "unroll"), default="auto")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    payload = run(args.copies, args.steps, args.repeats, args.mode)
    if args.json:
        print(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
