"""Section 4, Figure 2: the learning rate against the amplification of a last-bit perturbation.

Set-up (Sun et al., JMLR 25(174) 2024, Section 4, Figure 2): a Swish (beta = 5)
ResNet-56 on CIFAR-10, plain SGD without momentum, weight decay 5e-4, batch
128, no lr decay; lr = 0.1 / n trained for n epochs, so lr x iterations is the
same for every n (n in {2, 4, 8, 16, 32, 320, 3200, 32000}). Two copies, k = 1
and k = 3 of perturbed SGD, train in lockstep from one initialisation on the
same batches. The figure plots the divergence ``2 mean(|w1 - w2| / (|w1| + |w2|))``
of one conv layer's weights between the copies against the *scaled* iteration
``iteration / n``, one curve per n (log y). The paper's reading: the smaller the
lr, the less the perturbation is amplified per unit of scaled iteration, and at
lr = 3.125e-6 (n = 32000) it is not amplified at all (the CFL condition holds;
appendix, Section 4.2).

Each n is one :func:`jaxcfl.train.train` run with ``ks = (1, k)``, written to
``OUT/n{n}`` (checkpoint after every epoch): a rerun resumes, and finished runs
are not trained again. The default size fits a 2-core CPU in a few minutes:
the small ``cnn`` on the built-in digits (1024 training images, 8 steps per
epoch), n in {1, 2, 4, 8}. ``--model resnet56 --dataset cifar10 --data-root DIR
--train-size 50000 --n 2 4 8 16 32 320 3200 32000`` is the paper's set-up.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxcfl import data as datasets
from jaxcfl import plot
from jaxcfl._io import atomic_open
from jaxcfl._text import table
from jaxcfl.train import TrainConfig, TrainResult, init_lockstep, probe_mask, train

PAPER_N = (2, 4, 8, 16, 32, 320, 3200, 32000)
DEFAULT_N = (1, 2, 4, 8)
BASE_LR = 0.1
PAPER_BETA = 5.0


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def probe_path(config: TrainConfig) -> str:
    """The parameter path(s) the trainer's probe (``config.probe``) selects, e.g. ``['features'][0]['conv']['kernel']``."""
    in_channels = datasets.info(config.dataset).image_shape[-1]
    _, state = init_lockstep(config, (1.0,), in_channels, datasets.info(config.dataset).num_classes)
    params = jax.tree.map(lambda a: a[0], state.params)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return ", ".join(p for p, keep in zip(paths, probe_mask(params, config.probe)) if keep)


def run(
    *,
    n: Sequence[int] = DEFAULT_N,
    base_lr: float = BASE_LR,
    k: float = 3.0,
    model: str = "cnn",
    dataset: str = "builtin",
    data_root: str | None = None,
    train_size: int | None = 1024,
    test_size: int | None = None,
    batch_size: int = 128,
    activation: str = "swish",
    beta: float = PAPER_BETA,
    weight_decay: float = 5e-4,
    augment: bool = True,
    probe: str | None = None,
    seed: int = 1,
    init_seed: int = 0,
    window: int = 0,
    copies_mode: str = "auto",
    out: str | Path | None = "jaxcfl-fig2",
    progress: bool | None = None,
    log: Callable[[str], None] = _stderr,
) -> dict[str, Any]:
    """Run Figure 2; returns ``{"rows": [...], "files": {...}, ...}`` (JSON-able).

    Args:
      n: lr = ``base_lr / n``, trained for ``n`` epochs (one lockstep run per n).
      base_lr: the lr of n = 1 (the paper's 0.1).
      k: perturbation factor of the second copy (k = 1 is the first).
      model, dataset, data_root, train_size, test_size, batch_size: what is trained
        on what (:class:`jaxcfl.train.TrainConfig`).
      activation, beta: ``"swish"`` with beta 5 in the paper.
      weight_decay: 5e-4 in the paper. The optimiser is plain SGD (no momentum), constant lr.
      augment: random crop (pad 4), with flips for CIFAR-10 and Fashion-MNIST.
      probe: substring of the parameter path of the conv layer whose divergence is
        plotted (``None``: the trainer's default, its first convolution kernel).
      seed, init_seed: batch order and augmentation; the shared initialisation.
      window: moving average of each curve over ``window`` scaled iterations
        (``window * n`` iterations of run n); 0: none.
      copies_mode: how the trainer runs the two copies (:func:`jaxcfl.train.resolve_copies_mode`).
      out: directory: ``n{n}/`` per run (the trainer's checkpoints and metrics),
        ``fig2.png``, ``fig2.csv``, ``fig2.json``, ``fig2_curves.npz``. ``None``:
        nothing written and nothing resumed.
      progress: the trainer's progress bar (``None``: only on a terminal).
      log: where progress lines go (default stderr).

    Each row: ``n``, ``lr``, ``epochs``, ``steps``, ``probe_divergence`` and
    ``divergence`` (all parameters) between the copies at the end,
    ``probe_divergence_max``, the final test accuracy of each copy, the epochs
    trained by this call (0 when the run was already finished in ``out``) and seconds.
    """
    start = time.perf_counter()
    ns = [int(x) for x in n]
    if not ns or min(ns) < 1 or len(set(ns)) != len(ns):
        raise ValueError(f"n must be distinct integers >= 1, got {list(n)}")
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    out = Path(out) if out is not None else None
    configs = {m: TrainConfig(model=model, dataset=dataset, data_root=data_root, activation=activation, beta=beta,
                              epochs=m, batch_size=batch_size, lr=base_lr / m, momentum=0.0, nesterov=False,
                              weight_decay=weight_decay, milestones=(), augment=augment, init_seed=init_seed,
                              train_size=train_size, test_size=test_size, probe=probe) for m in ns}
    probed = probe_path(configs[ns[0]])
    log(f"[fig2] {activation} {model} on {dataset}, plain SGD (wd {weight_decay:g}), lr = {base_lr:g}/n for n epochs, "
        f"n in {ns}, k = 1 vs {k:g}; probe {probed}")
    results: dict[int, TrainResult] = {}
    rows = []
    for m in ns:
        trained: list[int] = []
        t0 = time.perf_counter()
        result = train(configs[m], ks=(1.0, k), seed=seed, out=None if out is None else out / f"n{m}",
                       progress=progress, on_epoch=lambda e, _, t=trained: t.append(e), copies_mode=copies_mode)
        results[m] = result
        resumed = m - len(trained)
        rows.append(_row(m, result, len(trained), time.perf_counter() - t0))
        log(f"[fig2]   n = {m:<6d} lr {base_lr / m:<10.4g} {result.probe_divergence.shape[0]} steps: probe divergence "
            f"{rows[-1]['probe_divergence']:.3g}, all parameters {rows[-1]['divergence']:.3g}"
            + (f"; {resumed} of {m} epochs resumed from {out / f'n{m}'}" if resumed else "")
            + f"; {len(trained)} epochs trained")
    steps_per_epoch = results[ns[0]].probe_divergence.shape[0] // ns[0]
    curves = _curves(results, window)
    payload: dict[str, Any] = dict(
        experiment="fig2",
        settings=dict(n=ns, base_lr=float(base_lr), k=float(k), model=model, dataset=dataset, train_size=train_size,
                      test_size=test_size, batch_size=batch_size, activation=activation, beta=float(beta),
                      weight_decay=float(weight_decay), momentum=0.0, nesterov=False, milestones=[], augment=augment,
                      probe=probe, probe_path=probed, seed=seed, init_seed=init_seed, window=window,
                      copies_mode=copies_mode),
        steps_per_epoch=steps_per_epoch,
        rows=rows,
    )
    payload["files"] = {} if out is None else dict(
        png=plot.save(figure(curves, payload), out / "fig2.png"), csv=_write_csv(out / "fig2.csv", rows),
        npz=_write_npz(out / "fig2_curves.npz", curves, rows), runs=str(out / "n{n}"), json=str(out / "fig2.json"))
    payload["seconds"] = time.perf_counter() - start
    if out is not None:
        with atomic_open(out / "fig2.json", "w") as fh:
            json.dump(payload, fh, indent=1)
    return payload


def _row(n: int, result: TrainResult, epochs_trained: int, seconds: float) -> dict[str, Any]:
    probe = result.probe_divergence[:, 1]
    acc = result.test_accuracy[-1]
    return dict(n=n, lr=result.config.lr, epochs=result.epochs_done, steps=int(probe.size),
                probe_divergence=float(probe[-1]), divergence=float(result.step_divergence[-1, 1]),
                probe_divergence_max=float(probe.max()), test_accuracy_k1=float(acc[0]),
                test_accuracy_k=float(acc[1]), epochs_trained=epochs_trained, seconds=seconds,
                compile_seconds=result.compile_seconds)


def _curves(results: dict[int, TrainResult], window: int) -> dict[int, dict[str, np.ndarray]]:
    """Per n: the probe and all-parameter divergence (k = 1 vs k) after every step, against scaled iteration."""
    curves = {}
    for n, result in results.items():
        probe = result.probe_divergence[:, 1]
        scaled = np.arange(1, probe.size + 1) / n
        w = window * n
        curves[n] = dict(scaled_iteration=scaled, probe=probe, divergence=result.step_divergence[:, 1],
                         smoothed_iteration=scaled[w - 1:] if w else scaled,
                         smoothed=plot.moving_average(probe, w) if w else probe)
    return curves


def figure(curves: dict[int, dict[str, np.ndarray]], payload: dict[str, Any]):
    """Figure 2: probe divergence (k = 1 vs k) against iteration / n, one curve per n, log y."""
    s = payload["settings"]
    fig, (ax,) = plot.panels(1, width=7.2)
    import matplotlib  # loaded by plot.panels

    colours = matplotlib.colormaps["viridis"]
    for i, (n, c) in enumerate(curves.items()):
        y = c["smoothed"]
        note = "" if np.any(y > 0) else ", = 0 throughout"  # identical copies cannot show on a log axis
        ax.plot(c["smoothed_iteration"], np.where(y > 0, y, np.nan), lw=1.2, color=colours(i / max(1, len(curves) - 1)),
                marker="." if y.size <= 64 else None, label=f"n = {n}, lr = {s['base_lr'] / n:.3g}{note}")
    ax.set_yscale("log")
    ax.set_xlabel(f"scaled iteration = iteration / n  ({payload['steps_per_epoch']} per epoch at lr {s['base_lr']:g})")
    smooth = f", moving average of {s['window']} scaled it." if s["window"] else ""
    ax.set_ylabel(f"divergence of {s['probe_path']}{smooth}", fontsize=8)
    ax.set_title(f"Figure 2: {s['activation']} {s['model']} ({s['dataset']}), SGD lr = {s['base_lr']:g}/n for n epochs, "
                 f"k = 1 vs {s['k']:g}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> str:
    with atomic_open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(rows[0].keys())
        writer.writerows(r.values() for r in rows)
    return str(path)


def _write_npz(path: Path, curves: dict[int, dict[str, np.ndarray]], rows: list[dict[str, Any]]) -> str:
    arrays = {f"n{n}_{name}": value for n, c in curves.items() for name, value in c.items()}
    with atomic_open(path, "wb") as fh:
        np.savez(fh, n=np.array([r["n"] for r in rows]), lr=np.array([r["lr"] for r in rows]), **arrays)
    return str(path)


def render(payload: dict[str, Any]) -> str:
    """One line per n: lr, steps, final divergences and test accuracies."""
    s = payload["settings"]
    body = [[str(r["n"]), f"{r['lr']:.4g}", str(r["epochs"]), str(r["steps"]), f"{r['probe_divergence']:.3g}",
             f"{r['probe_divergence_max']:.3g}", f"{r['divergence']:.3g}", f"{r['test_accuracy_k1']:.4f}",
             f"{r['test_accuracy_k']:.4f}", str(r["epochs_trained"])] for r in payload["rows"]]
    header = ["n", "lr", "epochs", "steps", "probe div", "probe max", "all div", "acc k=1", f"acc k={s['k']:g}", "trained"]
    lines = [
        f"Figure 2: {s['activation']} (beta {s['beta']:g}) {s['model']} on {s['dataset']} (train {s['train_size']}), "
        f"plain SGD, wd {s['weight_decay']:g}, batch {s['batch_size']}, lr = {s['base_lr']:g}/n for n epochs "
        f"({payload['steps_per_epoch']} steps per epoch), k = 1 vs k = {s['k']:g}",
        "",
        table(body, header),
        "",
        f"div = 2 mean(|w1-w2|/(|w1|+|w2|)) between the copies after the last step (the same scaled iteration for every n); "
        f"probe: {s['probe_path']}. 'trained': epochs run by this call (the rest resumed).",
    ]
    if payload.get("files"):
        lines.append("files: " + ", ".join(payload["files"].values()))
    lines.append(f"total {payload['seconds']:.0f}s")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jaxcfl import nets
    from jaxcfl._cli_types import nonnegative_float, positive_float, positive_int
    from jaxcfl.train import COPIES_MODES

    parser.add_argument("--n", type=positive_int, nargs="+", default=list(DEFAULT_N),
                        help="lr = base-lr / n, trained n epochs (default 1 2 4 8; the paper's: "
                             + " ".join(map(str, PAPER_N)) + ")")
    parser.add_argument("--base-lr", type=positive_float, default=BASE_LR, help="lr of n = 1 (default 0.1)")
    parser.add_argument("--k", type=positive_float, default=3.0, help="perturbation factor compared with k = 1 (default 3)")
    parser.add_argument("--model", choices=nets.MODELS, default="cnn", help="network (default cnn; the paper's: resnet56)")
    parser.add_argument("--dataset", choices=tuple(datasets.DATASETS), default="builtin",
                        help="dataset (default builtin; the paper's: cifar10)")
    parser.add_argument("--data-root", default=None, help="folder of the dataset's files (see jaxcfl.data.load)")
    parser.add_argument("--train-size", type=positive_int, default=1024,
                        help="first N training images (default 1024; 50000 for all of CIFAR-10)")
    parser.add_argument("--test-size", type=positive_int, default=None, help="first N test images (default all)")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="batch (default 128)")
    parser.add_argument("--activation", choices=("swish", "relu"), default="swish", help="default swish, as the paper")
    parser.add_argument("--beta", type=positive_float, default=PAPER_BETA, help="Swish beta (default 5, the paper's)")
    parser.add_argument("--weight-decay", type=nonnegative_float, default=5e-4, help="default 5e-4")
    parser.add_argument("--no-augment", dest="augment", action="store_false", help="no random crops / flips")
    parser.add_argument("--probe", default=None,
                        help="substring of the path of the conv weights whose divergence is plotted "
                             "(default: the trainer's, its first conv kernel)")
    parser.add_argument("--seed", type=int, default=1, help="batch order and augmentation (default 1)")
    parser.add_argument("--init-seed", type=int, default=0, help="the shared initialisation (default 0)")
    parser.add_argument("--window", type=int, default=0,
                        help="moving average over this many scaled iterations (default 0: none)")
    parser.add_argument("--copies-mode", choices=COPIES_MODES, default="auto",
                        help="trainer: vmap or unroll the two copies (default auto: unroll on CPU)")
    parser.add_argument("--out", default="jaxcfl-fig2",
                        help="output directory (default ./jaxcfl-fig2); finished runs in OUT/n{n} are reused")


def main(args: argparse.Namespace) -> dict[str, Any]:
    return run(n=tuple(args.n), base_lr=args.base_lr, k=args.k, model=args.model, dataset=args.dataset,
               data_root=args.data_root, train_size=args.train_size, test_size=args.test_size,
               batch_size=args.batch_size, activation=args.activation, beta=args.beta,
               weight_decay=args.weight_decay, augment=args.augment, probe=args.probe, seed=args.seed,
               init_seed=args.init_seed, window=args.window, copies_mode=args.copies_mode, out=args.out)
