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


# --- arrays and memory --------------------------------------------------------------------------

def as_array(name: str, value: Any, dtype: Any = np.float64, *, ndim: int | None = None, what: str = "") -> np.ndarray:
    """``value`` as a NumPy array of ``dtype``, or an error that names ``name``.

    A nested list whose rows differ in length (a ragged table), or values that are not real
    numbers, give ``ValueError``/``TypeError`` naming the argument, instead of NumPy's own text.
    ``ndim``: the required number of dimensions; ``what`` describes the expected layout
    (e.g. ``"(k, seed)"``) for the messages. ``dtype=None`` keeps NumPy's dtype (numbers only).
    """
    layout = f" {what}" if what else ""
    try:
        arr = np.asarray(value)
    except ValueError:
        raise ValueError(f"{name} must be a rectangular array{layout}: its rows have different lengths") from None
    if arr.dtype.kind not in "biuf" and not jax.numpy.issubdtype(arr.dtype, jax.numpy.floating):  # bfloat16 too
        kind = {"U": "text", "S": "bytes", "O": "objects (None, or arrays of different shapes?)",
                "c": "complex numbers"}.get(arr.dtype.kind, f"dtype {arr.dtype}")
        raise TypeError(f"{name} must hold real numbers{layout}, got {kind}: {value!r:.60}")
    if dtype is not None:
        arr = arr.astype(dtype)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D{layout}, got shape {arr.shape}")
    return arr


def format_bytes(nbytes: float) -> str:
    """``nbytes`` in binary units: ``"7.28 TiB"``."""
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if size < 1024 or unit == "PiB":
            return f"{size:.3g} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.3g} PiB"  # pragma: no cover


def machine_memory() -> int | None:
    """This machine's physical memory in bytes, or ``None`` where the system does not say."""
    import os

    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):  # not POSIX, or the names are unknown
        return None


def check_memory(name: str, nbytes: float, what: str, *, limit: int | None = None,
                 hint: str = "choose a smaller size") -> float:
    """Refuse, before anything is allocated, a computation that needs more memory than the machine has.

    ``nbytes`` is the estimate of what the computation would allocate for ``what`` (e.g.
    ``"a 1000000 x 1000000 float32 checkerboard"``); ``limit`` defaults to the physical memory
    (:func:`machine_memory`; no check where it is unknown). Raises ``ValueError`` naming ``name``,
    with the estimate, the limit and ``hint``, instead of NumPy's ``MemoryError`` after the attempt.
    """
    limit = machine_memory() if limit is None else int(limit)
    if limit is not None and nbytes > limit:
        raise ValueError(f"{name}: {what} needs about {format_bytes(nbytes)} of memory, more than the "
                         f"{format_bytes(limit)} this machine has; {hint}")
    return nbytes


__all__ += ["as_array", "format_bytes", "machine_memory", "check_memory"]


# --- options checked before any work: the range of the working dtype and of the integers ------------

INT32_MAX = 2**31 - 1
"""The largest count (steps, a refresh interval, a size) accepted: counts become int32 step counters."""
SEED_MAX = 2**32 - 1
"""The largest PRNG seed accepted: ``jax.random.key`` keeps 32 bits of a seed unless x64 is on, so larger
seeds would silently repeat smaller ones."""


def working_dtype() -> np.dtype:
    """The float dtype the computations run in: float32, or float64 under ``jax_enable_x64``."""
    return np.dtype(jax.dtypes.canonicalize_dtype(float))


def check_bounded_int(name: str, value: Any, minimum: int = 1, maximum: int = INT32_MAX, what: str = "") -> int:
    """An int (not a bool) in ``[minimum, maximum]``, else ``TypeError``/``ValueError`` naming ``name``;
    a huge value is refused here, not by an ``OverflowError`` deep inside the computation."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not minimum <= value <= maximum:
        why = f" ({what})" if what else ""
        raise ValueError(f"{name} must be an integer in [{minimum}, {maximum}]{why}, got {value}")
    return int(value)


def check_seed(name: str, value: Any) -> int:
    """A PRNG seed: an int in ``[0, SEED_MAX]``."""
    return check_bounded_int(name, value, 0, SEED_MAX, "a PRNG seed")


def check_in_dtype(name: str, value: Any, requirement: str = "positive", *, dtype: Any = None) -> Any:
    """``value`` (scalar or array) satisfies ``requirement`` (``"positive"``, ``"nonnegative"``,
    ``"finite"``, ``"unit_interval"`` or ``"safety"``) and survives the cast to ``dtype`` (default:
    :func:`working_dtype`): the one check of a float option, shared by the API and the command line."""
    check = {"positive": check_positive, "nonnegative": check_nonnegative, "finite": check_finite,
             "unit_interval": check_unit_interval, "safety": check_safety}[requirement]
    check(name, value)
    return check_representable(name, value, working_dtype() if dtype is None else dtype)


def check_perturbation(name: str, k: Any, *, lr: Any = None, dtype: Any = None) -> Any:
    """A perturbation factor (the paper's ``k``, eq 10): ``k > 0`` with ``k``, ``1 / k`` and, given ``lr``,
    every ``k * lr`` normal numbers of ``dtype`` (default :func:`working_dtype`), as the perturbed step
    computes them (``fl(lr k) * fl(d / k)``)."""
    dtype = working_dtype() if dtype is None else dtype
    check_positive(name, k)
    check_representable(name, k, dtype)
    if is_concrete(k):
        k64 = np.asarray(k, np.float64)
        shown = repr(float(k64)) if k64.ndim == 0 else f"(an array of shape {k64.shape})"
        try:
            with np.errstate(all="ignore"):
                check_representable(f"1 / {name}", 1.0 / k64, dtype)
                if lr is not None and is_concrete(lr):
                    check_representable(f"{name} * lr", np.multiply.outer(k64, np.asarray(lr, np.float64)), dtype)
        except ValueError as err:  # the message starts with the argument the user gave
            raise ValueError(f"{name}={shown}: {err}") from None
    return k


def check_distinct(name: str, values: Any) -> tuple:
    """``values`` with no value given twice (each is a run of its own), else ``ValueError`` naming ``name``."""
    values = tuple(values)
    seen: set = set()
    for x in values:
        if x in seen:
            raise ValueError(f"{name} repeats {x!r} ({list(values)}); give each value once (each is a run of its own)")
        seen.add(x)
    return values


__all__ += ["INT32_MAX", "SEED_MAX", "working_dtype", "check_bounded_int", "check_seed", "check_in_dtype",
            "check_perturbation", "check_distinct"]
