"""Appendix C (Tables 3 and 4): test-accuracy spread from last-bit perturbations against
the spread from the batch order.

For every seed (the batch order and augmentation), the perturbed copies
``k = 1, 3, 5, ...`` train in lockstep from one initialisation on the same
batches (:func:`jaxcfl.train.train`). A run's final accuracy is its mean test
accuracy over the last ``min(10, epochs)`` epochs. The table holds one row per
``k`` and one column per seed; "std over k" is the population standard deviation
down each column (the perturbation's effect at a fixed batch order), "std over
seeds" along each row (the batch order's effect at a fixed perturbation). The
paper finds the two of the same size: a last-bit change of the update is
amplified as much as a different batch order. Accuracies are in percent.

Each seed's run checkpoints under ``OUT/seed<seed>`` after every epoch; a killed
command resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from jaxcfl._io import atomic_open
from jaxcfl._text import table


def run(
    *,
    model: str = "resnet20",
    dataset: str = "builtin",
    data_root: str | None = None,
    epochs: int = 1,
    ks: tuple[float, ...] = (1, 3, 5),
    seeds: tuple[int, ...] = (1,),
    out: str | Path | None = "jaxcfl-variance",
    progress: bool | None = None,
    copies_mode: str = "auto",
    log=lambda msg: print(msg, file=sys.stderr, flush=True),
    **train_options: Any,
) -> dict[str, Any]:
    """Run the k x seed grid; returns the JSON payload (``runs``, ``std_over_k``, ``std_over_seeds``, ...).

    Args:
      model, dataset, data_root, epochs: see :class:`jaxcfl.train.TrainConfig`.
      ks: perturbation factors (one lockstep copy each).
      seeds: batch-order seeds (one lockstep run each).
      out: output directory (``None``: keep nothing on disk).
      progress: tqdm bars.
      copies_mode: see :func:`jaxcfl.train.resolve_copies_mode`.
      log: progress messages (stderr by default).
      **train_options: other :class:`~jaxcfl.train.TrainConfig` fields (``lr``,
        ``batch_size``, ``activation``, ``beta``, ``train_size``, ...).
    """
    from jaxcfl.train import TrainConfig, train

    if not ks or not seeds:
        raise ValueError("ks and seeds must each hold at least one value")
    if len(set(seeds)) != len(seeds) or len(set(ks)) != len(ks):
        raise ValueError(f"ks and seeds must not repeat values, got ks={list(ks)} seeds={list(seeds)}")
    config = TrainConfig(model=model, dataset=dataset, data_root=data_root, epochs=epochs, **train_options)
    out = Path(out) if out is not None else None
    start = time.perf_counter()
    accuracy = np.zeros((len(ks), len(seeds)))
    results = {}
    for j, seed in enumerate(seeds):
        log(f"[variance] {model} on {dataset}, seed {seed}: {len(ks)} copies k={list(ks)}, {epochs} epoch(s) ...")
        res = train(config, ks, seed=seed, out=None if out is None else out / f"seed{seed}", progress=progress,
                    copies_mode=copies_mode)
        accuracy[:, j] = 100.0 * res.final_accuracy()
        results[seed] = res
        log(f"[variance]   final accuracy {np.array2string(accuracy[:, j], precision=2)}  [{res.seconds:.1f}s]")
    std_over_k = accuracy.std(axis=0)  # population std, per seed
    std_over_seeds = accuracy.std(axis=1)  # per k
    payload = {
        "config": config.to_dict(),
        "ks": [float(k) for k in ks],
        "seeds": [int(s) for s in seeds],
        "runs": [{"k": float(k), "seed": int(s), "final_accuracy": float(accuracy[i, j])}
                 for j, s in enumerate(seeds) for i, k in enumerate(ks)],
        "std_over_k": {str(s): float(std_over_k[j]) for j, s in enumerate(seeds)},
        "std_over_seeds": {f"{k:g}": float(std_over_seeds[i]) for i, k in enumerate(ks)},
        "mean_std_over_k": float(std_over_k.mean()),
        "mean_std_over_seeds": float(std_over_seeds.mean()),
        "mean_accuracy": float(accuracy.mean()),
        "fingerprints": {str(s): list(r.fingerprints) for s, r in results.items()},
        "seconds": time.perf_counter() - start,
        "files": {},
    }
    if out is not None:
        payload["files"] = _write_outputs(out, payload, accuracy)
    return payload


def _write_outputs(out: Path, payload: dict[str, Any], accuracy: np.ndarray) -> dict[str, str]:
    lines = ["k,seed,final_accuracy"] + [f"{r['k']:g},{r['seed']},{r['final_accuracy']:.6f}" for r in payload["runs"]]
    with atomic_open(out / "variance.csv", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with atomic_open(out / "variance.json", "w") as fh:
        json.dump(payload, fh, indent=1)
    files = {"csv": str(out / "variance.csv"), "json": str(out / "variance.json")}
    files["plot"] = _plot(out / "variance.png", payload, accuracy)
    return files


def _plot(path: Path, payload: dict[str, Any], accuracy: np.ndarray) -> str:
    from jaxcfl.plot import _pyplot, save

    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    seeds, ks = payload["seeds"], payload["ks"]
    for i, k in enumerate(ks):
        left.plot(range(len(seeds)), accuracy[i], "o", label=f"k={k:g}", alpha=0.8)
    left.set_xticks(range(len(seeds)), [str(s) for s in seeds])
    left.set(xlabel="seed (batch order)", ylabel="final test accuracy (%)", title="accuracy of every run")
    left.legend(fontsize=7)
    names = ["std over k\n(per seed)", "std over seeds\n(per k)"]
    values = [list(payload["std_over_k"].values()), list(payload["std_over_seeds"].values())]
    right.boxplot(values, tick_labels=names)
    for x, vals in enumerate(values, start=1):
        right.plot(np.full(len(vals), x), vals, "k.", alpha=0.6)
    right.set(ylabel="population std (accuracy points)", title="perturbation vs batch order")
    return save(fig, path)


def render(payload: dict[str, Any]) -> str:
    """The Table 3/4 layout: k rows, seed columns, stds in the margins."""
    seeds, ks = payload["seeds"], payload["ks"]
    acc = {(r["k"], r["seed"]): r["final_accuracy"] for r in payload["runs"]}
    header = ["k \\ seed"] + [str(s) for s in seeds] + ["std over seeds"]
    rows = [[f"{k:g}"] + [f"{acc[(k, s)]:.2f}" for s in seeds] + [f"{payload['std_over_seeds'][f'{k:g}']:.3f}"]
            for k in ks]
    rows.append(["std over k"] + [f"{payload['std_over_k'][str(s)]:.3f}" for s in seeds] + [""])
    cfg = payload["config"]
    text = [f"{cfg['model']} on {cfg['dataset']}, {cfg['epochs']} epoch(s); final accuracy (%) = mean test accuracy "
            f"over the last min(10, epochs) epochs", table(rows, header),
            f"mean std over k (perturbation): {payload['mean_std_over_k']:.3f}   "
            f"mean std over seeds (batch order): {payload['mean_std_over_seeds']:.3f}   "
            f"[{payload['seconds']:.1f}s]"]
    if payload["files"]:
        text.append("files: " + ", ".join(payload["files"].values()))
    return "\n".join(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jaxcfl._cli_types import nonnegative_float, positive_float, positive_int
    from jaxcfl.data import DATASETS
    from jaxcfl.nets import MODELS

    parser.add_argument("--model", choices=MODELS, default="resnet20", help="network (default resnet20)")
    parser.add_argument("--dataset", choices=tuple(DATASETS), default="builtin",
                        help="dataset (default: the built-in digits, no files needed)")
    parser.add_argument("--data-root", default=None, help="folder with the dataset's files (default $JAXCFL_DATA or ./data)")
    parser.add_argument("--epochs", type=positive_int, default=1, help="epochs (default 1; the paper: 200)")
    parser.add_argument("--k", type=positive_float, nargs="+", default=[1, 3, 5],
                        help="perturbation factors (default 1 3 5; the paper: 1 3 5 7 9 11)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="batch-order seeds (default 1; the paper: 1..6)")
    parser.add_argument("--activation", choices=("relu", "swish"), default="relu")
    parser.add_argument("--beta", type=positive_float, default=1.0, help="Swish beta (the paper: 5)")
    parser.add_argument("--lr", type=positive_float, default=0.1)
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--weight-decay", type=nonnegative_float, default=5e-4)
    parser.add_argument("--train-size", type=positive_int, default=None, help="use the first N training images")
    parser.add_argument("--test-size", type=positive_int, default=None, help="use the first N test images")
    parser.add_argument("--copies-mode", choices=("auto", "vmap", "unroll"), default="auto",
                        help="how the k copies share one compiled step (auto: vmap on GPU, unroll on CPU)")
    parser.add_argument("--out", default="jaxcfl-variance", help="output directory (default ./jaxcfl-variance); "
                        "finished epochs are reused")


def main(args: argparse.Namespace) -> dict[str, Any]:
    return run(model=args.model, dataset=args.dataset, data_root=args.data_root, epochs=args.epochs,
               ks=tuple(args.k), seeds=tuple(args.seeds), out=args.out, activation=args.activation, beta=args.beta,
               lr=args.lr, batch_size=args.batch_size, weight_decay=args.weight_decay, train_size=args.train_size,
               test_size=args.test_size, copies_mode=args.copies_mode)
