"""Vectorised bracketing and bisection in log space, and :func:`empirical_bounds`.

The search is written once (:func:`log_bisect`) and serves every "where does the
scheme stop being stable" question: the weight-decay bounds of the one-layer CNN
here, the largest stable learning rate of a network elsewhere. Each round
evaluates many candidates in one vectorised call.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from jax.typing import ArrayLike

from jaxcfl import _validate as v
from jaxcfl.classify import STABLE, Rule
from jaxcfl.problem import make_hyper
from jaxcfl.sweeps import classify_metrics, run_configs, setup_configs


@dataclasses.dataclass
class Bracket:
    """``lo < hi`` with ``ok(lo) != ok(hi)``: one transition of the predicate lies inside."""

    lo: float
    hi: float
    ok_lo: bool

    @property
    def width(self) -> float:
        """Relative width ``hi / lo - 1``."""
        return self.hi / self.lo - 1.0

    @property
    def boundary(self) -> float:
        """The geometric midpoint, the estimate of the transition."""
        return float(np.sqrt(self.lo * self.hi))


def log_bisect(
    evaluate: Callable[[np.ndarray], np.ndarray],
    brackets: list[Bracket],
    *,
    candidates: int = 15,
    rtol: float = 1e-3,
    max_rounds: int = 20,
) -> tuple[list[Bracket], int, int]:
    """Shrink every bracket to relative width ``rtol``, all brackets evaluated together.

    Each round places ``candidates`` log-spaced points inside every bracket that is
    still too wide, calls ``evaluate`` once on all of them (it returns a boolean
    per point: the predicate, e.g. "stable"), and keeps the sub-interval holding
    the transition next to the ``ok`` side (the edge of the contiguous ``ok``
    region, should the predicate flip more than once). Each round divides a
    bracket's log-width by ``candidates + 1``.

    Returns:
      The refined brackets, the number of rounds and of evaluations.
    """
    v.check_int("candidates", candidates, minimum=1)
    v.check_positive("rtol", rtol)
    brackets = [dataclasses.replace(b) for b in brackets]
    rounds = evaluations = 0
    while rounds < max_rounds:
        active = [b for b in brackets if b.width > rtol]
        if not active:
            break
        points = [np.geomspace(b.lo, b.hi, candidates + 2)[1:-1] for b in active]
        oks = np.asarray(evaluate(np.concatenate(points)), bool)
        evaluations += oks.size
        rounds += 1
        for b, pts, ok in zip(active, points, np.split(oks, len(active))):
            grid = np.concatenate([[b.lo], pts, [b.hi]])
            flags = np.concatenate([[b.ok_lo], ok, [not b.ok_lo]])
            changes = np.flatnonzero(flags[1:] != flags[:-1])
            # ok on the left: first change (edge of the ok region that starts at lo);
            # ok on the right: last change.
            i = changes[0] if b.ok_lo else changes[-1]
            b.lo, b.hi = float(grid[i]), float(grid[i + 1])
    return brackets, rounds, evaluations


@dataclasses.dataclass
class EmpiricalBounds:
    """The stable range of ``alpha`` found by running the scheme, beside the theory.

    ``alpha_min``/``alpha_max`` are NaN when the stable set reaches the end of the
    searched range (the bound lies outside it) or is empty; ``notes`` says which.
    ``gap_*`` are relative gaps ``(empirical - theory) / |theory|``.
    """

    alpha_min: float
    alpha_max: float
    alpha_min_bracket: tuple[float, float] | None
    alpha_max_bracket: tuple[float, float] | None
    lr: float
    scheme: str
    model: str
    kernel_size: int
    rtol: float
    paper: tuple[float, float] | None
    windowed: tuple[float, float] | None
    gap_paper: tuple[float, float] | None
    gap_windowed: tuple[float, float] | None
    rounds: int
    evaluations: int
    steps: int
    seconds: float
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {k: _plain(val) for k, val in dataclasses.asdict(self).items()}


def _edge_brackets(grid: np.ndarray, ok: np.ndarray) -> tuple[dict[str, Bracket], list[str]]:
    """Brackets around the lower ("min") and upper ("max") edge of the stable points of a grid."""
    notes: list[str] = []
    brackets: dict[str, Bracket] = {}
    if not ok.any():
        notes.append(f"no stable alpha among {grid.size} points in [{grid[0]:g}, {grid[-1]:g}]")
        return brackets, notes
    idx = np.flatnonzero(ok)
    first, last = idx[0], idx[-1]
    if not ok[first:last + 1].all():
        notes.append("the stable set is not an interval on the initial grid; bounds enclose its outermost points")
    if first == 0:
        notes.append(f"stable at alpha_range's lower end {grid[0]:g}: alpha_min lies below the range")
    else:
        brackets["min"] = Bracket(float(grid[first - 1]), float(grid[first]), ok_lo=False)
    if last == grid.size - 1:
        notes.append(f"stable at alpha_range's upper end {grid[-1]:g}: alpha_max lies above the range")
    else:
        brackets["max"] = Bracket(float(grid[last]), float(grid[last + 1]), ok_lo=True)
    return brackets, notes


def _plain(value):
    if isinstance(value, (tuple, list)):
        return [_plain(x) for x in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _gap(empirical: float, theory: float) -> float:
    return float((empirical - theory) / abs(theory)) if np.isfinite(empirical) and theory != 0 else float("nan")


def empirical_bounds(
    image: ArrayLike,
    kernel_size: int,
    lr: float,
    *,
    scheme: str = "gd",
    model: str = "linear",
    momentum: float = 0.9,
    a: float = -0.5,
    beta: float = 1.0,
    pool: str = "sum",
    label: float = 1.0,
    bias: float = 0.0,
    steps: int = 1000,
    alpha_range: tuple[float, float] = (1e-3, 1e12),
    initial_points: int = 64,
    candidates: int = 31,
    screen_steps: int | None = None,
    rtol: float = 1e-3,
    key=None,
    kernel: ArrayLike | None = None,
    chunk_size: int = 256,
    mesh=None,
    operator: str = "auto",
    rule: Rule = Rule(),
    theory: bool = True,
    progress: bool | None = None,
) -> EmpiricalBounds:
    """Find ``alpha_min`` and ``alpha_max`` by running the scheme (not from the formulas).

    Method (every evaluation is one vmapped call of the sweep engine, with all
    candidates of both bounds together):

    1. *Screening*: ``initial_points`` log-spaced ``alpha`` over ``alpha_range``,
       then :func:`log_bisect` with ``candidates`` points per bracket per round,
       down to 1% brackets, using short runs of ``screen_steps`` iterations
       (default ``steps // 5``; far from a bound the growth or decay shows early).
    2. *Verification and refinement*: each bracket is widened by 0.5% on both
       sides, and its ends and up to ``candidates`` points inside are run for the full
       ``steps``, all in one call. If the ends disagree with the screening (slow
       transients can fool short runs), the coarse scan is redone at full length
       for that bound (and ``notes`` says so).
    3. Further full-length rounds until each bracket is narrower than ``rtol``
       (relative; default 1e-3); usually none are needed.

    Each candidate is a run from the N(0, 1) kernel drawn from ``key``,
    classified by :mod:`jaxcfl.classify`; "stable" is the predicate. The
    reported bound is the geometric midpoint of its final bracket, within
    ``rtol/2`` of the transition that full-length runs show.

    Works for both schemes and every model, including ``"nonlinear"`` where no
    formula exists. For the linearised models the result also carries the
    paper's non-windowed bounds (``model="linear"`` only) and the exact windowed
    bounds of :mod:`jaxcfl.theory`, with the relative gaps.

    Returns:
      :class:`EmpiricalBounds`.
    """
    start_time = time.perf_counter()
    v.check_positive("lr", lr)
    lo, hi = (float(x) for x in alpha_range)
    if not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo < hi):
        raise ValueError(f"alpha_range must be two finite numbers 0 < lo < hi, got {alpha_range!r}")
    v.check_int("initial_points", initial_points, minimum=3)
    problem, kernel0, _, spec = setup_configs(
        image, kernel_size, np.array([lr]), np.array([lo]), scheme=scheme, model=model, pool=pool, beta=beta, a=a,
        label=label, bias=bias, momentum=momentum, steps=steps, compare_k=None, key=key, kernel=kernel,
        record_points=100, chunk_size=chunk_size, operator=operator,
    )
    screen = max(1, min(spec["steps"], screen_steps if screen_steps is not None else spec["steps"] // 5))

    def stable_after(n_steps: int) -> Callable[[np.ndarray], np.ndarray]:
        def stable(alphas: np.ndarray) -> np.ndarray:
            n = alphas.size
            hypers = make_hyper(
                np.full(n, lr), alphas, beta=np.full(n, beta), a=np.full(n, a), label=np.full(n, label),
                bias=np.full(n, bias), mu=np.full(n, momentum), dtype=problem.dtype,
            )
            flat, _ = run_configs(problem, kernel0, hypers, scheme=spec["scheme"], model=model, steps=n_steps,
                                  chunk_size=chunk_size, mesh=mesh, progress=progress, with_loss=False, width=width)
            return classify_metrics(flat, rule, spec) == STABLE

        return stable

    # One batch width for every call (padded), so each run length compiles once.
    width = min(chunk_size, max(initial_points, 2 * (candidates + 2)))  # 2 brackets, ends included
    full = stable_after(spec["steps"])
    quick = stable_after(screen)
    # Stage 1 (screening): short runs find the edges of the stable set to ~1%.
    grid = np.geomspace(lo, hi, initial_points)
    brackets, notes = _edge_brackets(grid, quick(grid))
    evaluations, rounds = grid.size, 1
    if screen < spec["steps"] and brackets:
        screened, r, more = log_bisect(quick, list(brackets.values()), candidates=candidates, rtol=max(rtol, 1e-2))
        rounds, evaluations = rounds + r, evaluations + more
        # Stage 2 (verification at full length, in the same call as the first full
        # refinement): widen each screened bracket by 1% on both sides and run its
        # ends and `candidates` points inside for the full length.
        widened = {name: Bracket(b.lo / 1.005, b.hi * 1.005, b.ok_lo) for name, b in zip(brackets, screened)}
        # As many points as reach `rtol` in this one round (at most `candidates`).
        span = max(np.log(b.hi / b.lo) for b in widened.values())
        inside = int(min(candidates, max(1, np.ceil(span / np.log1p(rtol)) - 1)))
        points = {name: np.geomspace(b.lo, b.hi, inside + 2) for name, b in widened.items()}
        oks = np.split(full(np.concatenate(list(points.values()))), len(points))
        rounds, evaluations = rounds + 1, evaluations + sum(p.size for p in points.values())
        agree = {}
        brackets = {}
        for (name, b), pts, ok in zip(widened.items(), points.values(), oks):
            agree[name] = bool(ok[0] == b.ok_lo and ok[-1] != b.ok_lo)
            if agree[name]:
                changes = np.flatnonzero(ok[1:] != ok[:-1])
                i = changes[0] if b.ok_lo else changes[-1]
                brackets[name] = Bracket(float(pts[i]), float(pts[i + 1]), b.ok_lo)
        if not all(agree.values()):
            # Short runs misjudged this edge (slow transients): redo the coarse scan at full length.
            notes.append("screening runs disagreed with full runs for alpha_" + "/alpha_".join(n for n in agree if not agree[n])
                         + "; rescanned at full length")
            full_brackets, full_notes = _edge_brackets(grid, full(grid))
            rounds, evaluations = rounds + 1, evaluations + grid.size
            for name in agree:
                if not agree[name] and name in full_brackets:
                    brackets[name] = full_brackets[name]
            notes.extend(n for n in full_notes if n not in notes)
    refined, r, more = log_bisect(full, list(brackets.values()), candidates=candidates, rtol=rtol)
    refined = dict(zip(brackets, refined))
    rounds, evaluations = rounds + r, evaluations + more

    alpha_min = refined["min"].boundary if "min" in refined else float("nan")
    alpha_max = refined["max"].boundary if "max" in refined else float("nan")
    paper = windowed = gap_paper = gap_windowed = None
    if theory:
        from jaxcfl import theory as th

        if model == "linear":
            paper = tuple(th.alpha_bounds(image, lr, a=a, beta=beta, scheme=scheme, momentum=momentum, pool=pool))
            gap_paper = (_gap(alpha_min, paper[0]), _gap(alpha_max, paper[1]))
        windowed = tuple(th.windowed_alpha_bounds(image, kernel_size, lr, a=a, beta=beta, scheme=scheme, momentum=momentum,
                                                  model=model, pool=pool, label=label, bias=bias))
        gap_windowed = (_gap(alpha_min, windowed[0]), _gap(alpha_max, windowed[1]))
        if model == "nonlinear":
            notes.append("windowed theory for the nonlinear model is that of its linearisation at K = 0")
    return EmpiricalBounds(
        alpha_min=alpha_min,
        alpha_max=alpha_max,
        alpha_min_bracket=(refined["min"].lo, refined["min"].hi) if "min" in refined else None,
        alpha_max_bracket=(refined["max"].lo, refined["max"].hi) if "max" in refined else None,
        lr=float(lr),
        scheme=spec["scheme"],
        model=model,
        kernel_size=int(kernel_size),
        rtol=rtol,
        paper=paper,
        windowed=windowed,
        gap_paper=gap_paper,
        gap_windowed=gap_windowed,
        rounds=rounds,
        evaluations=evaluations,
        steps=spec["steps"],
        seconds=time.perf_counter() - start_time,
        notes=notes,
    )
