"""What ``jaxcfl sweep`` and ``jaxcfl bounds`` share: the image, the problem's options, the set-up.

Both commands run the one-layer CNN problem of the paper on a user's own image
(``--image``, read by :func:`jaxcfl.load_image`) with the options of the Python API
(:func:`jaxcfl.sweep`, :func:`jaxcfl.empirical_bounds`); this module defines those
options once and turns them into the image, its description and the keyword arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from jaxcfl.experiments import _options
from jaxcfl.experiments._options import MOMENTUM, REAL, SEED, option

IMAGE_NOTES = f"""\
--image: 'checkerboard' (the paper's, --size x --size, values +-1), a 2-D .npy array
(used as it is), or a picture that Pillow reads (PNG, JPEG, ...) converted to grey in
[0, 1] (jaxcfl.load_image): 8-bit grey v/255, 16-bit grey v/65535, colour the ITU-R
601-2 luma (0.299 R + 0.587 G + 0.114 B)/255; the alpha channel is ignored. A .npy
array is not rescaled, so any other normalisation is one numpy.save away.

{GRID_SYNTAX}"""
"""The part of both commands' ``--help`` that explains ``--image`` and the grid syntax."""

IMAGE_GROUP = "image and kernel"
MODEL_GROUP = "model and scheme (as in the Python API)"


def _choices(module: str, name: str):
    def values() -> tuple[str, ...]:
        import importlib

        return tuple(getattr(importlib.import_module(module), name))

    return values


_sweep_default = _options.pde_default


@dataclasses.dataclass(frozen=True)
class ProblemOptions(_options.Options):
    """The options ``jaxcfl sweep`` and ``jaxcfl bounds`` share: the initial kernel's seed and the set-up of
    :func:`jaxcfl.sweep` / :func:`jaxcfl.empirical_bounds`, with their defaults. (``--image`` and ``--size``
    say where the image comes from: :func:`add_image_arguments`.)"""

    seed: int = option(0, "seed of the N(0, 1) initial kernel (default {default})", SEED, group=IMAGE_GROUP)
    scheme: str = option(_sweep_default("scheme"), "time stepping (default {default})",
                         choices=_choices("jaxcfl.pde", "SCHEMES"), group=MODEL_GROUP)
    model: str = option(_sweep_default("model"), "right-hand side (default {default})",
                        choices=_choices("jaxcfl.pde", "MODELS"), group=MODEL_GROUP)
    pool: str = option(_sweep_default("pool"), "pooling (default {default})",
                       choices=_choices("jaxcfl.pde", "POOLS"), group=MODEL_GROUP)
    momentum: float = option(_sweep_default("momentum"), "Nesterov's mu in [0, 1) (default {default})", MOMENTUM,
                             group=MODEL_GROUP)
    a: float = option(_sweep_default("a"), "the constant yhat - y of eq 20 (default {default})", REAL,
                      group=MODEL_GROUP)
    beta: float = option(_sweep_default("beta"), "Swish beta (default {default})", REAL, group=MODEL_GROUP)
    label: float = option(_sweep_default("label"), "the label y (nonlinear models; default {default})", REAL,
                          group=MODEL_GROUP)
    bias: float = option(_sweep_default("bias"), "the bias b (nonlinear models; default {default})", REAL,
                         group=MODEL_GROUP)
    operator: str = option(_sweep_default("operator"), "how the correlations are applied (default {default}; see "
                           "jaxcfl.sweep)", choices=_choices("jaxcfl.pde._operators", "OPERATORS"), group=MODEL_GROUP)

    def validate(self) -> None:
        from jaxcfl.pde import get_model, get_scheme

        if not get_scheme(self.scheme).uses_momentum:
            self.refuse_unused(["momentum"], f"for the schemes with momentum; {self.spelled('scheme')} is "
                                             f"{self.scheme}")
        if get_model(self.model).constant_residual:
            self.refuse_unused(["label", "bias"], f"for the nonlinear models; {self.spelled('model')} is "
                                                  f"{self.model}")

    def setup(self) -> dict[str, Any]:
        """The set-up keyword arguments shared by :func:`jaxcfl.sweep` and :func:`jaxcfl.empirical_bounds`."""
        return {name: getattr(self, name) for name in SETUP_DEFAULTS}


SETUP_DEFAULTS: dict[str, Any] = {f.name: f.default for f in _options.fields_of(ProblemOptions) if f.name != "seed"}
"""The set-up options and their defaults (those of :func:`jaxcfl.sweep` and :func:`jaxcfl.empirical_bounds`)."""


def add_image_arguments(parser: argparse.ArgumentParser) -> None:
    """``--image`` and ``--size`` (where the image comes from), first in the group :data:`IMAGE_GROUP`."""
    image = parser.add_argument_group(IMAGE_GROUP)
    image.add_argument("--image", default="checkerboard", help="the input image (default: checkerboard; see below)")
    image.add_argument("--size", type=positive_int, default=None,
                       help="side of --image checkerboard (default 256); not for image files")


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


def image_of(args: argparse.Namespace, kernel_sizes: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """The image of ``--image`` / ``--size``, checked against ``--kernel-size`` (``kernel_sizes``, one or
    several), and its :func:`image_info`."""
    image = read_image(args.image, args.size)
    check_kernel_sizes(image, list(np.atleast_1d(kernel_sizes)))
    return image, image_info(image, f"checkerboard {image.shape[0]}" if args.image == "checkerboard" else args.image)


def image_info(image: np.ndarray, source: str = "array") -> dict[str, Any]:
    """What the payloads say of an image: ``source``, ``shape``, ``min``, ``max``, ``mean``, ``fingerprint``
    (:func:`jaxcfl.fingerprint` of its float64 values)."""
    from jaxcfl._core.determinism import fingerprint

    image = np.asarray(image, np.float64)
    return {"source": source, "shape": list(image.shape), "min": float(image.min()), "max": float(image.max()),
            "mean": float(image.mean()), "fingerprint": fingerprint(image)}


def in_result_dir(out: str | os.PathLike | None, kind: str, name: str,
                  body: Callable[[ResultDir], tuple[dict[str, Any], dict[str, str]]],
                  identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """``body(results)`` in the :class:`~jaxcfl._core.results.ResultDir` ``out`` of ``kind``, then its payload
    finished as the JSON ``name``. The folder is released if ``body`` raises; a folder that holds other
    results (another ``identity``: what defines the run) is a ``ValueError`` naming ``--out``."""
    from jaxcfl._core.folder import FolderMismatch

    try:
        results = ResultDir(out, kind=kind, identity=identity)
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
