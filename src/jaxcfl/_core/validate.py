"""Input checks shared by the public API.

Every check names the offending argument, says what was given and what is
allowed. Checks on numbers run only when the value is concrete: inside ``jit``
a traced hyperparameter cannot be inspected, and is accepted as it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

__all__ = ["is_concrete", "check_choice", "check_positive", "check_nonnegative", "check_finite",
    "check_unit_interval", "check_safety", "check_int", "check_count", "check_image", "check_representable"]


def is_concrete(value: Any) -> bool:
    """True when ``value`` holds no tracer (it can be inspected on the host)."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(value))


def check_choice(name: str, value: str, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, allowed))}")
    return value


def _as_float_array(name: str, value: Any) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a real number or array of real numbers, got {value!r}") from err
    return arr


def _check_values(name: str, value: Any, predicate, requirement: str) -> Any:
    """Raise ``ValueError`` unless ``predicate`` holds for every entry of a concrete ``value``."""
    if is_concrete(value):
        arr = _as_float_array(name, value)
        if arr.size == 0:
            raise ValueError(f"{name} is empty; give at least one value")
        ok = np.isfinite(arr) & predicate(arr)
        if not np.all(ok):
            raise ValueError(f"{name} must be {requirement}, got {_show(arr, ok)}")
    return value


def check_positive(name: str, value: Any) -> Any:
    """``value`` (scalar or array) must be finite and > 0 wherever it is concrete."""
    return _check_values(name, value, lambda x: x > 0, "finite and > 0")


def check_nonnegative(name: str, value: Any) -> Any:
    return _check_values(name, value, lambda x: x >= 0, "finite and >= 0")


def check_finite(name: str, value: Any) -> Any:
    return _check_values(name, value, lambda x: np.ones_like(x, bool), "finite")


def check_unit_interval(name: str, value: Any) -> Any:
    """``value`` must lie in [0, 1) (a momentum coefficient)."""
    return _check_values(name, value, lambda x: (x >= 0) & (x < 1), "in [0, 1)")


def check_safety(name: str, value: Any) -> Any:
    """``value`` must lie in (0, 1] (a margin inside a stability limit)."""
    return _check_values(name, value, lambda x: (x > 0) & (x <= 1), "in (0, 1] (a margin inside the stability limit)")


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_count(name: str, value: Any, upper: int, what: str) -> int:
    """A static count: an int (not a bool) in ``[1, upper]``, else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= upper:
        raise ValueError(f"{name} must be an int in [1, {upper}] ({what}), got {value!r}")
    return int(value)


def check_image(image: Any, name: str = "image") -> None:
    """A 2-D array of finite values, at least 1 x 1."""
    shape = np.shape(image)
    if len(shape) != 2:
        raise ValueError(f"{name} must be a 2-D array, got shape {shape}")
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"{name} must be non-empty, got shape {shape}")
    if is_concrete(image):
        arr = np.asarray(image)
        if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
            raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} must be finite; it holds {int(np.sum(~np.isfinite(arr)))} non-finite values")


def check_representable(name: str, value: Any, dtype: Any, *, zero_ok: bool = True) -> Any:
    """``value`` must survive the cast to ``dtype``: finite, and normal unless it is exactly 0.

    Validation runs in float64; a value that float64 accepts can still round to 0,
    become subnormal or overflow to inf in the working dtype (float32 by default).
    """
    if not is_concrete(value):
        return value
    arr = _as_float_array(name, value)
    dt = np.dtype(jax.dtypes.canonicalize_dtype(dtype))
    if not np.issubdtype(dt, np.floating):
        return value
    info = np.finfo(dt)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        cast = arr.astype(dt)
    zero = arr == 0
    bad = ~np.isfinite(cast) | (~zero & (np.abs(cast.astype(np.float64)) < float(info.tiny)))
    if not zero_ok:
        bad |= zero
    if np.any(bad):
        x = float(arr[bad].flat[0]) if arr.ndim else float(arr)
        what = "overflows to inf" if abs(x) > float(info.max) else "is 0" if x == 0 else "is below the smallest normal number"
        hint = "; compute in float64 (jax.enable_x64) or rescale it" if dt != np.float64 else ""
        where = "" if arr.ndim == 0 else f" (an entry of an array of shape {arr.shape})"
        raise ValueError(f"{name}={x!r}{where} {what} in {dt.name} (range {float(info.tiny):.3g} to "
                         f"{float(info.max):.3g}){hint}")
    return value


def _show(arr: np.ndarray, ok: np.ndarray) -> str:
    if arr.ndim == 0:
        return repr(float(arr))
    return f"{float(arr[~ok].flat[0])!r} (an entry of an array of shape {arr.shape})"
