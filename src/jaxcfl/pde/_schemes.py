"""Time-stepping schemes for the gradient PDE ``dK/dt = -G(K)``.

Each scheme is a :class:`Scheme` value around a pure ``step(state, grad_fn, hyper, dt) -> state``
function over a :class:`State` pytree, with ``grad_fn(kernel, hyper) -> G`` and ``dt`` the step
its step-size controller chose (:mod:`jaxcfl.pde._controllers`). The update enters
through the rounding primitive :func:`jaxcfl.scaled_update`, so the
perturbation factor ``hyper.k`` applies ``fl(h k) * fl(G / k)`` to the step
``h`` of each scheme (``k = 1``: the plain scheme).

==========  ===========================================================  ===============================
scheme      update                                                       linear stability (eigenvalue l)
==========  ===========================================================  ===============================
``gd``      eq 21, forward Euler: ``K+ = K - fl(dt k) fl(G(K)/k)``       ``0 < dt l < 2``
``nesterov`` eqs 37-38: ``V = K + mu (K - K-)``,                          ``0 < h l < 2(1+mu)/(1+2 mu)``
            ``K+ = V - fl(h k) fl(G(V)/k)``, ``h = (1+mu) dt^2 / 2``
``guarded_gd`` eq 21 with ``dt_n = min(dt, safety 2 / lambda_n)``: forward    stable for every ``l <= lambda_n``
            Euler under the CFL controller (:class:`~jaxcfl.pde.CFLController`)
==========  ===========================================================  ===============================

Forward Euler is explicit and first order. The Nesterov scheme is the
semi-implicit (look-ahead) discretisation of the damped momentum PDE
``K_tt + d K_t = -G(K)`` (eq 36); it is second order in ``dt`` for the PDE.
Its damping is ``d = 2(1 - mu)/((1 + mu) dt)`` so that ``mu = (2 - d dt)/(2 + d dt)``
and ``h = 2 dt^2/(2 + d dt) = (1 + mu) dt^2 / 2`` (eq 38). The stability
intervals are those of one eigen-mode ``l`` of a linear ``G``; see
:mod:`jaxcfl.theory`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike

from jaxcfl._core import validate as v
from jaxcfl._core.rounding import rounded_mul, scaled_update
from jaxcfl._core.stability import euler_limit, nesterov_limit
from jaxcfl.pde._controllers import (
    CFLController,
    ConstantStep,
    GuardSchedule,
    StepSizeController,
    check_controller,
    estimate_curvature,
    start_guard,
)
from jaxcfl.pde._problem import Hyper
from jaxcfl.pde._state import State, init

__all__ = ["SCHEMES", "State", "init", "nesterov_step_size", "nesterov_damping", "euler_step",
    "nesterov_step", "GuardSchedule", "estimate_curvature", "start_guard", "guarded_euler_step", "Scheme",
    "canonical_scheme", "get_scheme", "GD", "NESTEROV", "GUARDED_GD"]

GradFn = Callable[[Array, Hyper], Array]

SCHEMES = ("gd", "nesterov", "guarded_gd")
_ALIASES = {"gd": "gd", "euler": "gd", "forward_euler": "gd", "nesterov": "nesterov", "guarded_gd": "guarded_gd"}


def nesterov_step_size(dt: ArrayLike, mu: ArrayLike) -> Array:
    """``h = 2 dt^2/(2 + d dt) = (1 + mu) dt^2 / 2``: the gradient step of eq 38."""
    dt = jnp.asarray(dt)
    return (1.0 + mu) * (dt * dt) * 0.5


def nesterov_damping(dt: ArrayLike, mu: ArrayLike) -> Array:
    """``d = 2 (1 - mu) / ((1 + mu) dt)``, the damping of eq 36 that gives momentum ``mu``."""
    return 2.0 * (1.0 - jnp.asarray(mu)) / ((1.0 + jnp.asarray(mu)) * jnp.asarray(dt))


def euler_step(state: State, grad_fn: GradFn, hyper: Hyper, dt: ArrayLike | None = None) -> State:
    """Forward Euler, eq 21: ``K^{n+1} = K^n - fl(dt k) fl(G(K^n) / k)``.

    ``dt`` is the step a controller chose (:mod:`jaxcfl.pde._controllers`); ``None``: ``hyper.lr``.
    The controller's fields of ``state`` are carried over.
    """
    dt = hyper.lr if dt is None else dt
    g = grad_fn(state.kernel, hyper)
    new = state.kernel - scaled_update(dt, g, hyper.k)
    return dataclasses.replace(state, kernel=new, previous=state.kernel, iteration=state.iteration + 1)


def nesterov_step(state: State, grad_fn: GradFn, hyper: Hyper, dt: ArrayLike | None = None) -> State:
    """Semi-implicit Nesterov, eqs 37-38.

    ``V = K^n + mu (K^n - K^{n-1})`` then ``K^{n+1} = V - fl(h k) fl(G(V) / k)``
    with ``h = (1 + mu) dt^2 / 2``; ``dt`` as in :func:`euler_step`.
    """
    dt = hyper.lr if dt is None else dt
    kernel = state.kernel
    lookahead = kernel + rounded_mul(hyper.mu, kernel - state.previous)
    g = grad_fn(lookahead, hyper)
    h = nesterov_step_size(dt, hyper.mu)
    new = lookahead - scaled_update(h, g, hyper.k)
    return dataclasses.replace(state, kernel=new, previous=kernel, iteration=state.iteration + 1)


# --- the CFL guard on the PDE (appendix A; docs/cfl_guard.md) ----------------------------------

def guarded_euler_step(state: State, grad_fn: GradFn, hyper: Hyper) -> State:
    """Forward Euler (eq 21) under the CFL guard: ``K^{n+1} = K^n - fl(dt_n k) fl(G(K^n) / k)``,
    ``dt_n = min(dt, safety 2 / lambda_n)``, ``lambda_n = state.curvature`` (:func:`estimate_curvature`).

    One step of the ``guarded_gd`` scheme: :func:`euler_step` at the step of
    :class:`~jaxcfl.pde.CFLController` (which also refreshes ``lambda_n`` inside
    :func:`jaxcfl.pde.solve`). Every mode of the Jacobian with eigenvalue ``0 < l <= lambda_n``
    is stable at this step (``dt_n l <= 2 safety < 2``). A step inside the limit
    (``dt lambda_n <= 2 safety``) is bit-identical to :func:`euler_step`.
    """
    dt, state = CFLController().step_size(state, hyper, euler_limit)
    return euler_step(state, grad_fn, hyper, dt)


# --- what the theory needs to know of each scheme (host float64 arithmetic) ------------------

def _euler_h(lr: float, mu: float) -> float:
    return float(lr)


def _nesterov_h(lr: float, mu: float) -> float:
    return (1.0 + mu) * float(lr) ** 2 / 2.0


def _euler_factor(x: np.ndarray, mu: float) -> np.ndarray:
    return np.abs(x)


def _nesterov_factor(x: np.ndarray, mu: float) -> np.ndarray:
    """Spectral radius of the companion matrix ``[[x(1+mu), -x mu], [1, 0]]``."""
    p = x * (1.0 + mu)
    q = x * mu
    disc = np.sqrt((p * p - 4.0 * q).astype(np.complex128))
    return np.maximum(np.abs((p + disc) / 2.0), np.abs((p - disc) / 2.0))


@dataclasses.dataclass(frozen=True)
class Scheme:
    """A scheme as a value: its step, its step-size controller, and the facts of its linear
    stability that :mod:`jaxcfl.theory` uses.

    A mode of eigenvalue ``l`` of a linear ``G`` is multiplied by
    ``factor(1 - h l, mu)`` per step (its spectral radius), ``h = step_size(dt, mu)``,
    and is stable iff ``0 < h l < limit(mu)``. ``h`` is homogeneous of degree
    ``dt_power`` in ``dt`` (1: forward Euler, ``h = dt``; 2: Nesterov,
    ``h = (1 + mu) dt^2 / 2``), which turns a limit on ``h`` into one on ``dt``
    (:meth:`dt_limit`). The integrator, the sweeps, the bounds and the theory take every
    fact from here and none asks for a scheme by name, so a new scheme is one ``Scheme``
    value, passed wherever a scheme's name is accepted (:func:`jaxcfl.sweep`,
    :func:`jaxcfl.integrate`, :class:`jaxcfl.Setup`, :mod:`jaxcfl.theory`). Adding it to
    ``_SCHEMES`` (and its name to :data:`SCHEMES`) gives it a name for the command line.
    ``str(scheme)`` is its name, the one a manifest records.

    Attributes:
      name: its canonical name.
      step: ``step(state, grad_fn, hyper, dt) -> state``, one step of size ``dt`` (the
        controller's choice; ``hyper.lr`` under a constant step).
      step_size: ``h(dt, mu)``, the gradient step (host floats).
      limit: ``S(mu)``, the stability limit on ``h l`` (host floats and traced arrays alike).
      factor: ``factor(x, mu)``, the per-step growth of a mode with ``x = 1 - h l``.
      uses_momentum: whether ``mu`` enters the scheme.
      dt_power: the degree of ``h`` in ``dt``.
      controller: its step-size controller (:mod:`jaxcfl.pde._controllers`): a
        :class:`~jaxcfl.pde.ConstantStep`, or the CFL guard :class:`~jaxcfl.pde.CFLController`
        (``guarded_gd``: forward Euler under it), which needs ``h(dt) = dt``. The linear
        theory of a scheme is that of its nominal step ``dt``.
    """

    name: str
    step: Callable[[State, GradFn, Hyper, Any], State] = dataclasses.field(repr=False)
    step_size: Callable[[float, float], float] = dataclasses.field(repr=False)
    limit: Callable[[Any], Any] = dataclasses.field(repr=False)
    factor: Callable[[np.ndarray, float], np.ndarray] = dataclasses.field(repr=False)
    _: dataclasses.KW_ONLY
    uses_momentum: bool
    dt_power: int = 1
    controller: StepSizeController = ConstantStep()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"Scheme name must be a non-empty string, got {self.name!r:.60}")
        for field in ("step", "step_size", "limit", "factor"):
            if not callable(getattr(self, field)):
                raise TypeError(f"Scheme {field} must be callable, got {type(getattr(self, field)).__name__}")
        if not isinstance(self.uses_momentum, bool):
            raise TypeError(f"Scheme uses_momentum must be a bool, got {self.uses_momentum!r:.60}")
        object.__setattr__(self, "dt_power", v.check_int("dt_power", self.dt_power, minimum=1))
        check_controller(self.controller)
        if self.controller.adaptive and (self.dt_power != 1 or any(self.step_size(1.0, m) != 1.0 for m in (0.0, 0.5))):
            raise ValueError(f"scheme {self.name!r}: the CFL controller limits dt itself, so it needs a scheme whose "
                             f"gradient step is dt (dt_power 1, step_size(dt, mu) = dt)")

    def __str__(self) -> str:
        return self.name

    @property
    def guarded(self) -> bool:
        """Whether its controller adapts the step (the CFL guard: ``guarded_gd``)."""
        return self.controller.adaptive

    def dt_limit(self, eigenvalue: float, momentum: float) -> float:
        """The largest stable ``dt`` for a mode of eigenvalue ``eigenvalue > 0``: the root of
        ``step_size(dt, mu) eigenvalue = limit(mu)``, ``(S / (h(1, mu) l))^(1 / dt_power)``."""
        return (self.limit(momentum) / (self.step_size(1.0, momentum) * float(eigenvalue))) ** (1.0 / self.dt_power)


GD = Scheme("gd", euler_step, _euler_h, euler_limit, _euler_factor, uses_momentum=False)
NESTEROV = Scheme("nesterov", nesterov_step, _nesterov_h, nesterov_limit, _nesterov_factor, uses_momentum=True,
                  dt_power=2)
# Forward Euler under the CFL guard. Its linear theory is forward Euler's at the nominal dt: the
# guard lowers dt only where that theory says the step is unstable (dt lambda_max > 2 safety).
GUARDED_GD = dataclasses.replace(GD, name="guarded_gd", controller=CFLController())
_SCHEMES = {s.name: s for s in (GD, NESTEROV, GUARDED_GD)}


def canonical_scheme(name: str | Scheme) -> str:
    """The canonical name of a scheme: ``"gd"`` (aliases ``"euler"``, ``"forward_euler"``),
    ``"nesterov"`` or ``"guarded_gd"``; a :class:`Scheme`'s own name."""
    if isinstance(name, Scheme):
        return name.name
    if not isinstance(name, str) or name not in _ALIASES:
        v.check_choice("scheme", name, SCHEMES)
    return _ALIASES[name]


def get_scheme(scheme: str | Scheme) -> Scheme:
    """The :class:`Scheme` that ``scheme`` names (one of :data:`SCHEMES` or an alias), or
    ``scheme`` itself if it is one: where a name is parsed, once, at a public entry point."""
    if isinstance(scheme, Scheme):
        return scheme
    return _SCHEMES[canonical_scheme(scheme)]
