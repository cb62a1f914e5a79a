"""Linear-stability facts shared by the PDE schemes and the optax guard.

The stability region of one step of gradient descent on a quadratic mode of curvature ``l``
is an interval ``0 < lr l < S``. The limits ``S`` below are the ones that both the PDE's
schemes (:mod:`jaxcfl.pde`, eqs 21 and 37-38) and the network side's guard
(:func:`jaxcfl.cfl_guard`, :mod:`jaxcfl.limits`) need; they sit here, at the bottom of the
import graph, so that neither side imports the other for them.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike

__all__ = ["euler_limit", "nesterov_limit", "heavy_ball_limit", "momentum_limit", "guarded_step_size"]


def euler_limit(momentum: ArrayLike = 0.0) -> ArrayLike:
    """Forward Euler (eq 21): ``lr l < 2`` whatever the momentum argument (kept for one signature)."""
    del momentum
    return 2.0


def nesterov_limit(momentum: ArrayLike) -> ArrayLike:
    """Semi-implicit Nesterov (eqs 37-38): ``h l < 2 (1 + mu) / (1 + 2 mu)``."""
    return 2.0 * (1.0 + momentum) / (1.0 + 2.0 * momentum)


def heavy_ball_limit(momentum: ArrayLike) -> ArrayLike:
    """Heavy ball: ``lr l < 2 (1 + mu)``; the characteristic polynomial
    ``z^2 - (1 + mu - x) z + mu`` (``x = lr l``) reaches the root ``-1`` at ``x = 2 (1 + mu)``."""
    return 2.0 * (1.0 + momentum)


def momentum_limit(momentum: ArrayLike = 0.0, nesterov: bool = False) -> ArrayLike:
    """The exact upper limit ``S`` on ``lr l`` for SGD on a quadratic mode of curvature ``l``.

    SGD with momentum ``mu`` in the PyTorch convention (``buf = mu buf + d``; the step is
    ``lr buf``, or ``lr (d + mu buf)`` with Nesterov, as :func:`jaxcfl.perturbed_sgd`) is
    stable iff ``0 < lr l < S``:

    * ``mu = 0``: ``S = 2``, forward Euler (eq 21), the ``gd`` scheme's limit;
    * heavy ball: ``S = 2 (1 + mu)``;
    * Nesterov: ``S = 2 (1 + mu) / (1 + 2 mu)``, the ``nesterov`` scheme's limit (eqs 37-38)
      with ``h = lr``: both have the polynomial ``z^2 - (1 + mu)(1 - x) z + mu (1 - x)``.

    ``momentum`` may be traced (a JAX array); the result then is one.
    """
    return nesterov_limit(momentum) if nesterov else heavy_ball_limit(momentum)


def guarded_step_size(step: ArrayLike, curvature: ArrayLike, limit: ArrayLike) -> Array:
    """``min(step, limit / curvature)``: the largest step inside the stability limit ``limit``.

    A ``curvature`` that is not a finite positive number leaves ``step`` unchanged (no mode
    to keep stable, or nothing known). Shared by the PDE's guard and :func:`jaxcfl.cfl_guard`;
    every argument may be traced.
    """
    step = jnp.asarray(step)
    lam = jnp.asarray(curvature, step.dtype)
    known = jnp.isfinite(lam) & (lam > 0)
    return jnp.where(known, jnp.minimum(step, jnp.asarray(limit, step.dtype) / jnp.where(known, lam, 1)), step)
