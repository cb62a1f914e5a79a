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
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxcfl._core.results import ResultDir, stderr
from jaxcfl.experiments import user_image as ui
from jaxcfl.experiments.table5 import bounds_row, bounds_table
from jaxcfl._core.classify import MIN_STEPS
from jaxcfl.experiments import _cli_types as types
from jaxcfl.experiments import _options
from jaxcfl.experiments._options import COUNT, POSITIVE, option

SEARCH_GROUP = "the learning rates and the search"


def _empirical_bounds():
    from jaxcfl.pde import empirical_bounds

    return empirical_bounds


def _alpha_range(name: str, value: Any) -> tuple[float, float]:
    lo, hi = (_options.POSITIVE.check(name, float(x)) for x in value)
    if not lo < hi:
        raise ValueError(f"{name} must be LO < HI, got {lo:g}:{hi:g}")
    return lo, hi


@dataclasses.dataclass(frozen=True, kw_only=True)  # the learning rates have no default
class Options(ui.ProblemOptions):
    """``jaxcfl bounds``'s options: the kernels, the learning rates, the search and the set-up
    (:class:`~jaxcfl.experiments.user_image.ProblemOptions`)."""

    lr: tuple[float, ...] = option(help="learning rates (dt), a row each: e.g. 1e-4, or 1e-5:1e-3:3; see below",
                                   kind=_options.Kind(types.positive_grid, _options.POSITIVE.check), nargs="+",
                                   grid=True, required=True, group=SEARCH_GROUP)
    kernel_sizes: tuple[int, ...] = option((16,), "kernel side w (one or more) (default {default})", COUNT, nargs="+",
                                           flag="--kernel-size", group=ui.IMAGE_GROUP)
    steps: int = option(_options.default_of(_empirical_bounds(), "steps"), "iterations per run (default {default}; "
                        f"at least {MIN_STEPS})", _options.at_least(MIN_STEPS), group=SEARCH_GROUP)
    rtol: float = option(_options.default_of(_empirical_bounds(), "rtol"), "relative precision of each bound "
                         "(default {default})", POSITIVE, group=SEARCH_GROUP)
    alpha_range: tuple[float, float] = option(_options.default_of(_empirical_bounds(), "alpha_range"),
                                              "where to look for the bounds (default {default})",
                                              _options.Kind(types.positive_range, _alpha_range), metavar="LO:HI",
                                              group=SEARCH_GROUP)


@_options.entry(Options)
def run(o: Options, image: np.ndarray, *, out: str | Path | None = None, progress: bool | None = None,
        log: Callable[[str], None] = stderr, image_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The bounds of every ``(kernel size, lr)`` pair; returns the payload of ``jaxcfl bounds --json``.

    ``lr`` (each > 0) and ``kernel_sizes`` make the rows; ``steps``, ``rtol`` and ``alpha_range`` are
    :func:`jaxcfl.empirical_bounds`'s, and so are the set-up options (``scheme``, ``model``, ...:
    :data:`~jaxcfl.experiments.user_image.SETUP_DEFAULTS`); ``out`` (``None``: nothing is written or reused)
    is the folder of the module docstring. ``image``, ``seed``, ``progress``, ``log`` and ``image_info`` are
    as in :func:`jaxcfl.experiments.image_sweep.run`.
    """
    setup = o.setup()
    kernel_sizes, steps, rtol, alpha_range, seed = o.kernel_sizes, o.steps, o.rtol, o.alpha_range, o.seed
    info = ui.image_info(image) if image_info is None else image_info
    lrs = [float(x) for x in o.lr]

    def body(results: ResultDir) -> tuple[dict[str, Any], dict[str, str]]:
        rows = _rows(results, image, info, lrs, kernel_sizes, steps=steps, rtol=rtol, alpha_range=alpha_range, seed=seed,
                     progress=progress, log=log, setup=setup)
        files = {"csv": results.write_csv("bounds.csv", rows, joins={"notes": "; "}, last=("notes",))} if results.writes else {}
        return {"command": "bounds", "image": info, "setup": setup, "settings": o.settings(), "rows": rows}, files

    return ui.in_result_dir(out, "jaxcfl-bounds", "bounds.json", body,
                            identity={**o.identity(), "image": info["fingerprint"], "image_shape": info["shape"]})


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
    achieved = [r.get("achieved_rtol") for r in rows]
    reached = ("; achieved " + ", ".join("unverified" if a is None else f"{a:.2g}" for a in achieved)
               + (" (too few --steps: raise them)" if any(r.get("limited_by_steps") for r in rows) else ""))
    lines.append(f"emp = found by running the scheme (jaxcfl.empirical_bounds, rtol {', '.join(f'{x:g}' for x in rtol)}"
                 f"{reached}); win = exact windowed theory;")
    lines.append("paper = the paper's non-windowed formulas (eqs 26-27, 46-47; linear model only). "
                 "Stable iff a_min < alpha < a_max.")
    return "\n".join(lines + ui.footer(payload))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    ui.add_image_arguments(parser)
    Options.add_arguments(parser)
    ui.add_output_arguments(parser, None, "finished rows")


def main(args: argparse.Namespace) -> dict[str, Any]:
    options = Options.from_args(args)
    image, info = ui.image_of(args, options.kernel_sizes)
    return run.call(options, image, out=args.out, progress=ui.progress_of(args), image_info=info)
