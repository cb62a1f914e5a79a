"""Step-size controllers: how :func:`jaxcfl.pde.solve` picks each step's ``dt_n`` (cf. diffrax's
``stepsize_controller``).

A controller is a frozen, hashable value (static under ``jit``) with four methods, which the
integrator calls the same way whatever the controller; it never asks which one it has:

==============================================  =========================================================
``init(state, grad_fn, hyper) -> State``        ready a state before the first step
``refresh(state, grad_fn, hyper, iteration,``   before the step at ``iteration``: update what the
``each) -> State``                              controller knows (``each`` maps a one-copy function over
                                                the copies of a paired run: ``jax.vmap`` or the identity)
``step_size(state, hyper, limit)``              ``(dt_n, state)``: the step to take, and the state that
``-> (Array, State)``                           records it; ``limit(mu)`` is the scheme's stability
                                                limit ``S`` on ``h l`` (:class:`~jaxcfl.pde.Scheme`)
``with_schedule(schedule) -> controller``       the same controller with another
                                                :class:`GuardSchedule` (a constant step ignores it)
==============================================  =========================================================

and a class attribute ``adaptive``: whether it keeps state (``curvature``, ``direction``,
``step_size`` of :class:`~jaxcfl.pde.State`, recorded in the diagnostics).

* :class:`ConstantStep`: ``dt_n = dt`` (``hyper.lr``), every scheme's default.
* :class:`CFLController`: the CFL guard on the PDE, ``dt_n = min(dt, safety S / lambda_n)``
  with ``lambda_n`` the top eigenvalue of the Jacobian of ``G`` at ``K^n``, re-estimated on a
  :class:`GuardSchedule`; ``safety`` is the traced ``hyper.safety``. The ``guarded_gd``
  scheme is forward Euler (eq 21) under it. It limits ``dt`` itself, so it serves the
  schemes whose gradient step is ``dt`` (``Scheme.dt_power == 1``, ``h(dt) = dt``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp
from jax import Array, lax

from jaxcfl._core import validate as v
from jaxcfl._core.spectral import lanczos_eigh
from jaxcfl._core.stability import guarded_step_size
from jaxcfl.pde._problem import Hyper
from jaxcfl.pde._state import State

__all__ = ["StepSizeController", "ConstantStep", "CFLController", "GuardSchedule", "estimate_curvature",
    "start_guard", "check_controller"]

GradFn = Callable[[Array, Hyper], Array]


class StepSizeController(Protocol):
    """What :func:`jaxcfl.pde.solve` asks of a step-size controller (module docstring)."""

    adaptive: ClassVar[bool]

    def init(self, state: State, grad_fn: GradFn, hyper: Hyper) -> State: ...

    def refresh(self, state: State, grad_fn: GradFn, hyper: Hyper, iteration: Array,
                each: Callable[[Callable], Callable]) -> State: ...

    def step_size(self, state: State, hyper: Hyper, limit: Callable[[Any], Any]) -> tuple[Array, State]: ...

    def with_schedule(self, schedule: GuardSchedule) -> StepSizeController: ...


@dataclasses.dataclass(frozen=True)
class GuardSchedule:
    """How the CFL guard estimates ``lambda_n`` (static: part of the compiled program).

    Attributes:
      every: refresh the estimate before every iteration ``n`` with ``n % every == 0``.
      warmup: and before every iteration ``n < warmup``. A run's first iterations are where
        its curvature changes fastest (from a random kernel, the nonlinearity leaves
        saturation), and where a stale estimate lets unstable steps through.
      iterations: Lanczos iterations of a refresh, warm-started from the previous top
        eigenvector (at most ``w^2``).
      first_iterations: Lanczos iterations of the first estimate, from a random direction.
    """

    every: int = 10
    warmup: int = 20
    iterations: int = 4
    first_iterations: int = 30

    def __post_init__(self) -> None:
        for name in ("every", "iterations", "first_iterations"):
            object.__setattr__(self, name, v.check_int(name, getattr(self, name), minimum=1))
        object.__setattr__(self, "warmup", v.check_int("warmup", self.warmup, minimum=0))

    def due(self, iteration: Array) -> Array:
        """Whether ``lambda`` is refreshed before iteration ``iteration``."""
        return (iteration < self.warmup) | (iteration % self.every == 0)


def estimate_curvature(state: State, grad_fn: GradFn, hyper: Hyper, *, iterations: int) -> State:
    """``lambda_n``: the top eigenvalue of the Jacobian of ``G`` at ``K^n``, into ``state.curvature``.

    The Jacobian of the gradient is the local operator of the PDE (for the linearised
    models, ``L + alpha`` of eq 22 and :mod:`jaxcfl.theory`; for the nonlinear model, the
    Hessian of the loss of eq 2). It is applied matrix-free by ``jax.jvp`` of ``G``, and its top
    eigenpair comes from the Lanczos recurrence of :mod:`jaxcfl.spectral` (the one behind
    :mod:`jaxcfl.theory`), warm-started from ``state.direction``. The estimate is the top Ritz
    value plus its residual bound, which errs towards a larger ``lambda``, a smaller step.
    """
    kernel = state.kernel

    def matvec(vec):
        _, tangent = jax.jvp(lambda k: grad_fn(k, hyper), (kernel,), (vec.reshape(kernel.shape).astype(kernel.dtype),))
        return tangent.reshape(-1)

    key = jax.random.fold_in(jax.random.key(0), state.iteration)
    pairs = lanczos_eigh(matvec, state.direction, key, iterations=min(iterations, kernel.size), k=1)
    curvature = (pairs.values[0] + pairs.residuals[0]).astype(kernel.dtype)
    direction = pairs.vectors[0].astype(kernel.dtype)
    # Fail closed: an estimate that is not finite (a diverged kernel) keeps the last finite one and its
    # direction in force, so the step stays capped and the next refresh starts from a usable vector.
    finite = jnp.isfinite(curvature) & jnp.all(jnp.isfinite(direction))
    if state.curvature is not None and state.direction is not None:
        curvature = jnp.where(finite, curvature, state.curvature)
        direction = jnp.where(finite, direction, state.direction)
    return dataclasses.replace(state, curvature=curvature, direction=direction)


def start_guard(state: State, grad_fn: GradFn, hyper: Hyper, schedule: GuardSchedule) -> State:
    """A state ready for the CFL guard: kept as is if it carries a guard, else with a first
    estimate of ``lambda`` at its kernel (``schedule.first_iterations`` Lanczos iterations from
    a fixed random direction). Static branch: whether ``state.direction`` is ``None``."""
    if state.direction is not None:
        return state
    kernel = state.kernel
    nan = jnp.full((), jnp.nan, kernel.dtype)
    direction = jax.random.normal(jax.random.key(1), (kernel.size,), kernel.dtype)
    state = dataclasses.replace(state, curvature=nan, direction=direction, step_size=nan)
    return estimate_curvature(state, grad_fn, hyper, iterations=schedule.first_iterations)


@dataclasses.dataclass(frozen=True)
class ConstantStep:
    """``dt_n = dt`` (``hyper.lr``) at every step: no state, nothing to refresh."""

    adaptive: ClassVar[bool] = False

    def init(self, state: State, grad_fn: GradFn, hyper: Hyper) -> State:
        """``state`` without a guard's fields (a guarded run continued under a constant step)."""
        if state.direction is None:
            return state
        return dataclasses.replace(state, curvature=None, direction=None, step_size=None)

    def refresh(self, state: State, grad_fn: GradFn, hyper: Hyper, iteration: Array, each=lambda fn: fn) -> State:
        return state

    def step_size(self, state: State, hyper: Hyper, limit: Callable[[Any], Any]) -> tuple[Array, State]:
        return hyper.lr, state

    def with_schedule(self, schedule: GuardSchedule) -> ConstantStep:
        return self


@dataclasses.dataclass(frozen=True)
class CFLController:
    """The CFL guard on the PDE: ``dt_n = min(dt, safety S(mu) / lambda_n)``.

    ``lambda_n`` is the top eigenvalue of the Jacobian of ``G`` at ``K^n``
    (:func:`estimate_curvature`), first estimated by :meth:`init` and refreshed before the
    iterations that ``schedule.due`` names; ``S`` is the scheme's stability limit (2 for forward
    Euler, so that ``dt_n lambda_n <= 2 safety``) and ``safety = hyper.safety`` in ``(0, 1]``
    (traced: one compiled program serves every margin). Every mode with eigenvalue
    ``0 < l <= lambda_n`` is stable at ``dt_n``; a step already inside the limit is ``dt``
    itself, bit for bit.

    The refresh is a ``lax.cond`` on the iteration count, which is the same for every
    configuration of a batch, so under ``jax.vmap`` it stays a branch: the steps between
    refreshes cost what an unguarded step costs.
    """

    schedule: GuardSchedule = GuardSchedule()
    adaptive: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, GuardSchedule):
            raise TypeError(f"schedule must be a jaxcfl.GuardSchedule, got {type(self.schedule).__name__}")

    def init(self, state: State, grad_fn: GradFn, hyper: Hyper) -> State:
        return start_guard(state, grad_fn, hyper, self.schedule)

    def refresh(self, state: State, grad_fn: GradFn, hyper: Hyper, iteration: Array, each=lambda fn: fn) -> State:
        one = lambda st, hyp: estimate_curvature(st, grad_fn, hyp, iterations=self.schedule.iterations)
        return lax.cond(self.schedule.due(iteration), lambda st: each(one)(st, hyper), lambda st: st, state)

    def step_size(self, state: State, hyper: Hyper, limit: Callable[[Any], Any]) -> tuple[Array, State]:
        dt = guarded_step_size(hyper.lr, state.curvature, hyper.safety * limit(hyper.mu))
        return dt, dataclasses.replace(state, step_size=dt)

    def with_schedule(self, schedule: GuardSchedule) -> CFLController:
        return CFLController(schedule)


def check_controller(controller: object) -> StepSizeController:
    """``controller`` itself if it has the methods of a :class:`StepSizeController`; else a ``TypeError``."""
    needed = ("init", "refresh", "step_size", "with_schedule")
    missing = [m for m in needed if not callable(getattr(controller, m, None))]
    if missing or not isinstance(getattr(controller, "adaptive", None), bool):
        raise TypeError(f"controller must be a step-size controller (jaxcfl.pde.ConstantStep, jaxcfl.pde.CFLController, "
                        f"or a value with init, refresh, step_size, with_schedule and a bool adaptive), "
                        f"got {type(controller).__name__} {controller!r:.60}")
    try:
        hash(controller)
    except TypeError:
        raise TypeError(f"controller must be hashable (a frozen value: it is part of the compiled program), "
                        f"got {type(controller).__name__}") from None
    return controller  # type: ignore[return-value]
