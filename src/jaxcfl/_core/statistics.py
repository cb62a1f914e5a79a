"""Statistics of a k x seed table of training runs (appendix C, Tables 3 and 4).

The paper compares two spreads of final test accuracy: the population std
across the perturbation factors ``k`` at a fixed batch-order seed, and across
seeds at a fixed ``k``. On a small test set these numbers are coarse (one image
of 364 is 0.27 accuracy points), so this module adds what such a table can
carry:

* :func:`spread` and :func:`bootstrap_spread`: the mean population std along
  one axis, with a two-stage percentile-bootstrap interval (undefined, ``None``,
  with one value per group: one value has no spread);
* :func:`compare_spreads`: whether two such intervals say "same size"
  ("undetermined" when either spread is undefined);
* :func:`churn` and :func:`pairwise_churn`: the fraction of test examples whose
  predicted class differs between two runs, a finer measure than the accuracy
  (two runs with equal accuracy can disagree on many examples);
* :func:`divergence_curve` and :func:`first_crossing`: when a divergence between
  two trajectories first passes given levels;
* the statistics of Summers & Dinneen's nondeterminism protocol (ICML 2021,
  "On nondeterminism and instability in neural network optimization"):
  :func:`std_interval` (std across runs with an interval),
  :func:`pairwise_correlation` and :func:`pairwise_disagreement` (run-to-run
  agreement of outputs and predictions), :func:`ensemble_gain` (what averaging
  the runs buys), :func:`amplification` and :func:`divergence_summary` (how a
  weight divergence between two runs grows), :func:`verdict_sentence`.

Everything is NumPy on the host: these are statistics of a finished table, not
part of any compiled step. Inputs are checked first: a ragged table, text, or a
level that is not a finite number is refused naming the argument.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from jaxcfl._core import validate as v
@dataclasses.dataclass(frozen=True)
class Interval:
    """A point estimate with a bootstrap confidence interval ``[low, high]``.

    ``estimate``, ``low`` and ``high`` are ``None`` when the spread is undefined: one value per
    group (one seed, say) has no spread, and a std of 0.0 would claim one that was measured
    (:func:`bootstrap_spread`). :func:`compare_spreads` then answers ``"undetermined"``.
    """

    estimate: float | None
    low: float | None
    high: float | None
    level: float

    @property
    def defined(self) -> bool:
        """Whether the interval holds numbers (not an undefined spread)."""
        return self.estimate is not None and self.low is not None and self.high is not None

    def to_dict(self) -> dict[str, float | None]:
        return {"std": self.estimate, "ci_low": self.low, "ci_high": self.high, "level": self.level}

    def __str__(self) -> str:
        if not self.defined:
            return "undefined (one value per group)"
        return f"{self.estimate:.3g} [{self.low:.3g}, {self.high:.3g}]"


UNDETERMINED = "undetermined"
""":func:`compare_spreads`'s answer when a spread is undefined (one value per group)."""


def _axis(axis: Any) -> int:
    if isinstance(axis, bool) or axis not in (0, 1):
        raise ValueError(f"axis must be 0 or 1, got {axis!r:.40}")
    return int(axis)


def _levels(levels: Any, name: str = "levels") -> tuple[float, ...]:
    """``levels``: one number or a 1-D sequence of finite numbers, as floats."""
    arr = v.as_array(name, levels)
    if arr.ndim > 1:
        raise ValueError(f"{name} must be a number or a 1-D sequence of numbers, got shape {arr.shape}")
    arr = np.atleast_1d(arr)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {arr.tolist()}")
    return tuple(float(level) for level in arr)


def _table(table: ArrayLike, axis: int) -> np.ndarray:
    """``table`` as a float array with the members of each group along the last axis."""
    t = v.as_array("table", table, ndim=2, what="(k x seed)")
    _axis(axis)
    if min(t.shape) < 1:
        raise ValueError(f"table must not be empty, got shape {t.shape}")
    if not np.all(np.isfinite(t)):
        raise ValueError("table holds NaN or infinite entries")
    return np.moveaxis(t, axis, -1)


def spread(table: ArrayLike, axis: int) -> float | None:
    """Mean over groups of the population std along ``axis``.

    ``axis=0`` on a k x seed table: the std across k of each seed (the
    perturbation's spread), averaged over seeds; ``axis=1``: across seeds of each
    k (the batch order's spread), averaged over k. Population std (``ddof=0``), as
    in the paper's tables. ``None`` when the table has one entry along ``axis``
    (one seed, say): one value has no spread, and 0.0 would claim a measured one.
    """
    groups = _table(table, axis)
    if groups.shape[-1] < 2:
        return None
    return float(groups.std(axis=-1).mean())


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
      :class:`Interval`; undefined (``None`` numbers) when the table has one entry along
      ``axis``, where no spread exists.
    """
    groups = _table(table, axis)
    resamples = v.check_int("resamples", resamples)
    level = _level(level)
    rng = np.random.default_rng(v.check_int("seed", seed, minimum=0))
    g, n = groups.shape
    if n < 2:
        return Interval(None, None, None, level)
    v.check_memory("resamples", resamples * g * (2 * n + 1) * 8, f"{resamples} resamples of {g} group(s) of {n}",
                   hint="use fewer resamples")
    pick_group = rng.integers(0, g, size=(resamples, g))
    pick_member = rng.integers(0, n, size=(resamples, g, n))
    shrinkage = np.sqrt(n / (n - 1)) if n > 1 else 1.0
    stds = shrinkage * groups[pick_group[..., None], pick_member].std(axis=-1).mean(axis=-1)
    low, high = np.quantile(stds, [(1 - level) / 2, (1 + level) / 2])
    return Interval(spread(table, axis), float(low), float(high), float(level))


def _level(level: Any) -> float:
    try:
        ok = not isinstance(level, bool) and np.ndim(level) == 0 and 0 < float(level) < 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"level must be a number in (0, 1), got {level!r:.40}")
    return float(level)


def compare_spreads(perturbation: Interval, seeds: Interval) -> str:
    """``"same size"`` when the two intervals overlap, else ``"smaller"`` or ``"larger"``
    (the perturbation's spread against the seeds'); :data:`UNDETERMINED` when either spread
    is undefined (one value per group: no spread to compare)."""
    for name, value in (("perturbation", perturbation), ("seeds", seeds)):
        if not isinstance(value, Interval):
            raise ValueError(f"{name} must be an Interval, got {type(value).__name__}")
    if not (perturbation.defined and seeds.defined):
        return UNDETERMINED
    if perturbation.high < seeds.low:
        return "smaller"
    if perturbation.low > seeds.high:
        return "larger"
    return "same size"


def churn(a: ArrayLike, b: ArrayLike) -> float:
    """Fraction of examples whose predicted class differs between two runs."""
    a, b = v.as_array("a", a, None), v.as_array("b", b, None)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"predictions must be two non-empty 1-D arrays of one shape, got {a.shape} and {b.shape}")
    return float(np.mean(a != b))


@dataclasses.dataclass(frozen=True)
class PairwiseSummary:
    """Mean, minimum and maximum of a statistic over ``pairs`` pairs of runs."""

    mean: float
    min: float
    max: float
    pairs: int

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


ChurnSummary = PairwiseSummary
"""The former name of :class:`PairwiseSummary` (churn over pairs of runs), kept for old code."""


def _summary(values: Sequence[float]) -> PairwiseSummary:
    low, high = float(np.min(values)), float(np.max(values))
    return PairwiseSummary(float(np.clip(np.mean(values), low, high)), low, high, len(values))  # no rounding below min


def pairwise_churn(predictions: ArrayLike, axis: int) -> PairwiseSummary:
    """Churn of every pair along ``axis`` of a ``(k, seed, examples)`` array of predicted classes.

    ``axis=0``: pairs of k at each seed (what the perturbation changes);
    ``axis=1``: pairs of seeds at each k (what the batch order changes).
    """
    p = v.as_array("predictions", predictions, None, what="(k, seeds, examples)")
    if p.ndim != 3 or p.shape[2] == 0:
        raise ValueError(f"predictions must have shape (k, seeds, examples), got {p.shape}")
    axis = _axis(axis)
    p = np.moveaxis(p, axis, 1)  # (groups, members, examples)
    if p.shape[1] < 2:
        raise ValueError(f"churn along axis {axis} needs at least 2 runs, got {p.shape[1]}")
    values = [churn(group[i], group[j]) for group in p for i, j in combinations(range(p.shape[1]), 2)]
    return _summary(values)


def divergence_curve(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """:func:`jaxcfl.divergence` of ``a[t]`` and ``b[t]`` for every row ``t``
    (two ``(steps, entries)`` trajectories), as a NumPy array."""
    import jax

    from jaxcfl._core.determinism import divergence

    a, b = v.as_array("a", a, None), v.as_array("b", b, None)
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
    x, y = v.as_array("x", x), v.as_array("y", y)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D arrays of one shape, got {x.shape} and {y.shape}")
    try:
        cap_ok = not isinstance(cap, bool) and np.ndim(cap) == 0 and float(cap) > 0
    except (TypeError, ValueError):
        cap_ok = False
    if not cap_ok:
        raise ValueError(f"cap must be a number > 0 (inf: no cap), got {cap!r:.40}")
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

    A NaN entry counts as above every level (a copy that blew up has diverged). ``levels`` is
    one finite number or a sequence of them.
    """
    c = v.as_array("curve", curve, ndim=1)
    out: dict[float, int | None] = {}
    for level in _levels(levels):
        above = np.flatnonzero(~(c <= level))
        out[float(level)] = int(above[0]) + 1 if above.size else None
    return out


# --- Summers & Dinneen's nondeterminism protocol --------------------------------------------------
#
# Summers & Dinneen, "Nondeterminism and instability in neural network optimization" (ICML 2021):
# train many runs that differ in one source of nondeterminism (the seed of the initialisation, the
# batch order, the numerics, a one-bit change of one weight) and measure what differs between them.


def std_interval(values: ArrayLike, *, resamples: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """Std across runs of one per-run value (e.g. each run's test accuracy), with a bootstrap interval.

    The population std (``ddof=0``), as :func:`spread`; the interval is :func:`bootstrap_spread`'s for a
    single group: the runs resampled with replacement, each resampled std multiplied by
    ``sqrt(n / (n - 1))``. It equals ``bootstrap_spread(values[None, :], 1, ...)``.

    NaN or infinite values (diverged runs) raise ``ValueError``: dropping them silently would
    understate the instability. To leave them out, do so on purpose (``values[np.isfinite(values)]``)
    and report how many runs diverged.

    Args:
      values: 1-D array, one finite value per run, at least 2 runs.
      resamples, level, seed: as in :func:`bootstrap_spread`.

    Returns:
      :class:`Interval` (``estimate``: the std; ``low``, ``high``: the interval).
    """
    x = v.as_array("values", values, what="(one value per run)")
    if x.ndim != 1:
        raise ValueError(f"values must be 1-D (one value per run), got shape {x.shape}")
    bad = int(np.count_nonzero(~np.isfinite(x)))
    if bad:
        raise ValueError(f"values holds {bad} NaN or infinite entries (diverged runs?); leave them out explicitly, "
                         "e.g. values[np.isfinite(values)], and report how many")
    if x.size < 2:
        raise ValueError(f"values needs at least 2 runs for a std, got {x.size}")
    return bootstrap_spread(x[None, :], 1, resamples=resamples, level=level, seed=seed)


def compare_sources(source: Interval, reference: Interval) -> str:
    """:func:`compare_spreads` of two sources of nondeterminism: ``"same size"`` when the intervals overlap,
    else ``"smaller"`` or ``"larger"`` (``source`` against ``reference``)."""
    for name, value in (("source", source), ("reference", reference)):
        if not isinstance(value, Interval):
            raise ValueError(f"{name} must be an Interval, got {type(value).__name__}")
    return compare_spreads(source, reference)


def _short(x: float) -> str:
    """Two significant digits, positional unless very small or large."""
    if x != 0 and np.isfinite(x) and not 1e-3 <= abs(x) < 1e4:
        return f"{x:.2g}"
    return np.format_float_positional(x, precision=2, unique=False, fractional=False, trim="-")


def verdict_sentence(name: str, source: Interval, reference: Interval, metric_name: str) -> str:
    """One line in plain words, e.g.
    ``"numerics vs order: same size (std 0.54 [0.35, 0.68] vs 0.77 [0.47, 0.99] points)"``.

    ``name`` labels the comparison; the verdict is :func:`compare_sources` (overlapping intervals:
    "same size", which means "not distinguishable with these runs", not "equal"); the numbers are
    the two stds with their intervals, two significant digits, followed by ``metric_name`` (the unit;
    ``""``: none).
    """
    for arg, value in (("name", name), ("metric_name", metric_name)):
        if not isinstance(value, str):
            raise ValueError(f"{arg} must be a str, got {type(value).__name__}")
    verdict = compare_sources(source, reference)

    def show(iv: Interval) -> str:
        if not iv.defined:
            return "undefined"
        return f"{_short(iv.estimate)} [{_short(iv.low)}, {_short(iv.high)}]"

    unit = f" {metric_name}" if metric_name else ""
    return f"{name}: {verdict} (std {show(source)} vs {show(reference)}{unit})"


def pairwise_correlation(outputs: ArrayLike) -> PairwiseSummary:
    """Pearson correlation of the outputs of every pair of runs, summarised over the pairs.

    Args:
      outputs: ``(runs, examples, ...)``, e.g. every run's logits on one test set; each run's
        outputs are flattened to one vector. At least 2 runs and 2 entries per run, all finite,
        no run constant (its correlation is undefined).

    Returns:
      :class:`PairwiseSummary` of the ``runs (runs - 1) / 2`` correlations, each in ``[-1, 1]``.
    """
    x = v.as_array("outputs", outputs, what="(runs, examples, ...)")
    if x.ndim < 2 or x.shape[0] < 2 or x[0].size < 2:
        raise ValueError(f"outputs must have shape (runs >= 2, examples, ...) with >= 2 entries per run, got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("outputs holds NaN or infinite entries")
    flat = x.reshape(x.shape[0], -1)
    constant = np.flatnonzero(np.ptp(flat, axis=1) == 0)  # exact: a rounded mean would leave noise
    if constant.size:
        raise ValueError(f"outputs of run(s) {constant.tolist()} are constant: their correlation is undefined")
    centred = flat - flat.mean(axis=1, keepdims=True)
    centred = centred / np.max(np.abs(centred), axis=1, keepdims=True)  # no underflow in the squares
    squares = np.einsum("pe,pe->p", centred, centred)
    i, j = np.triu_indices(flat.shape[0], 1)
    # dot / sqrt(|a|^2 |b|^2): exactly 1 for two identical runs.
    r = np.einsum("pe,pe->p", centred[i], centred[j]) / np.sqrt(squares[i] * squares[j])
    return _summary(np.clip(r, -1.0, 1.0))


def pairwise_disagreement(predictions: ArrayLike) -> PairwiseSummary:
    """:func:`churn` of every pair of runs of a ``(runs, examples)`` integer array of predicted classes.

    Returns:
      :class:`PairwiseSummary` of the ``runs (runs - 1) / 2`` fractions of examples on which two runs disagree.
    """
    p = v.as_array("predictions", predictions, None, what="(runs, examples)")
    if p.ndim != 2 or p.shape[0] < 2 or p.shape[1] == 0:
        raise ValueError(f"predictions must have shape (runs >= 2, examples >= 1), got {p.shape}")
    if not (np.issubdtype(p.dtype, np.integer) or p.dtype == np.bool_):
        raise ValueError(f"predictions must be integer class labels (argmax of the outputs), got dtype {p.dtype}")
    return _summary([churn(p[i], p[j]) for i, j in combinations(range(p.shape[0]), 2)])


@dataclasses.dataclass(frozen=True)
class EnsembleGain:
    """What averaging the runs' predicted probabilities buys over a single run.

    Accuracies are fractions in ``[0, 1]``; losses are the mean cross-entropy in nats. Both gains
    are positive when the ensemble is better: ``accuracy_gain = ensemble_accuracy - mean_accuracy``,
    ``loss_gain = mean_loss - ensemble_loss`` (never negative, by Jensen's inequality).
    """

    ensemble_accuracy: float
    mean_accuracy: float
    accuracy_gain: float
    ensemble_loss: float
    mean_loss: float
    loss_gain: float
    runs: int

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def ensemble_gain(outputs: ArrayLike, labels: ArrayLike) -> EnsembleGain:
    """Accuracy and cross-entropy of the ensemble of the runs against those of the single runs.

    The ensemble's probabilities are the mean over runs of each run's softmax (computed in float64,
    shifted by the maximum logit); its prediction is their argmax. A run's prediction is the argmax
    of its logits; ``mean_accuracy`` and ``mean_loss`` average the runs' accuracies and losses.
    ``ensemble_loss`` is the mean over examples of ``-log`` of the averaged probability of the true
    label (computed from the log-probabilities, so it stays finite when a probability underflows).

    Args:
      outputs: ``(runs, examples, classes)`` finite logits.
      labels: ``(examples,)`` integer labels in ``[0, classes)``.

    Returns:
      :class:`EnsembleGain`.
    """
    z = v.as_array("outputs", outputs, what="(runs, examples, classes)")
    if z.ndim != 3 or min(z.shape) < 1:
        raise ValueError(f"outputs must have shape (runs, examples, classes), none empty, got {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("outputs holds NaN or infinite logits")
    runs, examples, classes = z.shape
    y = v.as_array("labels", labels, None)
    if y.shape != (examples,):
        raise ValueError(f"labels must have shape ({examples},) (one per example of outputs), got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= classes:
        raise ValueError(f"labels must lie in [0, {classes}), got values in [{y.min()}, {y.max()}]")
    logp = _log_softmax(z)
    true = logp[:, np.arange(examples), y]  # (runs, examples): log-probability of the true label
    correct = int(np.count_nonzero(z.argmax(axis=-1) == y))
    mean_accuracy = correct / (runs * examples)  # = mean over runs of each run's accuracy, exactly rounded
    ensemble_accuracy = float(np.count_nonzero(np.exp(logp).mean(axis=0).argmax(axis=-1) == y)) / examples
    peak = true.max(axis=0)
    ensemble_true = peak + np.log(np.exp(true - peak).mean(axis=0))  # log of the mean probability
    ensemble_loss = float(-ensemble_true.mean())
    mean_loss = float(-true.mean(axis=1).mean())
    return EnsembleGain(ensemble_accuracy, mean_accuracy, ensemble_accuracy - mean_accuracy, ensemble_loss,
                        mean_loss, mean_loss - ensemble_loss, runs)


SATURATION = 0.1
"""Divergence above which a curve has saturated (order one: the copies are different networks)."""
BEYOND_ACCUMULATION = 10.0
"""How far above the accumulation bound a divergence must rise to count as amplified."""
INJECTION_WINDOW = 10
"""Steps whose median divergence estimates the rounding injected per step (:func:`amplification`)."""
GROWN_WITHIN_WINDOW = 20.0
"""Growth from the first :data:`INJECTION_WINDOW` steps' median to the next window's above which the
first window is already amplified, and the first step's divergence estimates the injection instead.
Measured on Figure 2's curves (``docs/fig2.md``): runs that stay at rounding level grow 1.8-6.8x
from one window to the next (a transient, then a creep), the lr-0.3 run of the default 31x."""


def _injection(positive: np.ndarray) -> float:
    """The rounding injected per step, from a curve's positive values (see :func:`amplification`)."""
    if not positive.size:
        return 0.0
    window = float(np.median(positive[:INJECTION_WINDOW]))
    after = positive[INJECTION_WINDOW:2 * INJECTION_WINDOW]
    if after.size and np.all(np.isfinite(after)) and np.median(after) > GROWN_WITHIN_WINDOW * window:
        return float(positive[0])
    return window


def amplification(curve: ArrayLike, *, scale: float = 1) -> dict[str, Any]:
    """How much a divergence ``curve`` between two runs (one value after every step) is amplified.

    * ``slope``, ``slope_stderr``, ``slope_points``: the growth rate per ``scale`` steps (the x axis
      is ``step / scale``, steps counted from 1), the least-squares slope of ``ln divergence``
      (:func:`log_slope`) over the steps where it is positive and below :data:`SATURATION`;
      ``None``, ``None``, 0 with fewer than 3 such steps. Figure 2 passes ``scale = n`` (its lr is
      ``base_lr / n``), so its slope is per scaled iteration ``iteration / n``.
    * ``amplified``: whether the divergence rose more than :data:`BEYOND_ACCUMULATION` times
      above what the injected rounding alone can build up. Every step re-injects a
      last-bit perturbation of the size of the first step's divergence ``d1`` (``first_divergence``:
      the median of the first :data:`INJECTION_WINDOW` positive values, the rounding level a step
      settles at; but the first positive value, one step's injection, when the next window's median
      is more than :data:`GROWN_WITHIN_WINDOW` times theirs: the divergence was amplified inside
      the window, as with an lr far beyond the CFL limit); without amplification ``S`` steps add up to
      at most ``d1 * S`` (``accumulation_bound``; coherent accumulation, a random walk gives
      ``d1 sqrt(S)``). A stable (CFL-satisfying) step keeps the divergence there; an unstable one
      multiplies it. A non-finite entry (a run blew up) counts as amplified, with
      ``peak_divergence`` ``None``; otherwise ``peak_divergence`` is the curve's maximum.
    """
    c = v.as_array("curve", curve, None)
    if not np.issubdtype(c.dtype, np.floating):
        c = c.astype(np.float64)
    if c.ndim != 1 or c.size == 0:
        raise ValueError(f"curve must be a non-empty 1-D array, got shape {c.shape}")
    if isinstance(scale, bool) or np.ndim(scale) != 0:
        raise ValueError(f"scale must be a number > 0, got {scale!r}")
    v.check_positive("scale", scale)
    steps = c.size
    fit = log_slope(np.arange(1, steps + 1) / scale, c, cap=SATURATION)
    positive = c[c > 0]
    d1 = _injection(positive)
    blown_up = not np.all(np.isfinite(c))  # a copy went non-finite: amplified without bound
    peak = None if blown_up else float(np.max(c))
    bound = d1 * steps
    amplified = bool(blown_up or (d1 > 0 and peak > BEYOND_ACCUMULATION * bound))
    return dict(slope=None if fit is None else fit.slope, slope_stderr=None if fit is None else fit.stderr,
                slope_points=0 if fit is None else fit.points, first_divergence=d1, peak_divergence=peak,
                accumulation_bound=bound, amplified=amplified)


def _json_number(x: float | None) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


@dataclasses.dataclass(frozen=True)
class DivergenceSummary:
    """How a weight divergence between two runs grew (:func:`divergence_summary`)."""

    steps: int
    first_step: dict[float, int | None]
    growth: GrowthRate | None
    final: float
    max: float
    amplified: bool
    first_divergence: float
    accumulation_bound: float
    ratio_to_bound: float

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON values: ``None`` for NaN and infinities, levels as string keys (``repr`` of the float)."""
        growth = None if self.growth is None else {k: _json_number(x) if isinstance(x, float) else x
                                                   for k, x in self.growth.to_dict().items()}
        return dict(steps=self.steps, first_step={repr(float(k)): s for k, s in self.first_step.items()},
                    growth=growth, final=_json_number(self.final), max=_json_number(self.max),
                    amplified=self.amplified, first_divergence=_json_number(self.first_divergence),
                    accumulation_bound=_json_number(self.accumulation_bound),
                    ratio_to_bound=_json_number(self.ratio_to_bound))


def divergence_summary(curve: ArrayLike, *, levels: Sequence[float] = (1e-3, 1e-2, 1e-1)) -> DivergenceSummary:
    """Summary of a 1-D per-step weight-divergence curve between two runs.

    * ``first_step``: level -> first step (1-based) above it, or ``None`` (:func:`first_crossing`;
      NaN counts as above every level).
    * ``growth``: :func:`log_slope` of the curve against the step (1..n), per step, over the points
      that are positive and below :data:`SATURATION` (as Figure 2); ``None`` with fewer than 3.
    * ``final``, ``max``: the last and the largest value (NaN when the curve holds a NaN).
    * ``amplified``, ``first_divergence``, ``accumulation_bound``: :func:`amplification`'s criterion,
      amplified when ``max > BEYOND_ACCUMULATION * accumulation_bound`` or the curve is non-finite;
      ``ratio_to_bound = max / accumulation_bound`` (NaN when the curve is all zero, infinite when
      it blew up).

    Args:
      curve: 1-D, one divergence (>= 0, or NaN/inf for a run that blew up) per step.
      levels: the levels of ``first_step``, finite and > 0.
    """
    c = v.as_array("curve", curve)
    if c.ndim != 1 or c.size == 0:
        raise ValueError(f"curve must be a non-empty 1-D array, got shape {c.shape}")
    if np.any(c < 0):
        raise ValueError(f"curve must be >= 0 (a divergence), got minimum {np.nanmin(c)}")
    levels = _levels(levels)
    if levels:
        v.check_positive("levels", levels)
    amp = amplification(c)
    growth = None if amp["slope"] is None else GrowthRate(amp["slope"], amp["slope_stderr"], amp["slope_points"])
    peak = float(np.max(c))
    bound = amp["accumulation_bound"]
    blown_up = amp["peak_divergence"] is None
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.inf if blown_up else float(np.float64(peak) / bound)
    return DivergenceSummary(int(c.size), first_crossing(c, levels), growth, float(c[-1]), peak, amp["amplified"],
                             amp["first_divergence"], bound, ratio)


__all__ = [
    "BEYOND_ACCUMULATION",
    "ChurnSummary",
    "DivergenceSummary",
    "EnsembleGain",
    "GROWN_WITHIN_WINDOW",
    "GrowthRate",
    "INJECTION_WINDOW",
    "Interval",
    "PairwiseSummary",
    "SATURATION",
    "UNDETERMINED",
    "amplification",
    "bootstrap_spread",
    "churn",
    "compare_sources",
    "compare_spreads",
    "divergence_curve",
    "divergence_summary",
    "ensemble_gain",
    "first_crossing",
    "log_slope",
    "pairwise_churn",
    "pairwise_correlation",
    "pairwise_disagreement",
    "spread",
    "std_interval",
    "verdict_sentence",
]
