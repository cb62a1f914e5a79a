"""Stable, restrained or divergent: the classification rule of a run (paper-notes section 3).

The words of the paper:

* **stable**: the perturbation between two runs, and the iterates' deviation from
  their limit, decay or stay at rounding level;
* **divergent**: the iterates grow without bound or become non-finite;
* **restrained instability**: neither: the iterates stay bounded while the loss
  oscillates and a last-bit perturbation is amplified to order one.

The rule, applied to the diagnostics of a run (the same for every scheme and
model). ``u_n = ||K^n - K^{n-1}||`` is the *deviation* measure: for a linear
model it obeys exactly the homogeneous scheme (the forcing cancels), so its
growth rate is the log of the spectral radius the theory predicts.

1. ``g`` is the least-squares slope of ``log u_n`` against ``n`` over the second
   half of the run, with standard error ``se``. A slope is *significant* when
   ``|g| > z * se`` (``z = rule.z``, default 4).
2. ``u`` is *at rounding level* when ``u_end <= rounding * eps * ||K_end||``.
3. **divergent** if any iterate is non-finite, or ``g`` is significantly
   positive (and ``g > min_rate``) while ``u`` is above rounding level.
4. **stable** if ``u`` is at rounding level or ``g`` is significantly negative,
   and, when a perturbed copy was run (``compare_k``), the tail-averaged
   divergence is at most ``rule.divergence``.
5. **restrained** otherwise: bounded, neither settling nor blowing up, or a
   last-bit perturbation amplified beyond ``rule.divergence``.

The rule needs a run long enough to fit a slope: at least :data:`MIN_STEPS`
iterations (so that the second half holds at least 6 records even at stride 1).
Shorter runs leave most statuses at "restrained" for want of evidence:
:func:`jaxcfl.sweep` warns, and :func:`jaxcfl.empirical_bounds` refuses them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["STATUSES", "MIN_STEPS", "Rule", "classify"]

STABLE, RESTRAINED, DIVERGENT = "stable", "restrained", "divergent"
STATUSES = (STABLE, RESTRAINED, DIVERGENT)
MIN_STEPS = 12
"""The fewest iterations from which the rule's classification means something (module docstring)."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """Thresholds of the classification rule (see the module docstring)."""

    z: float = 4.0
    min_rate: float = 1e-7
    rounding: float = 64.0
    divergence: float = 1e-3

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def classify(
    finite: np.ndarray,
    growth_rate: np.ndarray,
    growth_stderr: np.ndarray,
    at_rounding: np.ndarray,
    divergence: np.ndarray | None = None,
    rule: Rule = Rule(),
) -> np.ndarray:
    """Apply the rule elementwise; returns an array of status strings."""
    finite = np.asarray(finite, bool)
    g = np.asarray(growth_rate, np.float64)
    se = np.asarray(growth_stderr, np.float64)
    at_rounding = np.asarray(at_rounding, bool)
    with np.errstate(invalid="ignore"):
        growing = np.isfinite(g) & (g > rule.z * se) & (g > rule.min_rate)
        decaying = np.isfinite(g) & (g < -rule.z * se)
    divergent = ~finite | (growing & ~at_rounding)
    settled = at_rounding | decaying
    if divergence is not None:
        with np.errstate(invalid="ignore"):
            settled &= np.asarray(divergence, np.float64) <= rule.divergence
    status = np.full(finite.shape, RESTRAINED, dtype="<U10")
    status[settled] = STABLE
    status[divergent] = DIVERGENT
    return status
