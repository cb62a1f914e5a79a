"""jaxcfl bounds: the stable range of the weight decay alpha on your own image, beside the CFL theory.

For each kernel size and learning rate, alpha_min and alpha_max are found by running
the scheme (jaxcfl.empirical_bounds: a coarse log grid over --alpha-range, then
vectorised bisection to --rtol) and printed next to the exact windowed CFL bounds of
the linearised scheme and, for the linear model, the paper's non-windowed formulas:
the table of `jaxcfl reproduce table5`, for any image and set-up.

With --out DIR: bounds.csv, bounds.json (what --json prints), and each finished row,
reused when the command is run again with the same settings.

Example:
  jaxcfl bounds --image photo.png --kernel-size 8 16 --lr 1e-4 --scheme nesterov
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxcfl._core.results import ResultDir, stderr
from jaxcfl.experiments import user_image as ui
from jaxcfl.experiments.table5 import bounds_row, bounds_table


def run(
    image: np.ndarray,
    lr: np.ndarray,
    *,
    kernel_sizes: tuple[int, ...] = (16,),
    steps: int = 1000,
    rtol: float = 1e-3,
    alpha_range: tuple[float, float] = (1e-3, 1e12),
    seed: int = 0,
    out: str | Path | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] = stderr,
    image_info: dict[str, Any] | None = None,
    **setup: Any,
) -> dict[str, Any]:
    """The bounds of every ``(kernel size, lr)`` pair; returns the payload of ``jaxcfl bounds --json``.

    ``lr`` (each > 0) and ``kernel_sizes`` make the rows; ``steps``, ``rtol`` and ``alpha_range`` are
    :func:`jaxcfl.empirical_bounds`'s; ``out`` (``None``: nothing is written or reused) is the folder of the
    module docstring. ``image``, ``seed``, ``progress``, ``log`` and ``image_info`` are as in
    :func:`jaxcfl.experiments.image_sweep.run`, and ``setup`` holds the keyword arguments of
    :func:`jaxcfl.empirical_bounds` named in :data:`~jaxcfl.experiments.user_image.SETUP_DEFAULTS`.
    """
    unknown = sorted(set(setup) - set(ui.SETUP_DEFAULTS))
    if unknown:
        raise TypeError(f"run() got unexpected keyword arguments {', '.join(unknown)}")
    setup = {**ui.SETUP_DEFAULTS, **setup}
    info = ui.image_info(image) if image_info is None else image_info
    lrs = [float(x) for x in np.atleast_1d(lr)]

    def body(results: ResultDir) -> tuple[dict[str, Any], dict[str, str]]:
        rows = _rows(results, image, info, lrs, kernel_sizes, steps=steps, rtol=rtol, alpha_range=alpha_range, seed=seed,
                     progress=progress, log=log, setup=setup)
        files = {"csv": results.write_csv("bounds.csv", rows, joins={"notes": "; "}, last=("notes",))} if results.writes else {}
        return {"command": "bounds", "image": info, "setup": setup, "rows": rows}, files

    return ui.in_result_dir(out, "jaxcfl-bounds", "bounds.json", body)


def _rows(results: ResultDir, image: np.ndarray, image_info: dict[str, Any], lrs: list[float], kernel_sizes, *,
          steps: int, rtol: float, alpha_range: tuple[float, float], seed: int, progress: bool | None,
          log: Callable[[str], None], setup: dict[str, Any]) -> list[dict[str, Any]]:
    """:func:`run`'s rows in the open ``results``, reusing the finished ones."""
    import jax

    from jaxcfl import empirical_bounds

    from jaxcfl.pde import _theory as theory
    from jaxcfl.pde._rhs import get_model

    cache = results.row_cache(lambda s: f"{s['scheme']}_w{s['kernel_size']}_lr{s['lr']!r}")
    scheme, model, momentum = setup["scheme"], setup["model"], setup["momentum"]
    spectra: dict[int, Any] = {}  # the windowed spectrum depends on neither lr nor the scheme: one per kernel

    def compute(settings: dict[str, Any]) -> dict[str, Any]:
        w, lr = settings["kernel_size"], settings["lr"]
        log(f"[bounds] kernel {w}x{w}, lr {lr:g}: bisecting alpha_min and alpha_max ...")
        found = empirical_bounds(image, w, lr, steps=steps, rtol=rtol, alpha_range=alpha_range, key=jax.random.key(seed),
                                 progress=progress, theory=False, **setup)
        log(f"[bounds]   alpha in ({found.alpha_min:.4g}, {found.alpha_max:.4g})  "
            f"[{found.seconds:.1f}s, {found.evaluations} runs]")
        if w not in spectra:
            spectra[w] = theory.windowed_spectrum(image, w, model=model, **{k: setup[k] for k in ("a", "beta", "pool",
                                                                                                  "label", "bias")})
        windowed = theory.bounds_from_spectrum(spectra[w], lr, scheme=scheme, momentum=momentum)
        paper = None if not get_model(model).paper_bounds else theory.alpha_bounds(
            image, lr, scheme=scheme, momentum=momentum, a=setup["a"], beta=setup["beta"], pool=setup["pool"])
        return bounds_row(settings, found, windowed, paper)

    rows = []
    for w in kernel_sizes:
        for lr in lrs:
            settings = dict(setup, image=image_info["fingerprint"], image_shape=list(image_info["shape"]), kernel_size=int(w),
                            lr=lr, steps=steps, rtol=rtol, alpha_range=list(alpha_range), seed=seed,
                            dtype=str(jax.numpy.zeros(()).dtype))
            row = cache.load(settings)
            if row is None:
                row = compute(settings)
                cache.save(settings, row)
            else:
                log(f"[bounds] kernel {w}, lr {lr:g}: reusing {results.path}")
            rows.append(row)
    return rows


def _hint(row: dict[str, Any]) -> list[str]:
    """Where no stable alpha was found but the windowed theory has a stable range: how to look there."""
    lo, hi = row["windowed_alpha_min"], row["windowed_alpha_max"]
    found = row["empirical_alpha_min"] is not None and np.isfinite(row["empirical_alpha_min"])
    if found or lo is None or hi is None or not lo < hi or hi <= 0:
        return []
    start = lo / 2 if lo > 0 else hi / 1e4
    hint = (f"the windowed theory has a stable range ({lo:.4g}, {hi:.4g}), which the first log grid of the search "
            f"can step over; look there with --alpha-range {start:.3g}:{2 * hi:.3g}")
    return [hint]


def render(payload: dict[str, Any]) -> str:
    """The table of ``jaxcfl reproduce table5`` (:func:`~jaxcfl.experiments.table5.bounds_table`), with the set-up and notes."""
    rows = payload["rows"]
    steps = sorted({r["steps"] for r in rows})
    lines = ["jaxcfl bounds: " + ui.describe(payload["image"], payload["setup"])
             + f"; {', '.join(map(str, steps))} steps a run", "", bounds_table(rows), ""]
    for r in rows:
        lines.extend(f"note (kernel {r['kernel_size']}, lr {r['lr']:g}): {n}" for n in [*(r["notes"] or []), *_hint(r)])
    rtol = sorted({r["rtol"] for r in rows})
    lines.append(f"emp = found by running the scheme (jaxcfl.empirical_bounds, rtol {', '.join(f'{x:g}' for x in rtol)}); "
                 f"win = exact windowed theory;")
    lines.append("paper = the paper's non-windowed formulas (eqs 26-27, 46-47; linear model only). "
                 "Stable iff a_min < alpha < a_max.")
    return "\n".join(lines + ui.footer(payload))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jaxcfl.experiments._cli_types import (
        int_at_least,
        positive_float,
        positive_grid,
        positive_range,
    )
    from jaxcfl._core.classify import MIN_STEPS

    ui.add_problem_arguments(parser, kernel_sizes=True)
    search = parser.add_argument_group("the learning rates and the search")
    search.add_argument("--lr", type=positive_grid, nargs="+", required=True, metavar="GRID",
                        help="learning rates (dt), a row each: e.g. 1e-4, or 1e-5:1e-3:3; see below")
    search.add_argument("--steps", type=int_at_least(MIN_STEPS), default=1000,
                        help=f"iterations per run (default 1000; at least {MIN_STEPS})")
    search.add_argument("--rtol", type=positive_float, default=1e-3, help="relative precision of each bound (default 1e-3)")
    search.add_argument("--alpha-range", type=positive_range, default=(1e-3, 1e12), metavar="LO:HI",
                        help="where to look for the bounds (default 1e-3:1e12)")
    ui.add_output_arguments(parser, None, "finished rows")


def main(args: argparse.Namespace) -> dict[str, Any]:
    from jaxcfl.experiments._cli_types import merge_grid

    image, info = ui.image_of(args)
    return run(image, merge_grid(args.lr), kernel_sizes=tuple(args.kernel_size), steps=args.steps, rtol=args.rtol,
               alpha_range=args.alpha_range, seed=args.seed, out=args.out, progress=ui.progress_of(args), image_info=info,
               **ui.setup_kwargs(args))
