"""Section 5, Figure 4: restrained instabilities of the nonlinear one-layer CNN.

Set-up (Sun et al., JMLR 25(174) 2024, Section 5, Figure 4): the 256 x 256
checkerboard, a 32 x 32 kernel drawn N(0, 1), Swish beta = 1, label 1, mean
pooling, weight decay alpha = 20, 1000 iterations of full-batch gradient descent
for each lr in {0.01, 0.03, 0.05, 0.07, 0.09, 0.1, 0.11, 0.13}.

* Left: the loss against iteration (log-log), each run coloured by its class
  (stable, restrained or divergent: :mod:`jaxcfl._core.classify`).
* Right: the same runs with k = 1 against k = 3; the divergence
  ``2 mean(|w1 - w2| / (|w1| + |w2|))`` of the two kernels against iteration, as a
  moving average of window 100 (log y).

Everything comes from one :func:`jaxcfl.sweep` call (``compare_k=k``, every
iteration recorded). Its finished chunks are kept under ``OUT/sweep`` and reused
when the command is run again with the same settings.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxcfl import plot

from jaxcfl.pde import _theory as theory
from jaxcfl._core.results import ResultDir, stderr, sweep_chunks_on_disk
from jaxcfl._core.text import table
from jaxcfl._core.images import checkerboard
from jaxcfl.pde._sweeps import SweepResult, sweep
from jaxcfl._core import validate as v
from jaxcfl.experiments import _options
from jaxcfl.experiments._options import COUNT, PERTURBATION, POSITIVE, SEED, option

PAPER_LR = (0.01, 0.03, 0.05, 0.07, 0.09, 0.1, 0.11, 0.13)
PAPER_ALPHA = 20.0
WINDOW = 100  # the paper's moving-average window (Figure 4 right)
DEFAULT_OUT = "jaxcfl-fig4"


@dataclasses.dataclass(frozen=True)
class Options(_options.Options):
    """``jaxcfl reproduce fig4``'s options (defaults: the paper's set-up)."""

    lr: tuple[float, ...] = option(PAPER_LR, "learning rates (default: the paper's {default})", POSITIVE, nargs="+")
    alpha: float = option(PAPER_ALPHA, "weight decay (default {default})", POSITIVE)
    size: int = option(256, "checkerboard side (default {default})", COUNT)
    kernel_size: int = option(32, "kernel side (default {default})", COUNT)
    steps: int = option(1000, "gradient-descent iterations (default {default})", COUNT)
    k: float = option(3.0, "perturbation factor compared with k = 1 (default {default})", PERTURBATION)
    window: int = option(WINDOW, "moving-average window (default {default})", COUNT, identity=False)
    seed: int = option(0, "seed of the N(0,1) initial kernel (default {default})", SEED)
    chunk_size: int = option(2, "runs per compiled call, and per saved chunk (default {default})", COUNT,
                             settings=False, identity=False)  # the sweep's own folder checks it

    def validate(self) -> None:
        check_problem(self)


def check_problem(o: _options.Options) -> None:
    """Figure 4's problem (and pde-guard's): the kernel fits the checkerboard, and the compared copy's step
    ``fl(lr k)``, ``fl(d / k)`` is made of normal numbers at every lr."""
    if o.kernel_size > o.size:
        raise ValueError(f"{o.spelled('kernel_size')} {o.kernel_size} is larger than the checkerboard "
                         f"({o.spelled('size')} {o.size})")
    _options.refuse_reference_k(o, "k")
    v.check_perturbation(o.spelled("k"), o.k, lr=np.asarray(o.lr))


@_options.entry(Options)
def run(o: Options, *, out: str | Path | None = None, progress: bool | None = None,
        log: Callable[[str], None] = stderr) -> dict[str, Any]:
    """Run Figure 4 (left and right); returns ``{"rows": [...], "files": {...}, ...}`` (JSON-able).

    Args:
      lr, alpha: the learning rates and the weight decay (default: the paper's).
      size, kernel_size: checkerboard side and kernel side (default 256 and 32).
      steps: gradient-descent iterations per run (default 1000).
      k: perturbation factor of the compared copy (default 3; k = 1 is the reference).
      window: moving-average window of the divergence curve, in iterations (default 100).
      seed: PRNG seed of the N(0, 1) initial kernel.
      chunk_size: runs per compiled call; also the granularity of resuming.
      out: output directory: ``fig4.png``, ``fig4.csv``, ``fig4.json``,
        ``fig4_curves.npz`` and the resumable sweep in ``sweep/``. ``None``: nothing written.
      progress: the sweep's progress bar (``None``: only on a terminal).
      log: where progress lines go (default stderr).

    Each row holds the sweep's metrics for one lr (``status``, ``final_loss``,
    ``growth_rate``, ``max_abs_kernel``, ``loss_oscillation``, ``divergence`` over the
    last 100 iterations, ...) plus ``divergence_ma_max`` and ``divergence_ma_final``,
    the largest and the last value of the moving-average divergence curve (``None``
    once the run is non-finite).
    """
    results = ResultDir(out, kind="fig4", identity=o.identity())
    lr, alpha, size, kernel_size, steps, k = list(o.lr), o.alpha, o.size, o.kernel_size, o.steps, o.k
    chunk_size = o.chunk_size
    image = np.asarray(checkerboard(size), np.float64)
    sweep_dir = results.file("sweep") if results.writes else None
    n_chunks = -(-len(lr) // chunk_size)
    on_disk = sweep_chunks_on_disk(sweep_dir, n_chunks)
    log(f"[fig4] nonlinear CNN, checkerboard {size}, kernel {kernel_size}, alpha {alpha:g}, {steps} gd steps, "
        f"k = 1 vs {k:g}, {len(lr)} learning rates in {n_chunks} chunk(s)"
        + (f", {on_disk} found in {sweep_dir}" if on_disk else "") + " ...")
    result = sweep(image, kernel_size, lr, alpha, scheme="gd", model="nonlinear", pool="mean", beta=1.0, label=1.0,
                   compare_k=k, steps=steps, key=jax.random.key(o.seed), record_points=steps, chunk_size=chunk_size,
                   out=sweep_dir, progress=progress)
    sweep_seconds = results.seconds()
    curves = curves_of(result, o.window)
    rows = result.rows()
    for row, smooth in zip(rows, curves["divergence_ma"]):
        finite = smooth[np.isfinite(smooth)]
        row["divergence_ma_max"] = float(finite.max()) if finite.size else None
        row["divergence_ma_final"] = float(smooth[-1]) if np.isfinite(smooth[-1]) else None
    for row in rows:
        log(f"[fig4]   lr {row['lr']:<6g} {row['status']}")
    payload: dict[str, Any] = dict(
        experiment="fig4",
        settings=o.settings(window=int(curves["window"]), scheme="gd", model="nonlinear", pool="mean", beta=1.0,
                            label=1.0, dtype=result.spec.dtype),
        rule=result.rule.to_dict(),
        lr_bound=theory.multilayer_lr_bound(alpha),
        counts=result.counts(),
        rows=rows,
        chunks=n_chunks,
        chunks_on_disk=on_disk,
        sweep_seconds=sweep_seconds,
    )
    files: dict[str, str] = {}
    if results.writes:  # the numbers first, then the figure
        files["csv"] = results.write_csv("fig4.csv", rows)
        arrays = {name: np.asarray(value) for name, value in curves.items()}
        files["npz"] = results.write_npz("fig4_curves.npz", dict(lr=result.lr, status=result.status[:, 0], **arrays))
        files["sweep"] = str(sweep_dir)
        png = _options.figure_file(results.file("fig4.png"), lambda: figure(result, curves), log)
        files.update({"png": png} if png else {})
    return results.finish(payload, "fig4.json", files)


def curves_of(result: SweepResult, window: int) -> dict[str, Any]:
    """The recorded curves of the ``(lr, 1)`` sweep as ``(len(lr), R)`` arrays, plus the moving averages."""
    iterations = np.asarray(result.record_iterations)
    window = max(1, min(window, iterations.size))
    divergence = result.curves["divergence"][:, 0]
    return dict(
        iterations=iterations,
        loss=result.curves["loss"][:, 0],
        update_norm=result.curves["update_norm"][:, 0],
        divergence=divergence,
        window=window,
        ma_iterations=iterations[window - 1:],
        divergence_ma=np.stack([plot.moving_average(d, window) for d in divergence]),
    )


def figure(result: SweepResult, curves: dict[str, Any]):
    """Figure 4: loss curves (left) and moving-average divergence k = 1 vs k (right), coloured by class."""
    fig, (left, right) = plot.panels(2)
    status = result.status[:, 0]
    labels = [f"lr = {x:g}" for x in result.lr]
    spec = result.spec
    plot.loss_curves(curves["iterations"], curves["loss"], labels, statuses=status, ax=left,
                     title=f"Figure 4 left: nonlinear CNN, alpha = {result.alpha[0]:g}, kernel {spec.kernel_size}")
    smooth = curves["divergence_ma"]
    # A log axis cannot show identical copies (divergence 0) or a run that blew up within the first window.
    notes = np.where(np.all(~np.isfinite(smooth), axis=1), ", non-finite", np.where(np.any(smooth > 0, axis=1), "", ", = 0"))
    plot.loss_curves(curves["ma_iterations"], np.where(smooth > 0, smooth, np.nan),
                     [lab + note for lab, note in zip(labels, notes)], statuses=status, ax=right,
                     title=f"Figure 4 right: k = 1 vs k = {spec.compare_k:g}",
                     ylabel=f"divergence, moving average of {curves['window']}", loglog=False)
    right.set_yscale("log")
    for ax in (left, right):  # runs of one class share a colour: tell them apart by line style
        for line, style in zip(ax.get_lines(), _styles(status)):
            line.set_linestyle(style)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _styles(status: np.ndarray) -> list[str]:
    """The j-th run of each class gets the j-th line style."""
    cycle = ("-", "--", ":", "-.")
    return [cycle[int(np.sum(status[:i] == s)) % len(cycle)] for i, s in enumerate(status)]


def render(payload: dict[str, Any]) -> str:
    """The per-lr classes and diagnostics as a table."""
    fmt = lambda x: "-" if x is None else f"{x:.3g}"
    s = payload["settings"]
    header = ["lr", "class", "final loss", "growth/it", "max|K|", "loss osc.", "div last100", "div MA max", "non-finite at"]
    body = [
        [f"{r['lr']:g}", r["status"], fmt(r["final_loss"]), fmt(r["growth_rate"]), fmt(r["max_abs_kernel"]),
         fmt(r["loss_oscillation"]), fmt(r["divergence"] if r["finite"] else None), fmt(r["divergence_ma_max"]),
         "-" if r["first_nonfinite"] < 0 else str(r["first_nonfinite"])]
        for r in payload["rows"]
    ]
    lines = [
        f"Figure 4: nonlinear one-layer CNN, checkerboard {s['size']}, kernel {s['kernel_size']}, mean pooling, "
        f"alpha = {s['alpha']:g}, {s['steps']} gd steps, k = 1 vs k = {s['k']:g} ({s['dtype']})",
        "",
        table(body, header),
        "",
        f"classes: {', '.join(f'{n} {c}' for c, n in payload['counts'].items())}.  "
        f"Bound of eq 51 (large alpha): lr < 2/alpha = {payload['lr_bound']:g}.",
        "div = 2 mean(|w1-w2|/(|w1|+|w2|)) between the k = 1 and k copies; MA = moving average of "
        f"{s['window']} iterations. Rule: jaxcfl.Rule{tuple(payload['rule'].values())}.",
    ]
    if payload.get("files"):
        lines.append("files: " + ", ".join(payload["files"].values()))
    lines.append(f"total {payload['seconds']:.0f}s (sweep {payload['sweep_seconds']:.0f}s; "
                 f"{payload['chunks_on_disk']} of {payload['chunks']} chunks were on disk)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    Options.add_arguments(parser)
    _options.add_out(parser, DEFAULT_OUT, f"output directory (default ./{DEFAULT_OUT}); finished sweep chunks are "
                     "reused")


def main(args: argparse.Namespace) -> dict[str, Any]:
    return run.call(Options.from_args(args), out=args.out)
