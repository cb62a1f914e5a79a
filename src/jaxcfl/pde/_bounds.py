"""Empirical stability bounds on the weight decay: :func:`empirical_bounds`, in three stages.

``alpha_min`` and ``alpha_max`` are found by running the scheme, not from the
formulas: every evaluation is one vmapped call of the sweep engine
(:func:`jaxcfl.pde._sweeps.run_configs`) with all candidates of both bounds
together, and the search is the generic one of :mod:`jaxcfl._core.search`.

1. :func:`_screen`: a coarse log grid, then bisection to 1% brackets with short runs.
2. :func:`_verify`: each screened bracket, widened by 0.5% on both sides, is
   checked and narrowed with full-length runs in one call; an edge the short runs
   misjudged is rescanned at full length.
3. :func:`_refine`: full-length bisection down to ``rtol``.

The result sits beside the theory of :mod:`jaxcfl.theory` (paper and windowed bounds).

Started as N processes (:mod:`jaxcfl.distributed`), every evaluation spans every device of
every process, and every process receives all statuses: each takes the same bisection
steps and returns the same bounds (docs/scaling.md).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from jax.typing import ArrayLike

from jaxcfl._core import validate as v
from jaxcfl._core.results import jsonable
from jaxcfl._core.classify import MIN_STEPS, STABLE, Rule
from jaxcfl.pde._controllers import GuardSchedule
from jaxcfl.pde._integration import check_guard
from jaxcfl.pde._rhs import Model
from jaxcfl.pde._schemes import Scheme
from jaxcfl.pde._setup import Setup, setup_from
from jaxcfl._core.search import Bracket, edge_brackets, log_bisect, narrow
from jaxcfl.pde._sweeps import classify_metrics, prepare, run_configs

__all__ = ["EmpiricalBounds", "empirical_bounds"]

Predicate = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass
class EmpiricalBounds:
    """The stable range of ``alpha`` found by running the scheme, beside the theory.

    ``alpha_min``/``alpha_max`` are NaN when the stable set reaches the end of the
    searched range (the bound lies outside it) or is empty; ``notes`` says which.
    ``gap_*`` are relative gaps ``(empirical - theory) / |theory|``.

    ``achieved_rtol`` is the relative precision the result actually has, where an exact
    bound exists to judge it (an affine model, :attr:`~jaxcfl.pde.Model.affine`, such as the linear
    one, unguarded: its windowed bound): the larger
    of ``rtol`` and the distance of each found bound from the exact one. ``limited_by_steps``
    is then whether that distance exceeds ``rtol``: runs of ``steps`` iterations too short
    to classify the slow modes near a bound (a warning says so). Both are ``None`` where no
    exact bound exists (other models, a guarded scheme, ``theory=False``).
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
    achieved_rtol: float | None = None
    limited_by_steps: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return jsonable(dataclasses.asdict(self))


def _alpha_edges(grid: np.ndarray, ok: np.ndarray) -> tuple[dict[str, Bracket], list[str]]:
    """Brackets around ``alpha_min`` (``"min"``) and ``alpha_max`` (``"max"``) on a scanned grid, with notes."""
    lower, upper, findings = edge_brackets(grid, ok)
    if lower is None and upper is None and not ok.any():
        return {}, [f"no stable alpha among {grid.size} points in [{grid[0]:g}, {grid[-1]:g}]"]
    words = {
        "not an interval": "the stable set is not an interval on the initial grid; bounds enclose its outermost points",
        "ok at the lower end": f"stable at alpha_range's lower end {grid[0]:g}: alpha_min lies below the range",
        "ok at the upper end": f"stable at alpha_range's upper end {grid[-1]:g}: alpha_max lies above the range",
    }
    brackets = {name: b for name, b in (("min", lower), ("max", upper)) if b is not None}
    return brackets, [words[f] for f in findings]


def _gap(empirical: float, theory: float) -> float:
    return float((empirical - theory) / abs(theory)) if np.isfinite(empirical) and theory != 0 else float("nan")


def empirical_bounds(
    image: ArrayLike,
    kernel_size: int,
    lr: float,
    *,
    setup: Setup | None = None,
    scheme: str | Scheme | None = None,
    model: str | Model | None = None,
    momentum: float | None = None,
    a: float | None = None,
    beta: float | None = None,
    pool: str | None = None,
    label: float | None = None,
    bias: float | None = None,
    safety: float | None = None,
    guard: GuardSchedule | None = None,
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

    Method (module docstring; every evaluation is one vmapped call of the sweep
    engine, with all candidates of both bounds together):

    1. *Screen* (:func:`_screen`): ``initial_points`` log-spaced ``alpha`` over
       ``alpha_range``, then :func:`jaxcfl.log_bisect` with ``candidates``
       points per bracket per round, down to 1% brackets, using short runs of
       ``screen_steps`` iterations (default ``steps // 5``, at least ``MIN_STEPS``; far from a bound the
       growth or decay shows early).
    2. *Verify* (:func:`_verify`): each bracket is widened by 0.5% on both sides,
       and its ends and up to ``candidates`` points inside run for the full
       ``steps``, all in one call. If the ends disagree with the screening (slow
       transients can fool short runs), the coarse scan is redone at full length
       for that bound (and ``notes`` says so).
    3. *Refine* (:func:`_refine`): further full-length rounds until each bracket
       is narrower than ``rtol`` (relative; default 1e-3); usually none are needed.

    Each candidate is a run from the N(0, 1) kernel drawn from ``key``,
    classified by :mod:`jaxcfl._core.classify`; "stable" is the predicate. The
    reported bound is the geometric midpoint of its final bracket, within
    ``rtol/2`` of the transition that full-length runs show.

    The set-up is ``setup`` (a :class:`jaxcfl.Setup`) or, instead, its fields as keywords, as in
    :func:`jaxcfl.sweep`; a guarded scheme's runs use its ``safety`` and ``guard``.

    Works for every scheme and every model, including ``"nonlinear"`` where no
    formula exists. For the linearised models the result also carries the
    paper's non-windowed bounds (``model="linear"`` only) and the exact windowed
    bounds of :mod:`jaxcfl.theory`, with the relative gaps.

    Returns:
      :class:`EmpiricalBounds`.
    """
    start_time = time.perf_counter()
    if np.ndim(lr) != 0:
        raise ValueError(f"lr must be one learning rate (a scalar), got shape {np.shape(lr)}; "
                         f"call empirical_bounds once per lr")
    v.check_positive("lr", lr)
    lo, hi = (float(x) for x in alpha_range)
    if not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo < hi):
        raise ValueError(f"alpha_range must be two finite numbers 0 < lo < hi, got {alpha_range!r}")
    v.check_int("initial_points", initial_points, minimum=3)
    if not isinstance(rule, Rule):
        raise TypeError(f"rule must be a jaxcfl.Rule, got {type(rule).__name__} {rule!r:.60}")
    v.check_int("steps", steps, minimum=MIN_STEPS)  # fewer cannot be classified (jaxcfl._core.classify.MIN_STEPS)
    setup = setup_from(setup, "empirical_bounds", model=model, scheme=scheme, pool=pool, beta=beta, a=a, label=label,
                       bias=bias, momentum=momentum, safety=safety, guard=check_guard(guard))
    problem, kernel0, spec = prepare(image, kernel_size, setup, steps=steps, key=key, kernel=kernel,
                                     chunk_size=chunk_size, operator=operator)
    if not np.any(np.asarray(problem.image)):
        raise ValueError("image is all zeros (an all-black picture): the output does not depend on the kernel, so "
                         "only the weight decay acts and there is no stability bound to find by running the scheme; "
                         "give an image with non-zero pixels")
    if screen_steps is not None:
        v.check_int("screen_steps", screen_steps, minimum=MIN_STEPS)
    screen = min(spec.steps, screen_steps if screen_steps is not None else max(MIN_STEPS, spec.steps // 5))
    # One batch width for every call (padded), so each run length compiles once.
    width = min(chunk_size, max(initial_points, 2 * (candidates + 2)))  # 2 brackets, ends included

    def stable_after(n_steps: int) -> Predicate:
        def stable(alphas: np.ndarray) -> np.ndarray:
            hypers = setup.hyper(np.full(alphas.size, lr), alphas, dtype=problem.dtype)
            flat, _ = run_configs(problem, kernel0, hypers, setup=setup, steps=n_steps, chunk_size=chunk_size, mesh=mesh,
                                  progress=progress, with_loss=False, width=width)
            return classify_metrics(flat, rule, spec) == STABLE

        return stable

    full = stable_after(spec.steps)
    grid = np.geomspace(lo, hi, initial_points)
    tally = _Tally()
    if screen < spec.steps:
        brackets, notes = _screen(stable_after(screen), grid, candidates, rtol, tally)
        if brackets:
            brackets = _verify(full, brackets, grid, candidates, rtol, tally, notes)
    else:
        brackets, notes = _alpha_edges(grid, full(grid))
        tally.add(1, grid.size)
    refined = _refine(full, brackets, candidates, rtol, tally)
    alpha_min = refined["min"].boundary if "min" in refined else float("nan")
    alpha_max = refined["max"].boundary if "max" in refined else float("nan")
    paper = windowed = gap_paper = gap_windowed = None
    if theory:
        from jaxcfl.pde import _theory as th
        rhs = setup.model
        if rhs.paper_bounds:
            paper = tuple(th.alpha_bounds(image, lr, a=setup.a, beta=setup.beta, scheme=setup.scheme,
                                          momentum=setup.momentum, pool=setup.pool))
            gap_paper = (_gap(alpha_min, paper[0]), _gap(alpha_max, paper[1]))
        windowed = tuple(th.windowed_alpha_bounds(image, kernel_size, lr, **setup.theory_kwargs()))
        gap_windowed = (_gap(alpha_min, windowed[0]), _gap(alpha_max, windowed[1]))
        if not rhs.linearised:
            notes.append(f"windowed theory for the {rhs.name} model is that of its linearisation at K = 0")
    exact = windowed if theory and setup.model.affine and not setup.guarded else None
    achieved_rtol, limited_by_steps = _achieved(alpha_min, alpha_max, exact, rtol, spec.steps, notes)
    return EmpiricalBounds(
        alpha_min=alpha_min,
        alpha_max=alpha_max,
        alpha_min_bracket=(refined["min"].lo, refined["min"].hi) if "min" in refined else None,
        alpha_max_bracket=(refined["max"].lo, refined["max"].hi) if "max" in refined else None,
        lr=float(lr),
        scheme=setup.scheme.name,
        model=setup.model.name,
        kernel_size=int(kernel_size),
        rtol=rtol,
        paper=paper,
        windowed=windowed,
        gap_paper=gap_paper,
        gap_windowed=gap_windowed,
        rounds=tally.rounds,
        evaluations=tally.evaluations,
        steps=spec.steps,
        seconds=time.perf_counter() - start_time,
        notes=notes,
        achieved_rtol=achieved_rtol,
        limited_by_steps=limited_by_steps,
    )


def _achieved(alpha_min: float, alpha_max: float, exact: tuple[float, float] | None, rtol: float, steps: int,
              notes: list[str]) -> tuple[float | None, bool | None]:
    """``(achieved_rtol, limited_by_steps)`` of :class:`EmpiricalBounds`, judged against the ``exact``
    bounds (``None``: none exist, nothing judged); a bound farther than ``rtol`` from its exact value
    gets a note and a warning."""
    if exact is None:
        return None, None
    achieved, limited = float(rtol), False
    for name, found, true in (("alpha_min", alpha_min, exact[0]), ("alpha_max", alpha_max, exact[1])):
        if not (np.isfinite(found) and np.isfinite(true) and true != 0):
            continue
        error = abs(found - true) / abs(true)
        achieved = max(achieved, error)
        if error > rtol:
            limited = True
            message = (f"{name} = {found:.6g} is {error:.2%} from the exact windowed bound {true:.6g}, more than "
                       f"rtol = {rtol:g}: runs of {steps} steps are too short to classify the slow modes near it; "
                       f"raise steps (the error shrinks roughly as 1/steps)")
            notes.append(message)
            warnings.warn(f"empirical_bounds: {message}", RuntimeWarning, stacklevel=3)
    return achieved, limited


# --- the three stages ------------------------------------------------------------------

@dataclasses.dataclass
class _Tally:
    """Rounds (vectorised calls) and evaluations (runs) spent so far."""

    rounds: int = 0
    evaluations: int = 0

    def add(self, rounds: int, evaluations: int) -> None:
        self.rounds += rounds
        self.evaluations += evaluations


def _screen(quick: Predicate, grid: np.ndarray, candidates: int, rtol: float,
            tally: _Tally) -> tuple[dict[str, Bracket], list[str]]:
    """Stage 1: the coarse grid with short runs, then bisection down to 1% brackets (or ``rtol`` if wider)."""
    brackets, notes = _alpha_edges(grid, quick(grid))
    tally.add(1, grid.size)
    if not brackets:
        return brackets, notes
    screened, rounds, evaluations = log_bisect(quick, list(brackets.values()), candidates=candidates, rtol=max(rtol, 1e-2))
    tally.add(rounds, evaluations)
    return dict(zip(brackets, screened)), notes


def _verify(full: Predicate, brackets: dict[str, Bracket], grid: np.ndarray, candidates: int, rtol: float,
            tally: _Tally, notes: list[str]) -> dict[str, Bracket]:
    """Stage 2: check the screened brackets with full-length runs, narrowing them in the same call.

    Each bracket is widened by 0.5% on both sides; its ends and as many points
    inside as reach ``rtol`` in this one round (at most ``candidates``) run for
    the full length. A bracket whose ends disagree with the screening (slow
    transients can fool short runs) is replaced by one from the coarse grid
    rescanned at full length, and ``notes`` says so.
    """
    widened = {name: b.widened(1.005) for name, b in brackets.items()}
    span = max(np.log(b.hi / b.lo) for b in widened.values())
    inside = int(min(candidates, max(1, np.ceil(span / np.log1p(rtol)) - 1)))
    points = {name: np.geomspace(b.lo, b.hi, inside + 2) for name, b in widened.items()}
    oks = np.split(full(np.concatenate(list(points.values()))), len(points))
    tally.add(1, sum(p.size for p in points.values()))
    verified, misjudged = {}, []
    for (name, b), pts, ok in zip(widened.items(), points.values(), oks):
        if ok[0] == b.ok_lo and ok[-1] != b.ok_lo:
            verified[name] = narrow(b, pts, ok)
        else:
            misjudged.append(name)
    if misjudged:
        notes.append("screening runs disagreed with full runs for alpha_" + "/alpha_".join(misjudged)
                     + "; rescanned at full length")
        rescanned, more_notes = _alpha_edges(grid, full(grid))
        tally.add(1, grid.size)
        verified.update({name: rescanned[name] for name in misjudged if name in rescanned})
        notes.extend(n for n in more_notes if n not in notes)
    return {name: verified[name] for name in brackets if name in verified}


def _refine(full: Predicate, brackets: dict[str, Bracket], candidates: int, rtol: float,
            tally: _Tally) -> dict[str, Bracket]:
    """Stage 3: full-length bisection until every bracket is narrower than ``rtol``."""
    refined, rounds, evaluations = log_bisect(full, list(brackets.values()), candidates=candidates, rtol=rtol)
    tally.add(rounds, evaluations)
    return dict(zip(brackets, refined))
