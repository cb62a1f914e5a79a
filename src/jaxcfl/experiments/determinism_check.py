"""``jaxcfl determinism``: is training bit-exact, and does k = 2^n change nothing (appendix B)?

A small real network trains on the built-in digits with perturbed SGD, and the
command reports:

* whether the same lockstep run, repeated in separate processes, ends with the
  same bytes: once with the deterministic mode on and once with it off
  (:mod:`jaxcfl.determinism`), to show what the mode buys on this machine;
* whether ``k`` and ``k 2^n`` give bit-identical weights (Table 2), both as copies
  of one lockstep run and as separate runs;
* that odd ``k`` differ from ``k = 1``;
* the divergence between ``k = 1`` and ``k = 3`` after every step (Figure 2's
  measure), written as a plot with its moving average.

On a GPU: ``jaxcfl --deterministic determinism --model resnet20 --epochs 2`` (and
the same without ``--deterministic``); the child processes inherit the mode's
XLA flags (``--xla_gpu_deterministic_ops`` and friends) either way, since the
check sets them per process.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from jaxcfl._core.results import ResultDir, stderr
from jaxcfl._core.text import table
from jaxcfl.experiments import _options
from jaxcfl.experiments._options import COUNT, SEED, option

POWERS = (1.0, 2.0, 4.0)
DEFAULT_OUT = "jaxcfl-determinism"
ODD = (3.0, 5.0)


def _config(model: str, epochs: int, train_size: int | None, batch_size: int):
    """The paper's optimiser with lr 0.1 divided by 10 for the last epoch (a short run that learns:
    about 95% test accuracy after the default 3 epochs)."""
    from jaxcfl.nn._preset import TrainConfig

    return TrainConfig(model=model, epochs=epochs, train_size=train_size, batch_size=batch_size,
                       milestones=(epochs - 1,) if epochs > 1 else ())


def lockstep_weights(model: str, epochs: int, train_size: int | None, batch_size: int, seed: int) -> Any:
    """Train the copies ``POWERS + ODD`` in lockstep; return their final weights and statistics.

    Module level, so that :func:`jaxcfl.run_in_processes` can run it in a new process.
    """
    from jaxcfl.nn._preset import train

    res = train(_config(model, epochs, train_size, batch_size), POWERS + ODD, seed=seed, progress=False)
    return res.state.params, res.state.batch_stats


@dataclasses.dataclass(frozen=True)
class Options(_options.Options):
    """``jaxcfl determinism``'s options: a short lockstep run of the built-in digits."""

    model: str = _options.network("cnn", "network (default: the small {default})")
    epochs: int = option(3, "epochs (default {default}: lr 0.1, divided by 10 for the last epoch)", COUNT)
    train_size: int | None = _options.split_size("training", "first N training images (default: all)")
    batch_size: int = option(32, "default {default} (45 steps per epoch)", COUNT)
    seed: int = option(1, "batch order (default {default})", SEED)
    processes: int = option(2, "separate processes per mode, at least 2 to compare runs (default {default})",
                            _options.at_least(2))

    def validate(self) -> None:
        _options.clamp_sizes(self, "builtin", (("train_size", "train"),))


@_options.entry(Options)
def run(o: Options, *, out: str | Path | None = DEFAULT_OUT, log=stderr) -> dict[str, Any]:
    """Run every check; returns the JSON payload."""
    from jaxcfl._core.determinism import deterministic_mode_enabled, run_in_processes
    from jaxcfl.nn._preset import train

    model, epochs, train_size, batch_size, seed, processes = (o.model, o.epochs, o.train_size, o.batch_size, o.seed,
                                                              o.processes)
    results = ResultDir(out, kind="determinism", identity=o.identity())
    args = dict(model=model, epochs=epochs, train_size=train_size, batch_size=batch_size, seed=seed)
    repeats = {}
    for mode in (True, False):
        log(f"[determinism] {processes} separate processes, deterministic mode {'on' if mode else 'off'} ...")
        check = run_in_processes("jaxcfl.experiments.determinism_check:lockstep_weights", processes, kwargs=args,
                                 deterministic=mode)
        repeats["on" if mode else "off"] = check.to_dict()
        log(f"[determinism]   identical: {check.identical}  [{sum(check.seconds):.1f}s]")

    log(f"[determinism] this process: lockstep copies k={list(POWERS + ODD)}, and separate runs k=1, 2, 3 ...")
    config = _config(model, epochs, train_size, batch_size)
    lock = train(config, POWERS + ODD, seed=seed, progress=False)
    ks = POWERS + ODD
    prints = dict(zip(ks, lock.fingerprints))
    separate = {k: train(config, (k,), seed=seed, progress=False).fingerprints[0] for k in (1.0, 2.0, 3.0)}
    i3 = ks.index(3.0)
    curve = lock.step_divergence[:, i3]
    payload = {
        "settings": o.settings(),
        "model": model, "epochs": epochs, "seed": seed, "steps": int(len(curve)),
        "test_accuracy": {f"{k:g}": float(a) for k, a in zip(ks, lock.test_accuracy[-1])},
        "deterministic_mode_in_this_process": deterministic_mode_enabled(),
        "repeated_processes": repeats,
        "k_fingerprints": {f"{k:g}": prints[k] for k in ks},
        "powers_of_two_identical": all(prints[k] == prints[1.0] for k in POWERS),
        "odd_k_differ": all(prints[k] != prints[1.0] for k in ODD),
        "separate_runs": {f"{k:g}": f for k, f in separate.items()},
        "separate_k1_equals_k2": separate[1.0] == separate[2.0],
        "separate_k3_differs": separate[3.0] != separate[1.0],
        "separate_equals_lockstep": all(separate[k] == prints[k] for k in separate),
        "divergence_k1_k3": curve.tolist(),
        "seconds": results.seconds(),
        "files": {},
    }
    if results.writes:
        payload["files"] = {"json": results.write_json("determinism.json", payload),
                            "plot": _plot(results.file("determinism.png"), curve)}
        results.close()
    return payload


def _plot(path: Path, curve: np.ndarray) -> str:
    from jaxcfl.plot import moving_average, pyplot, save

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    steps = np.arange(1, len(curve) + 1)
    ax.plot(steps, curve, color="0.7", lw=0.8, label="after each step")
    window = max(1, min(100, len(curve) // 5))
    ax.plot(steps[window - 1:], moving_average(curve, window), color="C3", label=f"moving average ({window})")
    if np.any(curve > 0):
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="divergence of all weights", title="k = 1 vs k = 3")
    ax.legend()
    return save(fig, path)


def render(payload: dict[str, Any]) -> str:
    yes = lambda b: "yes" if b else "NO"
    rep = payload["repeated_processes"]
    rows = [
        ["repeated processes bit-identical, deterministic mode on", yes(rep["on"]["identical"])],
        ["repeated processes bit-identical, deterministic mode off", yes(rep["off"]["identical"])],
        ["k = 1, 2, 4 bit-identical (lockstep copies)", yes(payload["powers_of_two_identical"])],
        ["k = 3, 5 differ from k = 1 (lockstep copies)", yes(payload["odd_k_differ"])],
        ["separate runs: k = 2 equals k = 1", yes(payload["separate_k1_equals_k2"])],
        ["separate runs: k = 3 differs from k = 1", yes(payload["separate_k3_differs"])],
        ["separate runs equal their lockstep copies", yes(payload["separate_equals_lockstep"])],
    ]
    curve = np.asarray(payload["divergence_k1_k3"])
    marks = sorted({0, len(curve) // 4, len(curve) // 2, len(curve) - 1})
    acc = payload["test_accuracy"]
    text = [f"{payload['model']}, {payload['epochs']} epoch(s) on the built-in digits, seed {payload['seed']}; "
            f"test accuracy " + ", ".join(f"k = {k}: {100 * a:.2f}%" for k, a in acc.items()),
            table(rows, ["check", "result"]),
            "divergence k=1 vs k=3 after step " + ", ".join(f"{m + 1}: {curve[m]:.3g}" for m in marks),
            f"[{payload['seconds']:.1f}s]"]
    if payload["files"]:
        text.append("files: " + ", ".join(payload["files"].values()))
    return "\n".join(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    Options.add_arguments(parser)
    _options.add_out(parser, DEFAULT_OUT, f"output directory (default ./{DEFAULT_OUT})")


def main(args: argparse.Namespace) -> dict[str, Any]:
    return run.call(Options.from_args(args), out=args.out)
