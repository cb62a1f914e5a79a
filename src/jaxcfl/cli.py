"""The ``jaxcfl`` command line: argument parsing and printing only; the work is in the modules."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxcfl.experiments._cli_types import IMAGE_HELP, read_image
from jaxcfl.experiments._cli_types import positive_float as _positive_float
from jaxcfl.experiments._cli_types import positive_int as _positive_int
from jaxcfl._core.results import stderr as _progress
from jaxcfl._core.text import table as table_text
from jaxcfl._version import __version__
from jaxcfl.experiments import COMMANDS, EXPERIMENTS


class _Parser(argparse.ArgumentParser):
    """Bad input on the command line: one line on stderr (no usage block, no traceback) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _emit(payload: Any, as_json: bool, render) -> None:
    if as_json:  # strict JSON: NaN and infinities are null, and "non_finite" says where
        from jaxcfl._core.results import strict_payload

        json.dump(strict_payload(payload), sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
    else:
        render(payload)


# --- jaxcfl theory --------------------------------------------------------------------

PAPER_LR = {"nesterov": 1e-4, "gd": 1e-8}  # appendix E and Section 5.2
THEORY_SCHEMES = {"gd": ("gd",), "nesterov": ("nesterov",), "both": ("nesterov", "gd")}  # --scheme: the schemes it runs


THEORY_MOMENTUM = 0.9
"""``jaxcfl theory --momentum``'s default: the paper's Nesterov mu (appendix E)."""


def _check_theory(args: argparse.Namespace) -> None:
    """``jaxcfl theory``'s options, before any work: the model's constants in the working dtype, no
    kernel size twice, and no ``--momentum`` where no scheme uses it."""
    from jaxcfl._core import validate as v
    from jaxcfl.pde._schemes import get_scheme

    v.check_in_dtype("--a", args.a, "finite")
    v.check_in_dtype("--beta", args.beta, "finite")
    v.check_distinct("--kernel-size", args.kernel_size)
    if args.momentum != THEORY_MOMENTUM and not any(get_scheme(s).uses_momentum for s in THEORY_SCHEMES[args.scheme]):
        raise ValueError(f"--momentum is ignored here (no scheme of --scheme {args.scheme} uses it); leave it out")


def cmd_theory(args: argparse.Namespace) -> int:
    from jaxcfl.pde import _theory as theory
    from jaxcfl.pde._rhs import get_model
    from jaxcfl.pde._schemes import get_scheme

    _check_theory(args)
    image = read_image(args.image, args.size)
    schemes = THEORY_SCHEMES[args.scheme]
    paper_bounds = get_model(args.model).paper_bounds
    rows = []
    for w in args.kernel_size:
        _progress(f"[theory] windowed spectrum, kernel {w}x{w} on a {image.shape[0]}x{image.shape[1]} image ...")
        start = time.perf_counter()
        spectrum = theory.windowed_spectrum(image, w, model=args.model, a=args.a, beta=args.beta, pool=args.pool)
        seconds = time.perf_counter() - start
        for scheme in schemes:
            lr = args.lr if args.lr is not None else PAPER_LR[scheme]
            paper = theory.alpha_bounds(image, lr, a=args.a, beta=args.beta, scheme=scheme, momentum=args.momentum, pool=args.pool)
            windowed = theory.bounds_from_spectrum(spectrum, lr, scheme=scheme, momentum=args.momentum)
            rows.append(
                dict(
                    scheme=scheme,
                    lr=lr,
                    momentum=args.momentum if get_scheme(scheme).uses_momentum else None,
                    kernel_size=w,
                    model=args.model,
                    windowed_alpha_min=windowed.alpha_min,
                    windowed_alpha_max=windowed.alpha_max,
                    paper_alpha_min=paper.alpha_min if paper_bounds else None,
                    paper_alpha_max=paper.alpha_max if paper_bounds else None,
                    lanczos_iterations=spectrum.iterations,
                    lanczos_residual=max(spectrum.residual_min, spectrum.residual_max),
                    spectrum_seconds=seconds,
                )
            )
    payload = dict(
        image=args.image if args.image != "checkerboard" else f"checkerboard {args.size or 256}",
        a=args.a,
        beta=args.beta,
        pool=args.pool,
        rows=rows,
    )

    def render(p):
        print(f"CFL bounds on the weight decay alpha  (image: {p['image']}, a={p['a']}, beta={p['beta']}, pool={p['pool']})")
        print("paper = non-windowed formulas (eqs 26-27 gd, 46-47 nesterov); windowed = exact bounds of the stepped system\n")
        fmt = lambda x: "-" if x is None else f"{x:.4g}"
        table = [
            [r["scheme"], f"{r['lr']:g}", f"{r['kernel_size']}", fmt(r["windowed_alpha_min"]), fmt(r["paper_alpha_min"]),
             fmt(r["windowed_alpha_max"]), fmt(r["paper_alpha_max"]), f"{r['spectrum_seconds']:.1f}s"]
            for r in p["rows"]
        ]
        print(table_text(table, ["scheme", "lr", "kernel", "win a_min", "paper a_min", "win a_max", "paper a_max", "time"]))
        print("\nStable iff alpha_min < alpha < alpha_max. The paper's empirical Table 5 (nesterov, dt=1e-4):"
              " a_min 3.9e6 / 1.3e7 / 3.9e7 for kernels 16 / 32 / 64, a_max 1.42e8.")

    _emit(payload, args.json, render)
    return 0


# --- jaxcfl heat --------------------------------------------------------------------------

def cmd_heat(args: argparse.Namespace) -> int:
    from jaxcfl._core import validate as v
    from jaxcfl.pde import _heat as heat

    v.check_distinct("--dt", args.dt)  # each a run of its own
    v.check_distinct("--times", args.times)
    results = []
    for dt in args.dt:
        snaps = np.asarray(heat.snapshots(dt, tuple(args.times), max_steps=None if args.long else heat.MAX_STEPS))
        growth = heat.perturbation_growth(dt, args.steps)
        results.append(
            dict(
                dt=dt,
                cfl_stable=bool(dt <= 0.5),
                times=list(args.times),
                snapshots=snaps.tolist(),
                max_abs=[float(np.abs(s).max()) for s in snaps],
                perturbation=[float(d) for d in np.asarray(growth.delta)],
                measured_growth_factor=None if not np.isfinite(growth.factor) else float(growth.factor),
                von_neumann_factor=float(growth.von_neumann),
            )
        )
    payload = dict(nodes=31, dx=1.0, steps=args.steps, runs=results)

    def render(p):
        print("1-D heat equation u_t = u_xx, 31 nodes, dx = 1, forward Euler (paper Section 3); CFL limit dt <= 0.5\n")
        for r in p["runs"]:
            verdict = "stable" if r["cfl_stable"] else "UNSTABLE"
            print(f"dt = {r['dt']:g} ({verdict})")
            for t, m in zip(r["times"], r["max_abs"]):
                print(f"  t = {t:<5g} max|u| = {m:.6g}")
            if r["measured_growth_factor"] is not None:
                measured = f"{r['measured_growth_factor']:.4f}"
            elif r["perturbation"] and r["perturbation"][-1] is not None and np.isfinite(r["perturbation"][-1]):
                measured = "n/a (stayed at rounding level)"
            else:
                measured = "n/a (the run reached NaN or inf)"
            print(f"  one-ulp perturbation after {p['steps']} steps: {r['perturbation'][-1]:.3g}")
            print(f"  growth per step: measured {measured}, von Neumann {r['von_neumann_factor']:.4f}\n")

    _emit(payload, args.json, render)
    return 0


# --- jaxcfl reproduce NAME, jaxcfl variance, jaxcfl determinism ---------------------------------

def cmd_module(args: argparse.Namespace) -> int:
    """Run the experiment module ``args.module`` (:mod:`jaxcfl.experiments`' contract) and print its payload."""
    module = importlib.import_module(args.module)
    payload = module.main(args)
    _emit(payload, args.json, lambda p: print(module.render(p)))
    return 0


# --- parser ------------------------------------------------------------------------------------

class _LazyParser(_Parser):
    """A sub-command's parser whose options come from an experiment module, imported only when
    this sub-command is parsed (run, or asked for ``--help``): building the whole parser imports
    no experiment, so ``jaxcfl --help`` and ``jaxcfl theory`` stay fast and Flax-free."""

    def __init__(self, *args: Any, options_from: str | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._options_from = options_from

    def parse_known_args(self, args=None, namespace=None):
        if self._options_from is not None:
            module = importlib.import_module(self._options_from)
            self._options_from = None
            self.description = (module.__doc__ or self.description).strip()
            module.add_arguments(self)
            self.add_argument("--json", action="store_true", help="print pure JSON on stdout (progress on stderr)")
        return super().parse_known_args(args, namespace)


def _add_module_command(sub, name: str, module_name: str, help_text: str, **kwargs: Any) -> None:
    """``name``: a sub-command that runs ``module_name`` (its options and description load lazily)."""
    cmd = sub.add_parser(name, help=help_text, description=help_text, options_from=module_name, **kwargs)
    cmd.set_defaults(func=cmd_module, module=module_name)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="jaxcfl",
        description="Numerical stability of deep-network training as the discretisation of a PDE (Sun et al., JMLR 2024).",
    )
    parser.add_argument("--version", action="version", version=f"jaxcfl {__version__}")
    parser.add_argument("--x64", action="store_true", help="compute in float64 (jax_enable_x64)")
    parser.add_argument("--deterministic", action="store_true",
                        help="bit-reproducible mode: single-threaded Eigen on CPU, deterministic GPU ops, no autotuning, "
                             "highest matmul precision (see jaxcfl.determinism); also JAXCFL_DETERMINISTIC=1")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_LazyParser)

    th = sub.add_parser("theory", help="CFL bounds on alpha: paper formulas and exact windowed bounds",
                        description="Print the paper's non-windowed alpha bounds and the exact bounds of the windowed scheme "
                                    "(Lanczos on W C^T C W). Defaults: appendix E's Table 5 set-up.")
    th.add_argument("--image", default="checkerboard", help=IMAGE_HELP + " (default: checkerboard)")
    th.add_argument("--size", type=_positive_int, default=None, help="checkerboard side (default 256)")
    th.add_argument("--kernel-size", type=_positive_int, nargs="+", default=[16, 32, 64], help="kernel sizes w (default 16 32 64)")
    th.add_argument("--scheme", choices=list(THEORY_SCHEMES), default="both")
    th.add_argument("--lr", type=_positive_float, default=None,
                    help="dt; default the paper's: 1e-4 for nesterov, 1e-8 for gd")
    th.add_argument("--momentum", type=float, default=THEORY_MOMENTUM,
                    help=f"Nesterov mu in [0, 1) (default {THEORY_MOMENTUM:g}; nesterov only)")
    th.add_argument("--a", type=float, default=-0.5, help="the constant yhat - y of eq 20 (default -0.5)")
    th.add_argument("--beta", type=float, default=1.0, help="Swish beta (default 1)")
    th.add_argument("--pool", choices=["sum", "mean"], default="sum")
    th.add_argument("--model", choices=["linear", "nonconstant", "activated", "nonlinear"], default="linear",
                    help="whose linear operator to bound (nonlinear: its linearisation at K = 0)")
    th.add_argument("--json", action="store_true", help="print JSON on stdout (progress goes to stderr)")
    th.set_defaults(func=cmd_theory)

    he = sub.add_parser("heat", help="Section 3: the 1-D heat equation, CFL and one-ulp perturbations",
                        description="Forward Euler on u_t = u_xx (31 nodes, tent initial data); snapshots and the growth of "
                                    "a one-ulp perturbation beside the von Neumann factor.")
    he.add_argument("--dt", type=_positive_float, nargs="+", default=[0.4, 0.8], help="time steps (default 0.4 0.8)")
    he.add_argument("--times", type=float, nargs="+", default=[0.8, 2.4, 4.0], help="snapshot times (default 0.8 2.4 4)")
    he.add_argument("--steps", type=_positive_int, default=30, help="steps for the perturbation measurement (default 30)")
    he.add_argument("--long", action="store_true",
                    help=f"allow runs of more than {10_000_000:,} steps (a tiny --dt), which are refused otherwise")
    he.add_argument("--json", action="store_true", help="print JSON on stdout")
    he.set_defaults(func=cmd_heat)

    rep = sub.add_parser("reproduce", help="reproduce an experiment of the paper (" + ", ".join(EXPERIMENTS) + ")",
                         description="Reproduce one of the paper's experiments; results go to --out as they finish.")
    experiments = rep.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    for name, (module_name, help_text) in EXPERIMENTS.items():
        _add_module_command(experiments, name, module_name, help_text)
    for name, (module_name, help_text) in COMMANDS.items():
        _add_module_command(sub, name, module_name, help_text, formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.deterministic or os.environ.get("JAXCFL_DETERMINISTIC") == "1":
        from jaxcfl._core.determinism import enable_deterministic_mode

        enable_deterministic_mode()
    if args.x64:
        import jax

        jax.config.update("jax_enable_x64", True)
    from jaxcfl._core.distributed import initialize_from_env

    try:  # a multi-process run on jax.distributed, when the environment asks for one (docs/scaling.md)
        initialize_from_env()
    except ValueError as err:
        parser.error(str(err))
    if getattr(args, "momentum", 0.0) is not None and not 0.0 <= getattr(args, "momentum", 0.0) < 1.0:
        parser.error(f"--momentum must lie in [0, 1), got {args.momentum}")
    from jaxcfl._core.folder import FolderInUse
    from jaxcfl.nn._data import DatasetNotFound

    try:
        return args.func(args)
    except (ValueError, FolderInUse, DatasetNotFound) as err:  # bad input, a busy folder, a missing dataset
        parser.exit(2, f"jaxcfl: error: {err}\n")  # one line, exit status 2, no traceback


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
