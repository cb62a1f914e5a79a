"""argparse value types shared by the command line and the experiments' options."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np

from jaxcfl._core.validate import INT32_MAX, SEED_MAX


def _parse(text: str, kind: Callable[[str], float], ok: Callable[[float], bool], requirement: str,
           maximum: int = INT32_MAX):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if kind is int and abs(value) > maximum:  # a count or a seed this large overflows later, deep in the work
        raise argparse.ArgumentTypeError(f"expected {requirement} and at most {maximum}, got {text!r}")
    if not (np.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"expected {requirement}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    return _parse(text, float, lambda x: x > 0, "a finite number > 0")


def nonnegative_float(text: str) -> float:
    return _parse(text, float, lambda x: x >= 0, "a finite number >= 0")


def positive_int(text: str) -> int:
    return _parse(text, int, lambda x: x > 0, "an integer > 0")


def nonnegative_int(text: str) -> int:
    return _parse(text, int, lambda x: x >= 0, "an integer >= 0")


def seed(text: str) -> int:
    """A PRNG seed: an integer in ``[0, 2^32 - 1]`` (:func:`jaxcfl._core.validate.check_seed`)."""
    return _parse(text, int, lambda x: x >= 0, "a seed, an integer >= 0", maximum=SEED_MAX)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An integer type that refuses values below ``minimum``."""

    def at_least(text: str) -> int:
        return _parse(text, int, lambda x: x >= minimum, f"an integer >= {minimum}")

    return at_least


# --- grids: --lr 1e-5:1e-3:32, --alpha 0,1,10 ------------------------------------------------

GRID_SYNTAX = """\
A grid is one or more values, each of:
  X               one number (1e-4);
  X,Y,...         a list of numbers (1e-4,2e-4,5e-4);
  START:STOP:N    N log-spaced numbers from START to STOP, both included (1e-5:1e-3:32); START, STOP > 0;
  lin:START:STOP:N  N evenly spaced numbers from START to STOP, both included (lin:0:100:11).
The values of all of them are merged, sorted and de-duplicated: --lr 1e-5:1e-3:3 5e-4 is 1e-5 1e-4 5e-4 1e-3."""

MAX_GRID_POINTS = 1_000_000


def _grid_number(part: str, text: str) -> float:
    try:
        value = float(part)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{part.strip()!r} in {text!r} is not a number") from None
    if not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"{part.strip()!r} in {text!r} is not finite")
    return value


def _grid_range(body: str, text: str, spacing: str) -> np.ndarray:
    parts = body.split(":")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r} is not a range: write START:STOP:N (N log-spaced values, ends "
                                         f"included) or lin:START:STOP:N")
    start, stop = _grid_number(parts[0], text), _grid_number(parts[1], text)
    try:
        n = int(parts[2])
    except ValueError:
        raise argparse.ArgumentTypeError(f"the N of {text!r} must be a whole number of points, got {parts[2]!r}") from None
    if not 1 <= n <= MAX_GRID_POINTS:
        raise argparse.ArgumentTypeError(f"the N of {text!r} must lie in [1, {MAX_GRID_POINTS:,}], got {n}")
    if spacing == "lin":
        return np.linspace(start, stop, n)
    if not (start > 0 and stop > 0):
        raise argparse.ArgumentTypeError(f"the log-spaced range {text!r} needs START > 0 and STOP > 0 "
                                         f"(write lin:START:STOP:N for evenly spaced values, or list them)")
    return np.geomspace(start, stop, n)


def parse_grid(text: str) -> np.ndarray:
    """The values of one grid token (:data:`GRID_SYNTAX`), in the order written; no sign check."""
    body = text.strip()
    spacing = "log"
    for prefix in ("lin:", "log:"):
        if body.lower().startswith(prefix):
            spacing, body = prefix[:-1], body[len(prefix):]
            if ":" not in body:
                raise argparse.ArgumentTypeError(f"{text!r}: {prefix} goes with a range START:STOP:N")
    if not body:
        raise argparse.ArgumentTypeError("an empty value; give a number, a list X,Y,... or a range START:STOP:N")
    if ":" in body:
        return _grid_range(body, text, spacing)
    return np.array([_grid_number(part, text) for part in body.split(",")], np.float64)


def _grid_type(ok: Callable[[np.ndarray], np.ndarray], requirement: str, name: str) -> Callable[[str], np.ndarray]:
    def grid(text: str) -> np.ndarray:
        values = parse_grid(text)
        bad = values[~ok(values)]
        if bad.size:
            raise argparse.ArgumentTypeError(f"every value must be {requirement}; {text!r} has {bad[0]:g}")
        return values

    grid.__name__ = name
    return grid


positive_grid = _grid_type(lambda x: x > 0, "> 0", "positive_grid")
"""A grid token whose values are all > 0 (learning rates)."""

nonnegative_grid = _grid_type(lambda x: x >= 0, ">= 0", "nonnegative_grid")
"""A grid token whose values are all >= 0 (weight decays)."""


def merge_grid(tokens: list[np.ndarray]) -> np.ndarray:
    """The values of a flag's grid tokens (``nargs="+"``), merged, sorted and de-duplicated."""
    return np.unique(np.concatenate([np.atleast_1d(t) for t in tokens]))


def positive_range(text: str) -> tuple[float, float]:
    """``LO:HI`` with ``0 < LO < HI``, both finite."""
    parts = text.split(":")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected LO:HI (e.g. 1e-3:1e12), got {text!r}")
    lo, hi = (_grid_number(part, text) for part in parts)
    if not 0 < lo < hi:
        raise argparse.ArgumentTypeError(f"expected LO:HI with 0 < LO < HI, got {text!r}")
    return lo, hi


# --- --image ------------------------------------------------------------------------------------

IMAGE_HELP = ("'checkerboard' (the paper's, --size x --size), a 2-D .npy array (used as it is), or a picture "
              "(PNG, JPEG, ...) converted to grey in [0, 1] (see jaxcfl.load_image)")


def read_image(spec: str, size: int | None, *, default_size: int = 256) -> np.ndarray:
    """``--image`` and ``--size`` as a float64 array (:func:`jaxcfl.load_image`); bad input is a
    ``ValueError`` whose message starts with the flag to blame."""
    from jaxcfl._core.images import load_image

    if spec != "checkerboard" and size is not None:
        raise ValueError(f"--size: sets the side of --image checkerboard only; {spec!r} is read at its own size "
                         f"(resize it beforehand)")
    try:
        return load_image(spec, size=default_size if size is None else size)
    except ValueError as err:
        raise ValueError(f"--image: {err}") from None


def check_kernel_sizes(image: np.ndarray, kernel_sizes: list[int]) -> None:
    """``--kernel-size`` must fit the image: a ``ValueError`` naming the flag otherwise."""
    side = min(image.shape)
    for w in kernel_sizes:
        if w > side:
            raise ValueError(f"--kernel-size: {w} is larger than the image ({image.shape[0]} x {image.shape[1]}); "
                             f"it must be at most {side}")
