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
from jaxcfl._core import validate as v
from jaxcfl.experiments import _cli_types as types
from jaxcfl.experiments import _options
from jaxcfl.experiments._options import BOOL, COUNT, COUNT0, PERTURBATION, SAFETY, option

MAP_LETTERS = {"stable": "S", "restrained": "R", "divergent": "D"}


GRID_GROUP = "the grid and the runs"
GUARD_GROUP = "the CFL guard (--scheme guarded_gd)"


def _guard_default(name: str) -> int:
    from jaxcfl.pde import GuardSchedule

    return getattr(GuardSchedule, name)


@dataclasses.dataclass(frozen=True, kw_only=True)  # the grid has no default
class Options(ui.ProblemOptions):
    """``jaxcfl sweep``'s options: the grid, the runs, the set-up (:class:`~jaxcfl.experiments.user_image.ProblemOptions`)
    and the guard's (defaults: :func:`jaxcfl.sweep`'s and :class:`jaxcfl.GuardSchedule`'s)."""

    lr: tuple[float, ...] = option(help="learning rates (dt), e.g. 1e-5:1e-3:32 (32 log-spaced values) or 1e-4,2e-4; "
                                   "see below", kind=_options.Kind(types.positive_grid, _options.POSITIVE.check),
                                   nargs="+", grid=True, required=True, group=GRID_GROUP)
    alpha: tuple[float, ...] = option(help="weight decays, e.g. 1e-2:1e4:32 or 0,1,10,100; see below",
                                      kind=_options.Kind(types.nonnegative_grid, _options.NONNEGATIVE.check),
                                      nargs="+", grid=True, required=True, group=GRID_GROUP)
    kernel_size: int = option(16, "kernel side w (default {default})", COUNT, group=ui.IMAGE_GROUP)
    steps: int = option(ui._sweep_default("steps"), "iterations per run (default {default})", COUNT, group=GRID_GROUP)
    compare_k: float | None = option(None, "also run each configuration with its update perturbed by K (e.g. 3), and "
                                     "report the divergence of the two (default: no comparison)", PERTURBATION,
                                     metavar="K", group=GRID_GROUP)
    record_points: int = option(ui._sweep_default("record_points"), "samples of each run's curves (default "
                                "{default}; at least 3)", _options.at_least(3), group=GRID_GROUP)
    chunk_size: int = option(ui._sweep_default("chunk_size"), "runs per compiled call, and per saved chunk (default "
                             "{default})", COUNT, group=GRID_GROUP)
    theory: bool = option(True, "skip the CFL theory (its columns and curves)", BOOL, flag="--no-theory",
                          action="store_false", group=GRID_GROUP, identity=False)  # computed on every run
    safety: float = option(ui._sweep_default("safety"), "the margin in (0, 1]: dt_n lambda_n <= 2 safety (default "
                           "{default})", SAFETY, group=GUARD_GROUP)
    every: int = option(_guard_default("every"), "refresh lambda every EVERY iterations (default {default})", COUNT,
                        group=GUARD_GROUP)
    warmup: int = option(_guard_default("warmup"), "and before each of the first WARMUP iterations (default "
                         "{default})", COUNT0, group=GUARD_GROUP)

    def validate(self) -> None:
        from jaxcfl.pde import get_scheme

        super().validate()
        if not get_scheme(self.scheme).guarded:
            self.refuse_unused(["safety", "every", "warmup"], f"for the guard of a guarded scheme, guarded_gd; "
                                                              f"{self.spelled('scheme')} is {self.scheme}")
        if self.compare_k is not None:  # the compared copy's step, fl(lr k) and fl(d / k), at every lr
            _options.refuse_reference_k(self, "compare_k")
            v.check_perturbation(self.spelled("compare_k"), self.compare_k, lr=np.asarray(self.lr))

    def sweep_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`jaxcfl.sweep` beyond the grid, the key and the folder."""
        from jaxcfl.pde import GuardSchedule, get_scheme

        guard = {}
        if get_scheme(self.scheme).guarded:
            guard = dict(safety=self.safety, guard=GuardSchedule(every=self.every, warmup=self.warmup))
        return dict(self.setup(), steps=self.steps, compare_k=self.compare_k, record_points=self.record_points,
                    chunk_size=self.chunk_size, **guard)


@_options.entry(Options)
def run(o: Options, image: np.ndarray, *, out: str | Path | None = None, progress: bool | None = None,
        log: Callable[[str], None] = stderr, image_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Sweep ``lr x alpha`` on ``image``; returns the JSON-able payload of ``jaxcfl sweep --json``.

    Args:
      image: a 2-D array (:func:`jaxcfl.load_image`).
      lr, alpha: the grid axes (``lr > 0``, ``alpha >= 0``), then the declared :class:`Options`:
      kernel_size, steps, compare_k, record_points, chunk_size: as in :func:`jaxcfl.sweep`.
      seed: PRNG seed of the N(0, 1) initial kernel.
      theory: compute the windowed (and, linear model, the paper's) bounds per ``lr``.
      scheme, model, pool, momentum, a, beta, label, bias, operator: the set-up of :func:`jaxcfl.sweep`;
        ``safety``, ``every`` and ``warmup``: its guard (``guarded_gd`` only).
      out: the output folder (module docstring); ``None``: nothing is written.
      progress: the sweep's progress bar (``None``: on a terminal).
      log: where progress lines go (default stderr).
      image_info: the image's description (:func:`~jaxcfl.experiments.user_image.image_of`).
    """
    lr, alpha = np.asarray(o.lr, np.float64), np.asarray(o.alpha, np.float64)
    info = ui.image_info(image) if image_info is None else image_info
    return ui.in_result_dir(out, "jaxcfl-sweep", "sweep.json", lambda results: _run(
        results, image, info, lr, alpha, o, progress=progress, log=log),
        identity={**o.identity(), "image": info["fingerprint"], "image_shape": info["shape"]})


def _run(results: ResultDir, image: np.ndarray, image_info: dict[str, Any], lr: np.ndarray, alpha: np.ndarray,
         o: Options, *, progress: bool | None, log: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, str]]:
    """:func:`run` in the open ``results``: the sweep, the theory, the payload and the files."""
    import jax

    from jaxcfl.pde._sweeps import sweep

    sweep_dir = results.file("sweep") if results.writes else None
    steps, chunk_size, seed = o.steps, o.chunk_size, o.seed
    n_chunks = -(-(lr.size * alpha.size) // chunk_size)
    on_disk = sweep_chunks_on_disk(sweep_dir, n_chunks)
    log(f"[sweep] {lr.size} lr x {alpha.size} alpha = {lr.size * alpha.size} runs of {steps} steps in {n_chunks} "
        f"chunk(s)" + (f", {on_disk} found in {sweep_dir}" if on_disk else "") + " ...")
    result = sweep(image, o.kernel_size, lr, alpha, key=jax.random.key(seed), out=sweep_dir, progress=progress,
                   **o.sweep_kwargs())
    sweep_seconds = results.seconds()
    log(f"[sweep] {', '.join(f'{n} {s}' for s, n in result.counts().items())}  [{sweep_seconds:.1f}s]")
    notes: list[str] = []
    payload: dict[str, Any] = {
        "command": "sweep",
        "image": image_info,
        "spec": result.spec.to_dict(),
        "seed": seed,
        "settings": o.settings(),
        "rule": result.rule.to_dict(),
        "counts": result.counts(),
        "status": result.status.tolist(),
        "theory": _theory(result, notes) if o.theory else None,
        "runs": result.rows(),
        "chunks": n_chunks,
        "chunks_on_disk": on_disk,
        "chunks_reused": result.chunks_reused,
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
    reused = f", {payload['chunks_reused']} of {payload['chunks']} chunk(s) reused" if payload["chunks_reused"] else ""
    return "\n".join(lines + ui.footer(payload, reused))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    ui.add_image_arguments(parser)
    Options.add_arguments(parser)
    ui.add_output_arguments(parser, "jaxcfl-sweep", "finished chunks of runs")


def main(args: argparse.Namespace) -> dict[str, Any]:
    options = Options.from_args(args)
    image, info = ui.image_of(args, options.kernel_size)
    return run.call(options, image, out=args.out, progress=ui.progress_of(args), image_info=info)
