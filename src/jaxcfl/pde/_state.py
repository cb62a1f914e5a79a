"""The iterate of a scheme: :class:`State` (and :func:`init`, the state at rest).

It sits below the schemes (:mod:`jaxcfl.pde._schemes`) and the step-size controllers
(:mod:`jaxcfl.pde._controllers`), which both read and write it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike

__all__ = ["State", "init"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class State:
    """Iterate of a scheme: ``kernel = K^n``, ``previous = K^{n-1}``, ``iteration = n``.

    A step-size controller that adapts the step (the CFL guard,
    :class:`~jaxcfl.pde.CFLController`, of the ``guarded_gd`` scheme) also keeps
    its state here: ``curvature``, the estimate ``lambda_n`` of the top eigenvalue of the
    Jacobian of ``G`` (``nan`` before the first); ``direction``, the flat top-eigenvector
    estimate (the warm start of the next refresh); ``step_size``, the ``dt_n`` of the last step.
    Under a constant step (:class:`~jaxcfl.pde.ConstantStep`) they are ``None``.
    """

    kernel: Array
    previous: Array
    iteration: Array
    curvature: Array | None = None
    direction: Array | None = None
    step_size: Array | None = None


def init(kernel: ArrayLike) -> State:
    """Initial state at rest: ``K^{-1} = K^0`` (zero initial velocity for Nesterov)."""
    kernel = jnp.asarray(kernel)
    return State(kernel=kernel, previous=kernel, iteration=jnp.zeros((), jnp.int32))
