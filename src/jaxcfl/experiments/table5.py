"""Appendix E, Table 5: empirical weight-decay bounds of the windowed linear PDE, beside the theory.

Set-up: the 256 x 256 checkerboard, kernels 16, 32 and 64, ``a = -0.5``,
``beta = 1``, Nesterov with ``dt = 1e-4`` and ``mu = 0.9`` (the paper's table), and
the gradient-descent analogue with ``lr = 1e-8`` (Section 5.2). Each bound is
found by :func:`jaxcfl.empirical_bounds` (runs of the scheme, vectorised
bisection) and printed next to the exact windowed theory and the paper's
non-windowed formulas. Finished rows are written as they complete and reused
when the command is run again with the same settings.

Started as N processes (:mod:`jaxcfl.distributed`), every bisection and the stability
map run over the devices of all processes; process 0 writes the rows, tables and figure.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from jaxcfl import empirical_bounds

from jaxcfl._core import distributed as distributed

from jaxcfl.pde import _theory as theory
from jaxcfl._core.results import ResultDir, jsonable, stderr
from jaxcfl._core.text import table
from jaxcfl._core.images import checkerboard
from jaxcfl.experiments import _options
from jaxcfl.experiments._options import BOOL, COUNT, MOMENTUM, POSITIVE, option

# Table 5's empirical (alpha_min, alpha_max) by kernel size, for the one (scheme, checkerboard size) the paper ran.
PAPER_EMPIRICAL = {("nesterov", 256): {16: (3.9e6, 1.42e8), 32: (1.3e7, 1.42e8), 64: (3.9e7, 1.42e8)}}
SETTINGS = {"nesterov": 1e-4, "gd": 1e-8}
DEFAULT_OUT = "jaxcfl-table5"


def _operators() -> tuple[str, ...]:
    from jaxcfl.pde._operators import OPERATORS

    return OPERATORS



@dataclasses.dataclass(frozen=True)
class Options(_options.Options):
    """``jaxcfl reproduce table5``'s options (defaults: appendix E's table)."""

    kernel_sizes: tuple[int, ...] = option((16, 32, 64), "kernel sizes (default {default})", COUNT, nargs="+",
                                           flag="--kernel-size")
    schemes: tuple[str, ...] = option(tuple(SETTINGS), "schemes, each at its paper's lr", cli=False,
                                      choices=tuple(SETTINGS), nargs="+")
    size: int = option(256, "checkerboard side (default {default})", COUNT)
    steps: int = option(1000, "iterations per run (default {default})", COUNT)
    rtol: float = option(1e-3, "relative precision of each bound (default {default})", POSITIVE)
    momentum: float = option(0.9, "Nesterov's mu (the paper's)", MOMENTUM, cli=False)
    operator: str = option("auto", "how the scheme applies W C^T C W (default auto: separable products for the "
                           "rank-1 checkerboard; dense and fft are the slower paths)", choices=_operators,
                           identity=False)  # each row records its operator: the folder holds rows of several
    stability_map: bool = option(True, "skip the stability-map sweep and PNG", BOOL, flag="--no-map",
                                 action="store_false", identity=False)

    def validate(self) -> None:
        too_big = [w for w in self.kernel_sizes if w > self.size]
        if too_big:
            raise ValueError(f"{self.spelled('kernel_sizes')} {too_big[0]} is larger than the checkerboard "
                             f"({self.spelled('size')} {self.size})")


@_options.entry(Options)
def run(o: Options, *, out: str | Path | None = None, progress: bool | None = None, log=stderr) -> dict[str, Any]:
    """Run the reproduction; returns ``{"settings": ..., "rows": [...], "files": {...}, "seconds": ...}``.

    ``operator`` is passed to :func:`jaxcfl.empirical_bounds` and the stability-map sweep
    (``"auto"``: separable products on the rank-1 checkerboard; ``"dense"`` or ``"fft"``
    reproduce the slower paths, with the same bounds to within ``rtol``).
    """
    kernel_sizes, schemes, size, steps, rtol, momentum, operator = (o.kernel_sizes, o.schemes, o.size, o.steps,
                                                                    o.rtol, o.momentum, o.operator)
    results = ResultDir(out, kind="table5", identity=o.identity())
    cache = results.row_cache(lambda s: f"{s['scheme']}_w{s['kernel_size']}")
    image = np.asarray(checkerboard(size), np.float64)
    rows = []
    for w in kernel_sizes:
        spectrum = None  # the windowed spectrum does not depend on the scheme: computed once per kernel
        for scheme in schemes:
            lr = SETTINGS[scheme]
            settings = dict(size=size, kernel_size=w, scheme=scheme, lr=lr, steps=steps, rtol=rtol, momentum=momentum,
                            operator=operator)
            cached = cache.load(settings)
            if cached is not None:
                log(f"[table5] {scheme} kernel {w}: reusing {results.path}")
                rows.append(cached)
                continue
            log(f"[table5] {scheme} (lr={lr:g}) kernel {w}x{w}: bisecting alpha_min and alpha_max ...")
            res = empirical_bounds(image, w, lr, scheme=scheme, momentum=momentum, steps=steps, rtol=rtol,
                                   alpha_range=(1e3, 1e11), progress=progress, theory=False, operator=operator)
            if spectrum is None:
                spectrum = theory.windowed_spectrum(image, w)
            windowed = theory.bounds_from_spectrum(spectrum, lr, scheme=scheme, momentum=momentum)
            paper = theory.alpha_bounds(image, lr, scheme=scheme, momentum=momentum)
            paper_emp = PAPER_EMPIRICAL.get((scheme, size), {}).get(w)
            row = bounds_row(settings, res, windowed, paper, paper_emp)
            cache.save(settings, row)
            log(f"[table5]   alpha in ({res.alpha_min:.4g}, {res.alpha_max:.4g})  [{res.seconds:.1f}s, {res.evaluations} runs]")
            rows.append(row)
    files: dict[str, str] = {}
    if results.writes:
        files["csv"] = results.write_csv("table5.csv", rows, joins={"notes": "; "}, last=("notes",))
        files["json"] = results.write_json("table5.json", dict(rows=rows))
        if o.stability_map:
            files["stability_map"] = _stability_map(image, results, steps, momentum, operator, progress, log)
        results.close()
    return dict(settings=o.settings(), rows=rows, files=files, seconds=results.seconds())


# The map's grid: enough lr columns that the stable band's edges read as curves, not a staircase.
MAP_LRS, MAP_ALPHAS = 24, 24


def _stability_map(image, out: ResultDir, steps: int, momentum: float, operator: str, progress, log) -> str:
    from jaxcfl import plot
    from jaxcfl.pde._sweeps import sweep

    log(f"[table5] stability map: nesterov, kernel 16, {MAP_LRS} x {MAP_ALPHAS} (lr, alpha) grid ...")
    result = sweep(image, 16, np.geomspace(3e-5, 3e-4, MAP_LRS), np.geomspace(1e6, 1e9, MAP_ALPHAS), scheme="nesterov",
                   momentum=momentum, steps=steps, out=out.file(f"map_sweep_{operator}_{MAP_LRS}x{MAP_ALPHAS}"),
                   progress=progress, operator=operator)
    return distributed.on_leader(  # one figure, drawn by process 0 of a multi-process run
        lambda: plot.save(plot.stability_map(result, title="Table 5 set-up: Nesterov, kernel 16, checkerboard 256"),
                          out.file("stability_map.png")))


def _gap(found: float, exact: float) -> float | None:
    """``(found - exact) / |exact|``; ``None`` where the exact bound is 0 or not finite (no relative gap)."""
    if exact is None or found is None or not np.isfinite(exact) or exact == 0:
        return None
    return (found - exact) / abs(exact)


def bounds_row(settings: dict[str, Any], found, windowed, paper, paper_empirical: tuple[float, float] | None = None
               ) -> dict[str, Any]:
    """One row of the bounds table (JSON-able): ``settings``, then each bound as found by running the scheme
    (``found``, a :class:`jaxcfl.EmpiricalBounds`), from the exact windowed theory (``windowed``) and from the
    paper's formulas (``paper``, ``None`` where they do not apply), both :class:`jaxcfl.theory.AlphaBounds`,
    with the paper's own empirical values where known and the relative gaps to the windowed theory."""
    row = dict(
        settings,
        empirical_alpha_min=found.alpha_min,
        windowed_alpha_min=windowed.alpha_min,
        paper_alpha_min=None if paper is None else paper.alpha_min,
        paper_empirical_alpha_min=None if paper_empirical is None else paper_empirical[0],
        empirical_alpha_max=found.alpha_max,
        windowed_alpha_max=windowed.alpha_max,
        paper_alpha_max=None if paper is None else paper.alpha_max,
        paper_empirical_alpha_max=None if paper_empirical is None else paper_empirical[1],
        gap_windowed_min=_gap(found.alpha_min, windowed.alpha_min),
        gap_windowed_max=_gap(found.alpha_max, windowed.alpha_max),
        achieved_rtol=getattr(found, "achieved_rtol", None),
        limited_by_steps=getattr(found, "limited_by_steps", None),
        evaluations=found.evaluations,
        rounds=found.rounds,
        seconds=found.seconds,
        notes=found.notes,
    )
    return jsonable(row)


def bounds_table(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`bounds_row` as a text table, in the paper's column order plus the windowed theory."""
    fmt = lambda x: "-" if x is None else f"{x:.4g}"
    header = ["scheme", "lr", "kernel", "emp a_min", "win a_min", "paper a_min", "emp a_max", "win a_max", "paper a_max", "time"]
    body = [
        [r["scheme"], f"{r['lr']:g}", str(r["kernel_size"]), fmt(r["empirical_alpha_min"]), fmt(r["windowed_alpha_min"]),
         fmt(r["paper_alpha_min"]), fmt(r["empirical_alpha_max"]), fmt(r["windowed_alpha_max"]), fmt(r["paper_alpha_max"]),
         f"{r['seconds']:.0f}s"]
        for r in rows
    ]
    return table(body, header)


def render(payload: dict[str, Any]) -> str:
    """The table, in the paper's column order plus the windowed theory."""
    lines = [bounds_table(payload["rows"])]
    lines.append("")
    lines.append("emp = found by running the scheme (jaxcfl.empirical_bounds, rtol 1e-3); win = exact windowed theory;")
    lines.append("paper = non-windowed formulas (eqs 26-27, 46-47). Paper's empirical Table 5 (nesterov):")
    lines.append("alpha_min 3.9e6 / 1.3e7 / 3.9e7 (kernels 16 / 32 / 64), alpha_max 1.42e8.")
    if payload.get("files"):
        lines.append("files: " + ", ".join(payload["files"].values()))
    lines.append(f"total {payload['seconds']:.0f}s")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    Options.add_arguments(parser)
    _options.add_out(parser, DEFAULT_OUT, f"output directory (default ./{DEFAULT_OUT}); finished rows are reused")


def main(args: argparse.Namespace) -> dict[str, Any]:
    return run.call(Options.from_args(args), out=args.out)
