"""Statistics of a k x seed table of training runs (appendix C, Tables 3 and 4).

The paper compares two spreads of final test accuracy: the population std
across the perturbation factors ``k`` at a fixed batch-order seed, and across
seeds at a fixed ``k``. On a small test set these numbers are coarse (one image
of 364 is 0.27 accuracy points), so this module adds what such a table can
carry:

* :func:`spread` and :func:`bootstrap_spread`: the mean population std along
  one axis, with a two-stage percentile-bootstrap interval;
* :func:`compare_spreads`: whether two such intervals say "same size";
* :func:`churn` and :func:`pairwise_churn`: the fraction of test examples whose
  predicted class differs between two runs, a finer measure than the accuracy
  (two runs with equal accuracy can disagree on many examples);
* :func:`divergence_curve` and :func:`first_crossing`: when a divergence between
  two trajectories first passes given levels.

Everything is NumPy on the host: these are statistics of a finished table, not
part of any compiled step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from itertools import combinations

import numpy as np
from numpy.typing import ArrayLike

from jaxcfl import _validate as v


@dataclasses.dataclass(frozen=True)
class Interval:
    """A point estimate with a bootstrap confidence interval ``[low, high]``."""

    estimate: float
    low: float
    high: float
    level: float

    def to_dict(self) -> dict[str, float]:
        return {"std": self.estimate, "ci_low": self.low, "ci_high": self.high, "level": self.level}

    def __str__(self) -> str:
        return f"{self.estimate:.3g} [{self.low:.3g}, {self.high:.3g}]"


def _table(table: ArrayLike, axis: int) -> np.ndarray:
    """``table`` as a float array with the members of each group along the last axis."""
    t = np.asarray(table, np.float64)
    if t.ndim != 2:
        raise ValueError(f"table must be 2-D (k x seed), got shape {t.shape}")
    if axis not in (0, 1):
        raise ValueError(f"axis must be 0 or 1, got {axis!r}")
    if min(t.shape) < 1:
        raise ValueError(f"table must not be empty, got shape {t.shape}")
    if not np.all(np.isfinite(t)):
        raise ValueError("table holds NaN or infinite entries")
    return np.moveaxis(t, axis, -1)


def spread(table: ArrayLike, axis: int) -> float:
    """Mean over groups of the population std along ``axis``.

    ``axis=0`` on a k x seed table: the std across k of each seed (the
    perturbation's spread), averaged over seeds; ``axis=1``: across seeds of each
    k (the batch order's spread), averaged over k. Population std (``ddof=0``), as
    in the paper's tables.
    """
    return float(_table(table, axis).std(axis=-1).mean())


def bootstrap_spread(table: ArrayLike, axis: int, *, resamples: int = 2000, level: float = 0.95,
                     seed: int = 0) -> Interval:
    """:func:`spread` with a two-stage percentile-bootstrap interval.

    Each resample draws the groups with replacement (seeds, for ``axis=0``) and,
    within every drawn group, its members with replacement (the k values), then
    recomputes :func:`spread`. Resampling n values with replacement shrinks their
    variance by (n-1)/n on average, so every resampled std is multiplied by
    sqrt(n/(n-1)) (1.10 for n = 6), which centres the resamples on the estimate.
    The interval is the central ``level`` quantile range of the resamples. With 5
    or 6 values per group it is a rough guide, not an exact coverage statement.

    Args:
      table: 2-D array (rows: k, columns: seeds).
      axis: the axis along which the std is taken (see :func:`spread`).
      resamples: number of bootstrap resamples (>= 1).
      level: confidence level in (0, 1).
      seed: seed of the resampling (the result is reproducible).

    Returns:
      :class:`Interval`.
    """
    groups = _table(table, axis)
    resamples = v.check_int("resamples", resamples)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    rng = np.random.default_rng(v.check_int("seed", seed, minimum=0))
    g, n = groups.shape
    pick_group = rng.integers(0, g, size=(resamples, g))
    pick_member = rng.integers(0, n, size=(resamples, g, n))
    shrinkage = np.sqrt(n / (n - 1)) if n > 1 else 1.0
    stds = shrinkage * groups[pick_group[..., None], pick_member].std(axis=-1).mean(axis=-1)
    low, high = np.quantile(stds, [(1 - level) / 2, (1 + level) / 2])
    return Interval(spread(table, axis), float(low), float(high), float(level))


def compare_spreads(perturbation: Interval, seeds: Interval) -> str:
    """``"same size"`` when the two intervals overlap, else ``"smaller"`` or ``"larger"``
    (the perturbation's spread against the seeds')."""
    if perturbation.high < seeds.low:
        return "smaller"
    if perturbation.low > seeds.high:
        return "larger"
    return "same size"


def churn(a: ArrayLike, b: ArrayLike) -> float:
    """Fraction of examples whose predicted class differs between two runs."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"predictions must be two non-empty 1-D arrays of one shape, got {a.shape} and {b.shape}")
    return float(np.mean(a != b))


@dataclasses.dataclass(frozen=True)
class ChurnSummary:
    """Churn over all pairs of runs that differ along one axis of a k x seed table."""

    mean: float
    min: float
    max: float
    pairs: int

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def pairwise_churn(predictions: ArrayLike, axis: int) -> ChurnSummary:
    """Churn of every pair along ``axis`` of a ``(k, seed, examples)`` array of predicted classes.

    ``axis=0``: pairs of k at each seed (what the perturbation changes);
    ``axis=1``: pairs of seeds at each k (what the batch order changes).
    """
    p = np.asarray(predictions)
    if p.ndim != 3 or p.shape[2] == 0:
        raise ValueError(f"predictions must have shape (k, seeds, examples), got {p.shape}")
    if axis not in (0, 1):
        raise ValueError(f"axis must be 0 or 1, got {axis!r}")
    p = np.moveaxis(p, axis, 1)  # (groups, members, examples)
    if p.shape[1] < 2:
        raise ValueError(f"churn along axis {axis} needs at least 2 runs, got {p.shape[1]}")
    values = [churn(group[i], group[j]) for group in p for i, j in combinations(range(p.shape[1]), 2)]
    return ChurnSummary(float(np.mean(values)), float(np.min(values)), float(np.max(values)), len(values))


def divergence_curve(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """:func:`jaxcfl.determinism.divergence` of ``a[t]`` and ``b[t]`` for every row ``t``
    (two ``(steps, entries)`` trajectories), as a NumPy array."""
    import jax

    from jaxcfl.determinism import divergence

    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"a and b must be 2-D arrays (steps, entries) of one shape, got {a.shape} and {b.shape}")
    return np.asarray(jax.vmap(divergence)(a, b), np.float64)


@dataclasses.dataclass(frozen=True)
class GrowthRate:
    """Least-squares slope of ``ln y`` against ``x``, with its standard error."""

    slope: float
    stderr: float
    points: int

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def log_slope(x: ArrayLike, y: ArrayLike, *, cap: float = np.inf) -> GrowthRate | None:
    """Exponential growth rate of ``y`` in ``x``: the ordinary least-squares slope of ``ln y``.

    Only points with ``0 < y < cap`` and finite values enter (a divergence that is
    still exactly zero, or has saturated near its ceiling, says nothing about the
    growth). The standard error is the OLS one, ``sqrt(rss / (m - 2) / sum (x - mean x)^2)``;
    for a curve whose residuals are correlated from step to step it is optimistic.

    Returns:
      :class:`GrowthRate`, or ``None`` with fewer than 3 usable points.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D arrays of one shape, got {x.shape} and {y.shape}")
    with np.errstate(invalid="ignore"):
        keep = np.isfinite(x) & np.isfinite(y) & (y > 0) & (y < cap)
    if keep.sum() < 3:
        return None
    xs, ly = x[keep], np.log(y[keep])
    dx = xs - xs.mean()
    sxx = float(dx @ dx)
    if sxx == 0:
        return None
    slope = float(dx @ (ly - ly.mean()) / sxx)
    residual = ly - ly.mean() - slope * dx
    stderr = float(np.sqrt(residual @ residual / (xs.size - 2) / sxx))
    return GrowthRate(slope, stderr, int(xs.size))


def first_crossing(curve: ArrayLike, levels: Sequence[float]) -> dict[float, int | None]:
    """For each level, the first step (1-based) at which ``curve`` exceeds it; ``None``: never.

    A NaN entry counts as above every level (a copy that blew up has diverged).
    """
    c = np.asarray(curve, np.float64)
    if c.ndim != 1:
        raise ValueError(f"curve must be 1-D, got shape {c.shape}")
    out: dict[float, int | None] = {}
    for level in levels:
        above = np.flatnonzero(~(c <= level))
        out[float(level)] = int(above[0]) + 1 if above.size else None
    return out


__all__ = [
    "ChurnSummary",
    "Interval",
    "bootstrap_spread",
    "churn",
    "compare_spreads",
    "divergence_curve",
    "first_crossing",
    "GrowthRate",
    "log_slope",
    "pairwise_churn",
    "spread",
]
