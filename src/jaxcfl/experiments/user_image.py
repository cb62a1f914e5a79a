"""What ``jaxcfl sweep`` and ``jaxcfl bounds`` share: the image, the problem's options, the set-up.

Both commands run the one-layer CNN problem of the paper on a user's own image
(``--image``, read by :func:`jaxcfl.load_image`) with the options of the Python API
(:func:`jaxcfl.sweep`, :func:`jaxcfl.empirical_bounds`); this module defines those
options once and turns them into the image, its description and the keyword arguments.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxcfl.experiments._cli_types import (
    GRID_SYNTAX,
    check_kernel_sizes,
    positive_int,
    read_image,
)
from jaxcfl._core.results import ResultDir

IMAGE_NOTES = f"""\
--image: 'checkerboard' (the paper's, --size x --size, values +-1), a 2-D .npy array
(used as it is), or a picture that Pillow reads (PNG, JPEG, ...) converted to grey in
[0, 1] (jaxcfl.load_image): 8-bit grey v/255, 16-bit grey v/65535, colour the ITU-R
601-2 luma (0.299 R + 0.587 G + 0.114 B)/255; the alpha channel is ignored. A .npy
array is not rescaled, so any other normalisation is one numpy.save away.

{GRID_SYNTAX}"""
"""The part of both commands' ``--help`` that explains ``--image`` and the grid syntax."""

SETUP_DEFAULTS: dict[str, Any] = {"scheme": "gd", "model": "linear", "pool": "sum", "momentum": 0.9, "a": -0.5, "beta": 1.0,
                                  "label": 1.0, "bias": 0.0, "operator": "auto"}
"""The set-up options and their defaults (those of :func:`jaxcfl.sweep` and :func:`jaxcfl.empirical_bounds`)."""


def add_problem_arguments(parser: argparse.ArgumentParser, *, kernel_sizes: bool = False) -> None:
    """The image and the model: ``--image``, ``--size``, ``--kernel-size`` (several if ``kernel_sizes``),
    ``--scheme`` (the choices of :data:`jaxcfl.pde._schemes.SCHEMES`), ``--model``, ``--pool``, ``--momentum``,
    ``--a``, ``--beta``, ``--label``, ``--bias``, ``--operator`` and ``--seed``, in two groups."""
    from jaxcfl.pde._rhs import MODELS
    from jaxcfl.pde._operators import OPERATORS
    from jaxcfl.pde._problem import POOLS
    from jaxcfl.pde._schemes import SCHEMES

    image = parser.add_argument_group("image and kernel")
    image.add_argument("--image", default="checkerboard", help="the input image (default: checkerboard; see below)")
    image.add_argument("--size", type=positive_int, default=None,
                       help="side of --image checkerboard (default 256); not for image files")
    image.add_argument("--kernel-size", type=positive_int, default=[16] if kernel_sizes else 16,
                       nargs="+" if kernel_sizes else None,
                       help="kernel side w" + (" (one or more)" if kernel_sizes else "") + " (default 16)")
    image.add_argument("--seed", type=int, default=0, help="seed of the N(0, 1) initial kernel (default 0)")
    model = parser.add_argument_group("model and scheme (as in the Python API)")
    model.add_argument("--scheme", choices=SCHEMES, default="gd", help="time stepping (default gd)")
    model.add_argument("--model", choices=MODELS, default="linear", help="right-hand side (default linear)")
    model.add_argument("--pool", choices=POOLS, default="sum", help="pooling (default sum)")
    model.add_argument("--momentum", type=float, default=0.9, help="Nesterov's mu in [0, 1) (default 0.9)")
    model.add_argument("--a", type=float, default=-0.5, help="the constant yhat - y of eq 20 (default -0.5)")
    model.add_argument("--beta", type=float, default=1.0, help="Swish beta (default 1)")
    model.add_argument("--label", type=float, default=1.0, help="the label y (nonlinear models; default 1)")
    model.add_argument("--bias", type=float, default=0.0, help="the bias b (nonlinear models; default 0)")
    model.add_argument("--operator", choices=OPERATORS, default="auto",
                       help="how the correlations are applied (default auto; see jaxcfl.sweep)")


def add_output_arguments(parser: argparse.ArgumentParser, out: str | None, what: str) -> None:
    """``--out`` (default ``out``; ``what``: what a rerun reuses) and ``--no-progress``, then the help's notes
    (:data:`IMAGE_NOTES`, after the options)."""
    group = parser.add_argument_group("output")
    group.add_argument("--out", default=out, metavar="DIR",
                       help=f"output directory (default {'./' + out if out else 'none'}); {what} are reused by a rerun")
    group.add_argument("--no-progress", action="store_true",
                       help="no progress bar (default: a bar on stderr when it is a terminal)")
    parser.epilog = IMAGE_NOTES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def image_of(args: argparse.Namespace) -> tuple[np.ndarray, dict[str, Any]]:
    """The image of ``--image`` / ``--size``, checked against ``--kernel-size``, and its :func:`image_info`."""
    image = read_image(args.image, args.size)
    check_kernel_sizes(image, args.kernel_size if isinstance(args.kernel_size, list) else [args.kernel_size])
    return image, image_info(image, f"checkerboard {image.shape[0]}" if args.image == "checkerboard" else args.image)


def image_info(image: np.ndarray, source: str = "array") -> dict[str, Any]:
    """What the payloads say of an image: ``source``, ``shape``, ``min``, ``max``, ``mean``, ``fingerprint``
    (:func:`jaxcfl.fingerprint` of its float64 values)."""
    from jaxcfl._core.determinism import fingerprint

    image = np.asarray(image, np.float64)
    return {"source": source, "shape": list(image.shape), "min": float(image.min()), "max": float(image.max()),
            "mean": float(image.mean()), "fingerprint": fingerprint(image)}


def in_result_dir(out: str | os.PathLike | None, kind: str, name: str,
                  body: Callable[[ResultDir], tuple[dict[str, Any], dict[str, str]]]) -> dict[str, Any]:
    """``body(results)`` in the :class:`~jaxcfl._core.results.ResultDir` ``out`` of ``kind``, then its payload
    finished as the JSON ``name``. The folder is released if ``body`` raises; a folder that holds other
    results is a ``ValueError`` naming ``--out``."""
    from jaxcfl._core.folder import FolderMismatch

    try:
        results = ResultDir(out, kind=kind)
    except FolderMismatch as err:
        raise ValueError(f"--out: {err}") from None
    try:
        payload, files = body(results)
    except FolderMismatch as err:  # a sub-folder (a sweep's) holds other results
        results.close()
        raise ValueError(f"--out: {err}") from None
    except BaseException:
        results.close()
        raise
    return results.finish(payload, name, files)


def setup_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of the set-up shared by :func:`jaxcfl.sweep` and :func:`jaxcfl.empirical_bounds`."""
    return {name: getattr(args, name) for name in SETUP_DEFAULTS}


def progress_of(args: argparse.Namespace) -> bool | None:
    """``False`` with ``--no-progress``, else ``None`` (a bar when stderr is a terminal)."""
    return False if args.no_progress else None


def describe(image: dict[str, Any], settings: dict[str, Any]) -> str:
    """One line: the image and the set-up, for the text output."""
    from jaxcfl.pde._rhs import get_model
    from jaxcfl.pde._schemes import get_scheme

    h, w = image["shape"]
    s = settings
    momentum = f", mu {s['momentum']:g}" if get_scheme(s["scheme"]).uses_momentum else ""
    return (f"image {image['source']} ({h} x {w}, values in [{image['min']:.3g}, {image['max']:.3g}]); "
            f"{s['scheme']}{momentum}, {s['model']} model, pool {s['pool']}, a {s['a']:g}, beta {s['beta']:g}"
            + (f", label {s['label']:g}, bias {s['bias']:g}" if not get_model(s["model"]).constant_residual else ""))


def footer(payload: dict[str, Any], after_total: str = "") -> list[str]:
    """The last lines of both commands' text: the files written (if any) and the total time."""
    files = ["files: " + ", ".join(payload["files"].values())] if payload.get("files") else []
    return [*files, f"total {payload['seconds']:.1f}s{after_total}"]
