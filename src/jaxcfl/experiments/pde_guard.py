"""The CFL guard on the PDE (appendix A's question, Section 5's problem), on Figure 4's set-up.

The nonlinear one-layer CNN of Figure 4 (256 x 256 checkerboard, 32 x 32 kernel drawn
N(0, 1), Swish beta = 1, label 1, mean pooling, 1000 full-batch iterations, k = 1 against
k = 3), stepped by forward Euler (``gd``, eq 21) and by the guarded scheme ``guarded_gd``:
the same step with ``dt_n = min(lr, safety 2 / lambda_n)``, ``lambda_n`` the top eigenvalue
of the Jacobian of the gradient at the current kernel (:func:`jaxcfl.pde.guarded_euler_step`).

Two parts, each one :func:`jaxcfl.sweep` per scheme (resumable under ``OUT``):

* **Figure 4's column** (alpha = 20, the paper's eight learning rates): the classes
  without and with the guard, and three claims on the guard, checked on the run:
  every configuration restrained without the guard is stable with it; its k = 1 vs k = 3
  divergence stays at rounding level; it ends at the loss of the configurations that were
  stable without the guard.
* **The stability map** over an ``lr x alpha`` grid, without and with the guard, beside
  the bound of eq 51 (``lr < 2/alpha``) and the local limit ``2/lambda(K*)`` at the minimum
  that the guarded runs reach.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxcfl import plot

from jaxcfl.pde import _theory as theory
from jaxcfl._core.results import ResultDir, stderr
from jaxcfl._core.text import table
from jaxcfl._core.classify import Rule
from jaxcfl.experiments.fig4 import PAPER_ALPHA, PAPER_LR, WINDOW, check_problem, curves_of
from jaxcfl._core.images import checkerboard
from jaxcfl.pde._integration import integrate
from jaxcfl.pde._rhs import loss
from jaxcfl.pde._problem import make_hyper
from jaxcfl.pde._setup import make_problem
from jaxcfl.pde._schemes import GuardSchedule, get_scheme
from jaxcfl.pde._sweeps import SweepResult, sweep
from jaxcfl._core import validate as v
from jaxcfl.experiments import _options
from jaxcfl.experiments._options import COUNT, COUNT0, PERTURBATION, POSITIVE, SAFETY, SEED, option

SCHEMES = ("gd", "guarded_gd")
MAP_LR = tuple(float(x) for x in np.geomspace(0.005, 0.4, 14))
MAP_ALPHA = tuple(float(x) for x in np.geomspace(2.0, 200.0, 11))
ROUNDING = 64.0
DEFAULT_OUT = "jaxcfl-pde-guard"
"""Divergence "at rounding level": at most ``ROUNDING * eps`` of the dtype (the classification
rule's ``rounding`` factor, :class:`jaxcfl.Rule`)."""


@dataclasses.dataclass(frozen=True)
class Options(_options.Options):
    """``jaxcfl reproduce pde-guard``'s options: Figure 4's (:class:`jaxcfl.experiments.fig4.Options`), the
    stability map's axes and the guard's (defaults: :func:`jaxcfl.sweep`'s and :class:`jaxcfl.GuardSchedule`'s)."""

    lr: tuple[float, ...] = option(PAPER_LR, "Figure 4's learning rates (default: the paper's eight)", POSITIVE,
                                   nargs="+")
    alpha: float = option(PAPER_ALPHA, "Figure 4's weight decay (default {default})", POSITIVE)
    map_lr: tuple[float, ...] = option(MAP_LR, "the map's learning rates (default: 14 from 0.005 to 0.4; none: no "
                                       "map)", POSITIVE, nargs="*")
    map_alpha: tuple[float, ...] = option(MAP_ALPHA, "the map's weight decays (default: 11 from 2 to 200)", POSITIVE,
                                          nargs="+")
    size: int = option(256, "checkerboard side (default {default})", COUNT)
    kernel_size: int = option(32, "kernel side (default {default})", COUNT)
    steps: int = option(1000, "iterations per run (default {default})", COUNT)
    k: float = option(3.0, "perturbation factor compared with k = 1 (default {default})", PERTURBATION)
    safety: float = option(_options.pde_default("safety"), "the guard's margin in (0, 1] (default {default})",
                           SAFETY)
    every: int = option(GuardSchedule.every, "refresh lambda every EVERY iterations (default {default})", COUNT,
                        settings=False)
    warmup: int = option(GuardSchedule.warmup, "and at each of the first WARMUP iterations (default {default})",
                         COUNT0, settings=False)
    seed: int = option(0, "seed of the N(0,1) initial kernel (default {default})", SEED)
    chunk_size: int = option(16, "runs per compiled call, and per saved chunk (default {default})", COUNT,
                             settings=False, identity=False)  # the sweeps' own folders check it

    def validate(self) -> None:
        check_problem(self)
        if self.map_lr:
            v.check_perturbation(self.spelled("k"), self.k, lr=np.asarray(self.map_lr))

    def guard(self) -> GuardSchedule:
        return GuardSchedule(every=self.every, warmup=self.warmup)


@_options.entry(Options)
def run(o: Options, *, out: str | Path | None = None, progress: bool | None = None,
        log: Callable[[str], None] = stderr) -> dict[str, Any]:
    """Run both parts; returns a JSON-able payload (``column``, ``map``, ``claims``, ``files``).

    Args:
      lr, alpha: Figure 4's learning rates and weight decay (default: the paper's).
      map_lr, map_alpha: the axes of the stability map (``map_lr=()`` skips the map).
      size, kernel_size, steps, k, seed: as ``jaxcfl reproduce fig4``.
      safety, every, warmup: the guard's margin and its :class:`~jaxcfl.GuardSchedule`.
      chunk_size: configurations per compiled call and per saved chunk.
      out: output directory (``pde_guard.png``, ``.csv``, ``.json``, ``pde_guard_curves.npz``
        and the four resumable sweeps); ``None`` writes nothing.
    """
    lr, alpha, map_lr, map_alpha, kernel_size, steps, k = list(o.lr), o.alpha, o.map_lr, o.map_alpha, o.kernel_size, \
        o.steps, o.k
    guard, safety, seed = o.guard(), o.safety, o.seed
    results = ResultDir(out, kind="pde-guard", identity=o.identity())
    image = np.asarray(checkerboard(o.size), np.float64)
    common = dict(model="nonlinear", pool="mean", beta=1.0, label=1.0, compare_k=k, steps=steps, safety=safety,
                  guard=guard, key=jax.random.key(seed), chunk_size=o.chunk_size, progress=progress)

    seconds: dict[str, float] = {}

    def run_sweep(name: str, scheme: str, lrs, alphas, record_points: int) -> SweepResult:
        folder = results.file(f"sweep_{name}_{scheme}") if results.writes else None
        log(f"[pde-guard] {name}: {scheme}, {len(lrs)} lr x {len(alphas)} alpha, {steps} steps, k = 1 vs {k:g} ...")
        start = time.perf_counter()
        res = sweep(image, kernel_size, lrs, alphas, scheme=scheme, record_points=record_points, out=folder, **common)
        seconds[f"{name}_{scheme}"] = time.perf_counter() - start
        log(f"[pde-guard]   {', '.join(f'{n} {c}' for c, n in res.counts().items())} "
            f"({seconds[f'{name}_{scheme}']:.0f}s, compile included; chunks on disk are not recomputed)")
        return res

    column = {s: run_sweep("fig4", s, lr, [float(alpha)], steps) for s in SCHEMES}
    maps = {}
    if len(map_lr):
        maps = {s: run_sweep("map", s, [float(x) for x in map_lr], [float(x) for x in map_alpha], 100) for s in SCHEMES}
    dtype = column["gd"].spec.dtype
    rows = _column_rows(column)
    claims = _claims(rows, np.finfo(np.dtype(dtype)).eps)
    cycles = []
    summary = _map_summary(maps) if maps else None
    if summary:
        for row in summary["guarded_not_stable"]:
            ratio = row["update_over_rounding_threshold"]
            if ratio is None or ratio > CYCLE_RATIO:
                cycles.append({**row, **_cycle_spectra(image, kernel_size, row["lr"], row["alpha"], steps=steps,
                                                        safety=safety, guard=guard, seed=seed)})
    payload: dict[str, Any] = dict(
        experiment="pde-guard",
        settings=o.settings(guard=dict(vars(guard)), model="nonlinear", pool="mean", beta=1.0, label=1.0,
                            dtype=dtype),
        lr_bound=theory.multilayer_lr_bound(alpha),
        rows=rows,
        claims=claims,
        map=summary,
        cycles=cycles,
        sweep_seconds=seconds,
    )
    files: dict[str, str] = {}
    if results.writes:  # the numbers first, then the figure
        files["csv"] = results.write_csv("pde_guard.csv", rows)
        arrays = {f"{s}_{name}": np.asarray(c) for s in SCHEMES
                  for name, c in curves_of(column[s], WINDOW).items() if name != "window"}
        files["npz"] = results.write_npz("pde_guard_curves.npz", dict(lr=np.asarray(lr), **arrays))
        png = _options.figure_file(results.file("pde_guard.png"), lambda: figure(column, maps), log)
        files.update({"png": png} if png else {})
    return results.finish(payload, "pde_guard.json", files)


def _column_rows(column: dict[str, SweepResult]) -> list[dict[str, Any]]:
    """One row per lr: the class, final loss and divergence without and with the guard."""
    plain, guarded = column["gd"], column["guarded_gd"]
    rows = []
    for i, x in enumerate(plain.lr):
        m0 = {name: arr[i, 0] for name, arr in plain.metrics.items()}
        m1 = {name: arr[i, 0] for name, arr in guarded.metrics.items()}
        rows.append(dict(
            lr=float(x), status=str(plain.status[i, 0]), guarded_status=str(guarded.status[i, 0]),
            final_loss=_number(m0["final_loss"]), guarded_final_loss=_number(m1["final_loss"]),
            divergence=_number(m0["divergence"]), guarded_divergence=_number(m1["divergence"]),
            guard_lr=_number(m1["guard_lr"]), guard_lr_min=_number(m1["guard_lr_min"]),
            guard_lambda=_number(m1["guard_lambda"]),
        ))
    return rows


def _number(x: Any) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def _claims(rows: list[dict[str, Any]], eps: float) -> dict[str, Any]:
    """The three claims on Figure 4's column, each with the numbers that decide it."""
    restrained = [r for r in rows if r["status"] == "restrained"]
    stable_losses = [r["final_loss"] for r in rows if r["status"] == "stable" and r["final_loss"] is not None]
    reference = float(np.mean(stable_losses)) if stable_losses else None
    divergences = [r["guarded_divergence"] for r in restrained]
    gaps = [abs(r["guarded_final_loss"] - reference) / abs(reference)
            if reference is not None and r["guarded_final_loss"] is not None else None for r in restrained]
    return dict(
        restrained_without_guard=[r["lr"] for r in restrained],
        all_become_stable=bool(restrained) and all(r["guarded_status"] == "stable" for r in restrained),
        max_divergence_with_guard=max((d for d in divergences if d is not None), default=None),
        rounding_level=ROUNDING * eps,
        divergence_at_rounding_level=bool(restrained) and all(d is not None and d <= ROUNDING * eps for d in divergences),
        stable_loss=reference,
        max_relative_loss_gap=max((g for g in gaps if g is not None), default=None),
        same_loss=bool(restrained) and all(g is not None and g <= 1e-3 for g in gaps),
    )


LOOSE = Rule(rounding=2 * Rule().rounding)
"""The sensitivity check of the map: the classification rule with twice its rounding threshold."""


CYCLE_RATIO = 100.0
"""A guarded run whose last update exceeds the rounding threshold this many times has not settled:
its last two kernels are examined (:func:`_cycle_spectra`)."""


def _cycle_spectra(image: np.ndarray, kernel_size: int, lr: float, alpha: float, *, steps: int, safety: float,
                   guard: GuardSchedule, seed: int) -> dict[str, Any]:
    """Rerun one guarded configuration and give the extreme eigenvalues of the Jacobian of the
    gradient at its last two kernels (:func:`jaxcfl.theory.local_spectrum`): a run that cycles
    with ``dt lambda_max < 2`` at both ends passes through negative curvature, a mode that grows
    for every step size."""
    problem = make_problem(image, kernel_size, pool="mean", model="nonlinear")
    hyper = make_hyper(lr, alpha, beta=1.0, label=1.0, safety=safety, dtype=problem.dtype)
    kernel0 = jax.random.normal(jax.random.key(seed), problem.kernel_shape, problem.dtype)
    traj = integrate(problem, kernel0, hyper, scheme="guarded_gd", model="nonlinear", steps=steps, record_every=steps,
                     guard=guard)
    out = {}
    for name, kernel in (("last", traj.state.kernel), ("previous", traj.state.previous)):
        ext = theory.local_spectrum(problem, kernel, hyper, model="nonlinear")
        out[f"{name}_lambda_min"] = float(ext.minimum)
        out[f"{name}_lambda_max"] = float(ext.maximum)
        out[f"{name}_loss"] = float(loss(problem, kernel, hyper))
    out["dt"] = float(traj.state.step_size)
    return out


def _map_summary(maps: dict[str, SweepResult]) -> dict[str, Any]:
    """Counts per scheme (also under :data:`LOOSE`), what the guard did to each class, and why
    each guarded run that is not stable is not."""
    plain, guarded = maps["gd"].status, maps["guarded_gd"].status
    moved = {f"{a}->{b}": int(np.sum((plain == a) & (guarded == b)))
             for a in ("stable", "restrained", "divergent") for b in ("stable", "restrained", "divergent")}
    res = maps["guarded_gd"]
    eps = np.finfo(np.dtype(res.spec.dtype)).eps
    m = res.metrics
    not_stable = []
    for i, j in zip(*np.nonzero(guarded != "stable")):
        threshold = res.rule.rounding * eps * float(m["final_norm"][i, j])
        not_stable.append(dict(
            lr=float(res.lr[i]), alpha=float(res.alpha[j]), status=str(guarded[i, j]), without_guard=str(plain[i, j]),
            update_over_rounding_threshold=_number(float(m["final_update"][i, j]) / threshold) if threshold > 0 else None,
            divergence=_number(m["divergence"][i, j]), guard_acted=bool(m["guard_lr_min"][i, j] < res.lr[i] * (1 - 1e-5)),  # float32 against float64
            lr_times_lambda=_number(float(m["guard_lr"][i, j]) * float(m["guard_lambda"][i, j])),
        ))
    return dict(counts={s: r.counts() for s, r in maps.items()},
                counts_loose_rule={s: r.reclassify(LOOSE).counts() for s, r in maps.items()},
                loose_rule=LOOSE.to_dict(), transitions=moved, guarded_not_stable=not_stable,
                local_limit=_local_limit(res))


def _local_limit(guarded: SweepResult) -> dict[str, list[float | None]]:
    """``2 / lambda(K_end)`` per alpha: the local CFL limit at the point the guarded runs reach
    (the median over the lr that ended finite; ``None`` where none did)."""
    lam = np.where(guarded.status == "divergent", np.nan, guarded.metrics["guard_lambda"])
    with np.errstate(all="ignore"):
        limit = [float(2.0 / np.nanmedian(col)) if np.any(np.isfinite(col)) else None for col in lam.T]
    return dict(alpha=[float(a) for a in guarded.alpha], lr=limit)


def figure(column: dict[str, SweepResult], maps: dict[str, SweepResult]):
    """Top: Figure 4's divergence (k = 1 vs 3) without and with the guard. Bottom: the maps."""
    plt = plot.pyplot()
    rows = 2 if maps else 1
    fig, axes = plt.subplots(rows, 2, figsize=(12.8, 4.8 * rows), squeeze=False)
    for ax, scheme in zip(axes[0], SCHEMES):
        res = column[scheme]
        curves = curves_of(res, WINDOW)
        smooth = curves["divergence_ma"]
        labels = [f"lr = {x:g}" for x in res.lr]
        plot.loss_curves(curves["ma_iterations"], np.where(smooth > 0, smooth, np.nan), labels,
                         statuses=res.status[:, 0], ax=ax, ylabel=f"divergence, moving average of {curves['window']}",
                         title=f"{_label(scheme)}: alpha = {res.alpha[0]:g}, k = 1 vs {res.spec.compare_k:g}",
                         loglog=False)
        ax.set_yscale("log")
    if maps:
        limit = _local_limit(maps["guarded_gd"])
        for ax, scheme in zip(axes[1], SCHEMES):
            res = maps[scheme]
            plot.stability_map(res, ax=ax, theory=False, title=f"{_label(scheme)}: nonlinear CNN, {res.spec.steps} steps")
            a = np.asarray(res.alpha)
            ax.plot(2.0 / a, a, "k--", lw=1.5, label="eq 51: lr = 2 / alpha")
            lr_local = np.array([np.nan if x is None else x for x in limit["lr"]])
            ax.plot(lr_local, a, "b-", lw=1.5, label="2 / lambda_max at the guarded runs' end")
            handles, _ = ax.get_legend_handles_labels()
            ax.legend(handles=ax.get_legend().legend_handles + handles, fontsize=7, loc="upper right")
            ax.set_xlim(plot.cell_edges(res.lr)[[0, -1]])
    fig.tight_layout()
    return fig


def _label(scheme: str) -> str:
    return "with the CFL guard" if get_scheme(scheme).guarded else "forward Euler (no guard)"


def render(payload: dict[str, Any]) -> str:
    """Figure 4's column without and with the guard, the claims, and the map's transitions."""
    fmt = lambda x: "-" if x is None else f"{x:.3g}"
    s = payload["settings"]
    header = ["lr", "class", "guarded", "final loss", "guarded", "div last100", "guarded", "dt_n min", "dt_n end",
              "lambda end"]
    body = [[f"{r['lr']:g}", r["status"], r["guarded_status"], fmt(r["final_loss"]), fmt(r["guarded_final_loss"]),
             fmt(r["divergence"]), fmt(r["guarded_divergence"]), fmt(r["guard_lr_min"]), fmt(r["guard_lr"]),
             fmt(r["guard_lambda"])] for r in payload["rows"]]
    c = payload["claims"]
    yes = lambda b: "yes" if b else "NO"
    lines = [
        f"The CFL guard on Figure 4's set-up: nonlinear CNN, checkerboard {s['size']}, kernel {s['kernel_size']}, "
        f"mean pooling, alpha = {s['alpha']:g}, {s['steps']} steps, k = 1 vs {s['k']:g}, safety {s['safety']:g} "
        f"({s['dtype']})",
        "",
        table(body, header),
        "",
        f"restrained without the guard: lr {', '.join(f'{x:g}' for x in c['restrained_without_guard']) or 'none'}",
        f"  all stable with it: {yes(c['all_become_stable'])}",
        f"  k = 1 vs k = {s['k']:g} divergence at rounding level (<= {c['rounding_level']:.2g}): "
        f"{yes(c['divergence_at_rounding_level'])} (largest {fmt(c['max_divergence_with_guard'])})",
        f"  same loss as the stable runs ({fmt(c['stable_loss'])}, relative gap <= 1e-3): {yes(c['same_loss'])} "
        f"(largest gap {fmt(c['max_relative_loss_gap'])})",
    ]
    if payload.get("map"):
        m = payload["map"]
        lines += ["", f"stability map, {len(s['map_lr'])} lr x {len(s['map_alpha'])} alpha:"]
        for scheme, counts in m["counts"].items():
            lines.append(f"  {scheme:<11} " + ", ".join(f"{n} {c}" for c, n in counts.items()))
        lines.append("  without -> with the guard: "
                     + ", ".join(f"{k} {n}" for k, n in m["transitions"].items() if n))
        lines.append(f"  with twice the rounding threshold (Rule(rounding={m['loose_rule']['rounding']:g})): "
                     + "; ".join(f"{scheme} " + ", ".join(f"{n} {c}" for c, n in counts.items())
                                 for scheme, counts in m["counts_loose_rule"].items()))
        if m["guarded_not_stable"]:
            lines.append("  guarded runs that are not stable:")
            for r in m["guarded_not_stable"]:
                lines.append(f"    lr {r['lr']:.4g}, alpha {r['alpha']:.4g}: {r['status']} (without: {r['without_guard']}); "
                             f"final update {fmt(r['update_over_rounding_threshold'])} x the rounding threshold, "
                             f"divergence {fmt(r['divergence'])}, guard {'acted' if r['guard_acted'] else 'never acted'}, "
                             f"dt lambda_max at the end {fmt(r['lr_times_lambda'])}")
    for c in payload.get("cycles") or []:
        lines.append(f"  lr {c['lr']:.4g}, alpha {c['alpha']:.4g} cycles: its last two kernels have Hessian spectra "
                     f"[{c['previous_lambda_min']:.4g}, {c['previous_lambda_max']:.4g}] and "
                     f"[{c['last_lambda_min']:.4g}, {c['last_lambda_max']:.4g}] (losses {c['previous_loss']:.4g}, "
                     f"{c['last_loss']:.4g}); dt = {c['dt']:.4g} keeps dt lambda_max < 2 at both, the negative "
                     f"eigenvalues grow for every dt")
    if payload.get("files"):
        lines.append("files: " + ", ".join(payload["files"].values()))
    seconds = payload["sweep_seconds"]
    lines.append(f"total {payload['seconds']:.0f}s; sweeps (compile included, 0 if on disk): "
                 + ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items()))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    Options.add_arguments(parser)
    _options.add_out(parser, DEFAULT_OUT, f"output directory (default ./{DEFAULT_OUT}); finished sweep chunks are "
                     "reused")


def main(args: argparse.Namespace) -> dict[str, Any]:
    return run.call(Options.from_args(args), out=args.out)
