"""Appendix E, Table 5: empirical weight-decay bounds of the windowed linear PDE, beside the theory.

Set-up: the 256 x 256 checkerboard, kernels 16, 32 and 64, ``a = -0.5``,
``beta = 1``, Nesterov with ``dt = 1e-4`` and ``mu = 0.9`` (the paper's table), and
the gradient-descent analogue with ``lr = 1e-8`` (Section 5.2). Each bound is
found by :func:`jaxcfl.empirical_bounds` (runs of the scheme, vectorised
bisection) and printed next to the exact windowed theory and the paper's
non-windowed formulas. Finished rows are written as they complete and reused
when the command is run again with the same settings.

Started as N processes (:mod:`jaxcfl._core.distributed`), every bisection and the stability
map run over the devices of all processes; process 0 writes the rows, tables and figure.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from jaxcfl import empirical_bounds

from jaxcfl._core import distributed as distributed

from jaxcfl.pde import _theory as theory
from jaxcfl._core.results import ResultDir, jsonable, stderr
from jaxcfl._core.text import table
from jaxcfl._core.images import checkerboard

# Table 5's empirical (alpha_min, alpha_max) by kernel size, for the one (scheme, checkerboard size) the paper ran.
PAPER_EMPIRICAL = {("nesterov", 256): {16: (3.9e6, 1.42e8), 32: (1.3e7, 1.42e8), 64: (3.9e7, 1.42e8)}}
SETTINGS = {"nesterov": 1e-4, "gd": 1e-8}


def run(
    *,
    kernel_sizes: tuple[int, ...] = (16, 32, 64),
    schemes: tuple[str, ...] = ("nesterov", "gd"),
    size: int = 256,
    steps: int = 1000,
    rtol: float = 1e-3,
    momentum: float = 0.9,
    operator: str = "auto",
    out: str | Path | None = None,
    stability_map: bool = True,
    progress: bool | None = None,
    log=stderr,
) -> dict[str, Any]:
    """Run the reproduction; returns ``{"rows": [...], "files": {...}, "seconds": ...}``.

    ``operator`` is passed to :func:`jaxcfl.empirical_bounds` and the stability-map sweep
    (``"auto"``: separable products on the rank-1 checkerboard; ``"dense"`` or ``"fft"``
    reproduce the slower paths, with the same bounds to within ``rtol``).
    """
    results = ResultDir(out, kind="table5")
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
        if stability_map:
            files["stability_map"] = _stability_map(image, results, steps, momentum, operator, progress, log)
        results.close()
    return dict(rows=rows, files=files, seconds=results.seconds())


def _stability_map(image, out: ResultDir, steps: int, momentum: float, operator: str, progress, log) -> str:
    from jaxcfl import plot
    from jaxcfl.pde._sweeps import sweep

    log("[table5] stability map: nesterov, kernel 16, 6 x 16 (lr, alpha) grid ...")
    result = sweep(image, 16, np.geomspace(3e-5, 3e-4, 6), np.geomspace(1e6, 1e9, 16), scheme="nesterov",
                   momentum=momentum, steps=steps, out=out.file(f"map_sweep_{operator}"), progress=progress,
                   operator=operator)
    return distributed.on_leader(  # one figure, drawn by process 0 of a multi-process run
        lambda: plot.save(plot.stability_map(result, title="Table 5 set-up: Nesterov, kernel 16, checkerboard 256"),
                          out.file("stability_map.png")))


def bounds_row(settings: dict[str, Any], found, windowed, paper, paper_empirical: tuple[float, float] | None = None
               ) -> dict[str, Any]:
    """One row of the bounds table (JSON-able): ``settings``, then each bound as found by running the scheme
    (``found``, a :class:`jaxcfl.EmpiricalBounds`), from the exact windowed theory (``windowed``) and from the
    paper's formulas (``paper``, ``None`` where they do not apply), both :class:`jaxcfl.pde._theory.AlphaBounds`,
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
        gap_windowed_min=(found.alpha_min - windowed.alpha_min) / abs(windowed.alpha_min),
        gap_windowed_max=(found.alpha_max - windowed.alpha_max) / abs(windowed.alpha_max),
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
    from jaxcfl.experiments._cli_types import positive_float, positive_int

    parser.add_argument("--kernel-size", type=positive_int, nargs="+", default=[16, 32, 64],
                        help="kernel sizes (default 16 32 64)")
    parser.add_argument("--size", type=positive_int, default=256, help="checkerboard side (default 256)")
    parser.add_argument("--steps", type=positive_int, default=1000, help="iterations per run (default 1000)")
    parser.add_argument("--rtol", type=positive_float, default=1e-3,
                        help="relative precision of each bound (default 1e-3)")
    parser.add_argument("--out", default="jaxcfl-table5",
                        help="output directory (default ./jaxcfl-table5); finished rows are reused")
    parser.add_argument("--no-map", action="store_true", help="skip the stability-map sweep and PNG")
    parser.add_argument("--operator", choices=("auto", "separable", "dense", "fft"), default="auto",
                        help="how the scheme applies W C^T C W (default auto: separable products for the "
                             "rank-1 checkerboard; dense and fft are the slower paths)")


def main(args: argparse.Namespace) -> dict[str, Any]:
    return run(kernel_sizes=tuple(args.kernel_size), steps=args.steps, rtol=args.rtol, out=args.out,
               stability_map=not args.no_map, size=args.size, operator=args.operator)
