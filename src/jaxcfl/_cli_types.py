"""argparse value types shared by the command line and the experiments' options."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np


def _parse(text: str, kind: Callable[[str], float], ok: Callable[[float], bool], requirement: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
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
