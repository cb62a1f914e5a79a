"""jaxcfl sweep: the stability map of an lr x alpha grid on your own image, beside the CFL theory.

Every (lr, alpha) pair of the grid runs the scheme from the same N(0, 1) kernel
(jaxcfl.sweep: one vmapped program per chunk of runs) and is classified as stable,
restrained or divergent; a run that overflows is a result, not an error. Printed:
the counts and a character map, one row per lr and one column per alpha, beside the
exact windowed CFL bounds of the linearised scheme (and the paper's formulas for the
linear model).

Files, in --out DIR (default ./jaxcfl-sweep): stability_map.png (the map with the
paper's and the windowed theory curves), sweep.csv (one row per run: lr, alpha,
status and the metrics), sweep.json (what --json prints), and the resumable sweep
in DIR/sweep: run the same command again and its finished chunks (of --chunk-size
runs) are reused; a different sweep in the same DIR is refused.

Example:
  jaxcfl sweep --image photo.png --kernel-size 8 --lr 1e-5:1e-3:24 --alpha 1e-2:1e4:32
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxcfl._core.results import ResultDir, stderr, sweep_chunks_on_disk
from jaxcfl._core.text import table
from jaxcfl.experiments import user_image as ui

MAP_LETTERS = {"stable": "S", "restrained": "R", "divergent": "D"}


def run(
    image: np.ndarray,
    lr: np.ndarray,
    alpha: np.ndarray,
    *,
    kernel_size: int = 16,
    steps: int = 1000,
    compare_k: float | None = None,
    record_points: int = 100,
    chunk_size: int = 256,
    seed: int = 0,
    theory: bool = True,
    out: str | Path | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] = stderr,
    image_info: dict[str, Any] | None = None,
    **setup: Any,
) -> dict[str, Any]:
    """Sweep ``lr x alpha`` on ``image``; returns the JSON-able payload of ``jaxcfl sweep --json``.

    Args:
      image: a 2-D array (:func:`jaxcfl.load_image`).
      lr, alpha: the grid axes (1-D, ``lr > 0``, ``alpha >= 0``).
      kernel_size, steps, compare_k, record_points, chunk_size: as in :func:`jaxcfl.sweep`.
      seed: PRNG seed of the N(0, 1) initial kernel.
      theory: compute the windowed (and, linear model, the paper's) bounds per ``lr``.
      out: the output folder (module docstring); ``None``: nothing is written.
      progress: the sweep's progress bar (``None``: on a terminal).
      log: where progress lines go (default stderr).
      image_info: the image's description (:func:`~jaxcfl.experiments.user_image.image_of`).
      setup: ``scheme``, ``model``, ``pool``, ``momentum``, ``a``, ``beta``, ``label``, ``bias``,
        ``operator`` (and ``safety``, ``guard`` for ``guarded_gd``): keyword arguments of :func:`jaxcfl.sweep`.
    """
    lr, alpha = np.asarray(lr, np.float64), np.asarray(alpha, np.float64)
    info = ui.image_info(image) if image_info is None else image_info
    return ui.in_result_dir(out, "jaxcfl-sweep", "sweep.json", lambda results: _run(
        results, image, info, lr, alpha, kernel_size=kernel_size, steps=steps, compare_k=compare_k,
        record_points=record_points, chunk_size=chunk_size, seed=seed, theory=theory, progress=progress, log=log,
        setup=setup))


def _run(results: ResultDir, image: np.ndarray, image_info: dict[str, Any], lr: np.ndarray, alpha: np.ndarray, *, kernel_size: int, steps: int,
         compare_k: float | None, record_points: int, chunk_size: int, seed: int, theory: bool, progress: bool | None,
         log: Callable[[str], None], setup: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """:func:`run` in the open ``results``: the sweep, the theory, the payload and the files."""
    import jax

    from jaxcfl.pde._sweeps import sweep

    sweep_dir = results.file("sweep") if results.writes else None
    n_chunks = -(-(lr.size * alpha.size) // chunk_size)
    on_disk = sweep_chunks_on_disk(sweep_dir, n_chunks)
    log(f"[sweep] {lr.size} lr x {alpha.size} alpha = {lr.size * alpha.size} runs of {steps} steps in {n_chunks} "
        f"chunk(s)" + (f", {on_disk} found in {sweep_dir}" if on_disk else "") + " ...")
    result = sweep(image, kernel_size, lr, alpha, steps=steps, compare_k=compare_k, record_points=record_points,
                   chunk_size=chunk_size, key=jax.random.key(seed), out=sweep_dir, progress=progress, **setup)
    sweep_seconds = results.seconds()
    log(f"[sweep] {', '.join(f'{n} {s}' for s, n in result.counts().items())}  [{sweep_seconds:.1f}s]")
    notes: list[str] = []
    payload: dict[str, Any] = {
        "command": "sweep",
        "image": image_info,
        "spec": result.spec.to_dict(),
        "seed": seed,
        "rule": result.rule.to_dict(),
        "counts": result.counts(),
        "status": result.status.tolist(),
        "theory": _theory(result, notes) if theory else None,
        "runs": result.rows(),
        "chunks": n_chunks,
        "chunks_on_disk": on_disk,
        "sweep_seconds": sweep_seconds,
        "notes": notes,
    }
    files: dict[str, str] = {}
    if results.writes:
        title = f"{image_info['source']}: {describe_short(result.spec)}"
        figure = _figure(result, payload["theory"] is not None, notes, title)
        if figure is not None:
            from jaxcfl import plot
            files["png"] = plot.save(figure, results.file("stability_map.png"))
        files["csv"] = results.write_csv("sweep.csv", payload["runs"])
        files["sweep"] = str(sweep_dir)
    return payload, files


def _theory(result, notes: list[str]) -> dict[str, Any] | None:
    """The windowed (and paper's) bounds at each ``lr`` of the grid, and how many runs they call right."""
    from jaxcfl import plot
    from jaxcfl.pde._rhs import get_model

    try:
        curves = plot.theory_curves(result, result.lr)
    except (ValueError, NotImplementedError) as err:  # a scheme without a stability theory
        notes.append(f"no CFL theory for this set-up ({err})")
        return None
    out: dict[str, Any] = {name: {"alpha_min": lo.tolist(), "alpha_max": hi.tolist()} for name, (lo, hi) in curves.items()}
    lo, hi = (np.asarray(x)[:, None] for x in curves["windowed"])
    predicted = (lo < result.alpha[None, :]) & (result.alpha[None, :] < hi)
    out["predicted_stable"] = predicted.tolist()
    out["agree"] = int(np.sum(predicted == (result.status == "stable")))
    if not get_model(result.spec.setup.model).linearised:
        notes.append("the windowed theory of the nonlinear model is that of its linearisation at K = 0")
    if getattr(result.spec.setup, "guarded", False):
        notes.append(f"the theory is that of {result.spec.setup.scheme}'s step at the nominal lr; the guard shortens "
                     f"the steps that would break it")
    return out


def describe_short(spec) -> str:
    """``scheme, model model, kernel w, N steps``: the figure's title after the image's name."""
    return f"{spec.setup.scheme}, {spec.setup.model} model, kernel {spec.kernel_size}, {spec.steps} steps"


def _figure(result, theory: bool, notes: list[str], title: str):
    """The stability map (:func:`jaxcfl.plot.stability_map`) of the runs with ``alpha > 0`` (a log axis)."""
    from jaxcfl import plot
    keep = result.alpha > 0
    if not keep.any():
        notes.append("no stability map: every alpha is 0, and the map's alpha axis is logarithmic")
        return None
    if not keep.all():
        notes.append(f"the stability map leaves out alpha = 0 (its alpha axis is logarithmic); "
                     f"the CSV and JSON have those {int(result.lr.size)} runs")
        result = dataclasses.replace(result, alpha=result.alpha[keep], status=result.status[:, keep],
                                     metrics={k: v[:, keep] for k, v in result.metrics.items()},
                                     curves={k: v[:, keep] for k, v in result.curves.items()})
    return plot.stability_map(result, theory=theory, title=title)


def _map_row(status: list[str], predicted: list[bool] | None) -> str:
    """One lr's letters; lower case where the windowed theory predicts the other way."""
    letters = [MAP_LETTERS[s] for s in status]
    if predicted is not None:
        letters = [c if (s == "stable") == p else c.lower() for c, s, p in zip(letters, status, predicted)]
    return "".join(letters)


def render(payload: dict[str, Any]) -> str:
    """The counts, the character map beside the theory, the notes and the files."""
    s = payload["spec"]
    counts = payload["counts"]
    lr, alpha, theory = s["lr"], s["alpha"], payload["theory"]
    runs = len(lr) * len(alpha)
    fmt = lambda x: "-" if x is None else f"{x:.4g}"
    lines = [
        "jaxcfl sweep: " + ui.describe(payload["image"], s),
        f"kernel {s['kernel_size']}, {s['steps']} steps" + (f", compare k {s['compare_k']:g}" if s["compare_k"] else "")
        + f": {len(lr)} lr x {len(alpha)} alpha = {runs} runs: "
        + ", ".join(f"{n} {name}" for name, n in counts.items()),
        "",
        f"map columns: alpha from {alpha[0]:.3g} (left) to {alpha[-1]:.3g} (right), {len(alpha)} values",
    ]
    header = ["lr", "map"]
    columns = []
    if theory is not None:
        for name, short in (("windowed", "win"), ("paper", "paper")):
            if name in theory:
                header += [f"{short} a_min", f"{short} a_max"]
                columns.append(theory[name])
    body = []
    for i, x in enumerate(lr):
        row = [f"{x:.4g}", _map_row(payload["status"][i], None if theory is None else theory["predicted_stable"][i])]
        for bounds in columns:
            row += [fmt(bounds["alpha_min"][i]), fmt(bounds["alpha_max"][i])]
        body.append(row)
    lines.append(table(body, header))
    lines.append("")
    lines.append("S stable, R restrained, D divergent" + ("; lower case: the windowed theory says otherwise "
                                                         "(stable iff win a_min < alpha < win a_max)" if theory else ""))
    if theory is not None:
        lines.append(f"the windowed theory (exact CFL bounds of the linearised scheme) agrees with {theory['agree']} "
                     f"of {runs} runs" + ("; paper = the non-windowed formulas (eqs 26-27, 46-47)" if "paper" in theory else ""))
    lines.extend(f"note: {n}" for n in payload["notes"])
    reused = f", {payload['chunks_on_disk']} of {payload['chunks']} chunk(s) reused" if payload["chunks_on_disk"] else ""
    return "\n".join(lines + ui.footer(payload, reused))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jaxcfl.experiments._cli_types import (
        int_at_least,
        nonnegative_grid,
        positive_float,
        positive_grid,
        positive_int,
    )

    ui.add_problem_arguments(parser)
    grid = parser.add_argument_group("the grid and the runs")
    grid.add_argument("--lr", type=positive_grid, nargs="+", required=True, metavar="GRID",
                      help="learning rates (dt), e.g. 1e-5:1e-3:32 (32 log-spaced values) or 1e-4,2e-4; see below")
    grid.add_argument("--alpha", type=nonnegative_grid, nargs="+", required=True, metavar="GRID",
                      help="weight decays, e.g. 1e-2:1e4:32 or 0,1,10,100; see below")
    grid.add_argument("--steps", type=positive_int, default=1000, help="iterations per run (default 1000)")
    grid.add_argument("--compare-k", type=positive_float, default=None, metavar="K",
                      help="also run each configuration with its update perturbed by K (e.g. 3), and report the "
                           "divergence of the two (default: no comparison)")
    grid.add_argument("--record-points", type=int_at_least(3), default=100,
                      help="samples of each run's curves (default 100; at least 3)")
    grid.add_argument("--chunk-size", type=positive_int, default=256,
                      help="runs per compiled call, and per saved chunk (default 256)")
    grid.add_argument("--no-theory", action="store_true", help="skip the CFL theory (its columns and curves)")
    guard = parser.add_argument_group("the CFL guard (--scheme guarded_gd)")
    guard.add_argument("--safety", type=positive_float, default=0.9,
                       help="the margin in (0, 1]: dt_n lambda_n <= 2 safety (default 0.9)")
    guard.add_argument("--every", type=positive_int, default=10, help="refresh lambda every EVERY iterations (default 10)")
    guard.add_argument("--warmup", type=int_at_least(0), default=20,
                       help="and before each of the first WARMUP iterations (default 20)")
    ui.add_output_arguments(parser, "jaxcfl-sweep", "finished chunks of runs")


def main(args: argparse.Namespace) -> dict[str, Any]:
    from jaxcfl.experiments._cli_types import merge_grid

    from jaxcfl.pde._schemes import GuardSchedule, get_scheme

    image, info = ui.image_of(args)
    guard = {}
    if get_scheme(args.scheme).guarded:
        guard = dict(safety=args.safety, guard=GuardSchedule(every=args.every, warmup=args.warmup))
    return run(image, merge_grid(args.lr), merge_grid(args.alpha), kernel_size=args.kernel_size, steps=args.steps,
               compare_k=args.compare_k, record_points=args.record_points, chunk_size=args.chunk_size, seed=args.seed,
               theory=not args.no_theory, out=args.out, progress=ui.progress_of(args), image_info=info, **ui.setup_kwargs(args), **guard)
