"""Vectorised bracketing and bisection in log space, for any "where does it stop being stable" question.

The search knows nothing of what it searches: a predicate ``evaluate(points) ->
bools`` runs many candidates in one vectorised call. It serves the weight-decay
bounds of the one-layer CNN (:mod:`jaxcfl.pde._bounds`) and the largest stable
learning rate of a network (:func:`jaxcfl.max_stable_lr`). It imports no other
part of jaxcfl but the input checks.

* :class:`Bracket`: an interval ``lo < hi`` whose ends disagree.
* :func:`edge_brackets`: the brackets around the lower and upper edges of the
  ``ok`` points of a scanned grid.
* :func:`narrow`: given the verdicts at points across a bracket, the
  sub-interval holding the transition next to the ``ok`` side.
* :func:`log_bisect`: :func:`narrow` in rounds until every bracket is narrower
  than ``rtol``, all brackets evaluated together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from jaxcfl._core import validate as v

__all__ = ["Bracket", "narrow", "edge_brackets", "log_bisect"]
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

    def widened(self, factor: float) -> "Bracket":
        """``(lo / factor, hi * factor)``, the same orientation."""
        return Bracket(self.lo / factor, self.hi * factor, self.ok_lo)


def narrow(bracket: Bracket, points: np.ndarray, ok: np.ndarray) -> Bracket:
    """The sub-bracket of ``bracket`` holding its transition, from verdicts ``ok`` at ``points``.

    ``points`` are increasing and may include the ends (their verdicts then
    override the bracket's own). Should the predicate flip more than once, the
    transition next to the ``ok`` side is kept: the first change when ``ok`` is
    on the left, the last when it is on the right (the edge of the contiguous
    ``ok`` region that starts at that end).
    """
    points = np.asarray(points, float)
    ok = np.asarray(ok, bool)
    grid, flags = points, ok
    if points[0] > bracket.lo:
        grid, flags = np.concatenate([[bracket.lo], grid]), np.concatenate([[bracket.ok_lo], flags])
    if points[-1] < bracket.hi:
        grid, flags = np.concatenate([grid, [bracket.hi]]), np.concatenate([flags, [not bracket.ok_lo]])
    changes = np.flatnonzero(flags[1:] != flags[:-1])
    i = changes[0] if bracket.ok_lo else changes[-1]
    return Bracket(float(grid[i]), float(grid[i + 1]), bracket.ok_lo)


def edge_brackets(grid: np.ndarray, ok: np.ndarray) -> tuple[Bracket | None, Bracket | None, list[str]]:
    """Brackets around the lower and the upper edge of the ``ok`` points of an increasing ``grid``.

    Returns ``(lower, upper, findings)``; an edge is ``None`` when the ``ok``
    points reach that end of the grid (the edge lies outside) or there are none.
    ``findings`` names each such case, and a set of ``ok`` points that is not
    contiguous (the brackets then enclose its outermost points), in words
    that use ``"lower end"``/``"upper end"`` of the grid.
    """
    grid = np.asarray(grid, float)
    ok = np.asarray(ok, bool)
    findings: list[str] = []
    if not ok.any():
        return None, None, [f"none of {grid.size} points in [{grid[0]:g}, {grid[-1]:g}] is ok"]
    idx = np.flatnonzero(ok)
    first, last = idx[0], idx[-1]
    if not ok[first:last + 1].all():
        findings.append("not an interval")
    lower = upper = None
    if first == 0:
        findings.append("ok at the lower end")
    else:
        lower = Bracket(float(grid[first - 1]), float(grid[first]), ok_lo=False)
    if last == grid.size - 1:
        findings.append("ok at the upper end")
    else:
        upper = Bracket(float(grid[last]), float(grid[last + 1]), ok_lo=True)
    return lower, upper, findings


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
    per point: the predicate, e.g. "stable") and :func:`narrow` s each bracket.
    Each round divides a bracket's log-width by ``candidates + 1``.

    Returns:
      The refined brackets (in order), the number of rounds and of evaluations.

    Example:
      >>> from jaxcfl._core.search import Bracket, log_bisect
      >>> (b,), rounds, n = log_bisect(lambda x: x < 2.0, [Bracket(1.0, 10.0, ok_lo=True)], rtol=1e-6)
      >>> abs(b.boundary / 2.0 - 1) < 1e-6, rounds
      (True, 6)
    """
    v.check_int("candidates", candidates, minimum=1)
    v.check_positive("rtol", rtol)
    brackets = [dataclasses.replace(b) for b in brackets]
    rounds = evaluations = 0
    while rounds < max_rounds:
        active = [i for i, b in enumerate(brackets) if b.width > rtol]
        if not active:
            break
        points = [np.geomspace(brackets[i].lo, brackets[i].hi, candidates + 2)[1:-1] for i in active]
        oks = np.asarray(evaluate(np.concatenate(points)), bool)
        evaluations += oks.size
        rounds += 1
        for i, pts, ok in zip(active, points, np.split(oks, len(active))):
            brackets[i] = narrow(brackets[i], pts, ok)
    return brackets, rounds, evaluations
