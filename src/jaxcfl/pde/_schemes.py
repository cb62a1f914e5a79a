"""Time-stepping schemes for the gradient PDE ``dK/dt = -G(K)``.

Both schemes are pure ``step(state, grad_fn, hyper) -> state`` functions over a
:class:`State` pytree, with ``grad_fn(kernel, hyper) -> G``. The update enters
through the rounding primitive :func:`jaxcfl._core.rounding.scaled_update`, so the
perturbation factor ``hyper.k`` applies ``fl(h k) * fl(G / k)`` to the step
``h`` of each scheme (``k = 1``: the plain scheme).

==========  ===========================================================  ===============================
scheme      update                                                       linear stability (eigenvalue l)
==========  ===========================================================  ===============================
``gd``      eq 21, forward Euler: ``K+ = K - fl(dt k) fl(G(K)/k)``       ``0 < dt l < 2``
``nesterov`` eqs 37-38: ``V = K + mu (K - K-)``,                          ``0 < h l < 2(1+mu)/(1+2 mu)``
            ``K+ = V - fl(h k) fl(G(V)/k)``, ``h = (1+mu) dt^2 / 2``
``guarded_gd`` eq 21 with ``dt_n = min(dt, safety 2 / lambda_n)``: the       stable for every ``l <= lambda_n``
            CFL guard (:func:`guarded_euler_step`)
==========  ===========================================================  ===============================

Forward Euler is explicit and first order. The Nesterov scheme is the
semi-implicit (look-ahead) discretisation of the damped momentum PDE
``K_tt + d K_t = -G(K)`` (eq 36); it is second order in ``dt`` for the PDE.
Its damping is ``d = 2(1 - mu)/((1 + mu) dt)`` so that ``mu = (2 - d dt)/(2 + d dt)``
and ``h = 2 dt^2/(2 + d dt) = (1 + mu) dt^2 / 2`` (eq 38). The stability
intervals are those of one eigen-mode ``l`` of a linear ``G``; see
:mod:`jaxcfl.pde._theory`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike

from jaxcfl._core import validate as v
from jaxcfl.pde._problem import Hyper
from jaxcfl._core.stability import euler_limit, guarded_step_size, nesterov_limit
from jaxcfl._core.rounding import rounded_mul, scaled_update
from jaxcfl._core.spectral import lanczos_eigh

__all__ = ["SCHEMES", "State", "init", "nesterov_step_size", "nesterov_damping", "euler_step",
    "nesterov_step", "GuardSchedule", "estimate_curvature", "start_guard", "guarded_euler_step", "Scheme",
    "canonical_scheme", "get_scheme"]

GradFn = Callable[[Array, Hyper], Array]

SCHEMES = ("gd", "nesterov", "guarded_gd")
_ALIASES = {"gd": "gd", "euler": "gd", "forward_euler": "gd", "nesterov": "nesterov", "guarded_gd": "guarded_gd"}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class State:
    """Iterate of a scheme: ``kernel = K^n``, ``previous = K^{n-1}``, ``iteration = n``.

    The guarded scheme (``guarded_gd``) also carries its CFL guard: ``curvature``, the
    estimate ``lambda_n`` of the top eigenvalue of the Jacobian of ``G`` (``nan`` before the
    first); ``direction``, the flat top-eigenvector estimate (the warm start of the next
    refresh); ``step_size``, the ``dt_n`` of the last step. The other schemes leave them ``None``.
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


def nesterov_step_size(dt: ArrayLike, mu: ArrayLike) -> Array:
    """``h = 2 dt^2/(2 + d dt) = (1 + mu) dt^2 / 2``: the gradient step of eq 38."""
    dt = jnp.asarray(dt)
    return (1.0 + mu) * (dt * dt) * 0.5


def nesterov_damping(dt: ArrayLike, mu: ArrayLike) -> Array:
    """``d = 2 (1 - mu) / ((1 + mu) dt)``, the damping of eq 36 that gives momentum ``mu``."""
    return 2.0 * (1.0 - jnp.asarray(mu)) / ((1.0 + jnp.asarray(mu)) * jnp.asarray(dt))


def euler_step(state: State, grad_fn: GradFn, hyper: Hyper) -> State:
    """Forward Euler, eq 21: ``K^{n+1} = K^n - fl(dt k) fl(G(K^n) / k)``."""
    g = grad_fn(state.kernel, hyper)
    new = state.kernel - scaled_update(hyper.lr, g, hyper.k)
    return State(kernel=new, previous=state.kernel, iteration=state.iteration + 1)


def nesterov_step(state: State, grad_fn: GradFn, hyper: Hyper) -> State:
    """Semi-implicit Nesterov, eqs 37-38.

    ``V = K^n + mu (K^n - K^{n-1})`` then ``K^{n+1} = V - fl(h k) fl(G(V) / k)``
    with ``h = (1 + mu) dt^2 / 2``.
    """
    kernel = state.kernel
    lookahead = kernel + rounded_mul(hyper.mu, kernel - state.previous)
    g = grad_fn(lookahead, hyper)
    h = nesterov_step_size(hyper.lr, hyper.mu)
    new = lookahead - scaled_update(h, g, hyper.k)
    return State(kernel=new, previous=kernel, iteration=state.iteration + 1)


# --- the CFL guard on the PDE (issue 13) ------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GuardSchedule:
    """How the guarded scheme estimates ``lambda_n`` (static: part of the compiled program).

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
    models, ``L + alpha`` of eq 22 and :mod:`jaxcfl.pde._theory`; for the nonlinear model, the
    Hessian of the loss of eq 2). It is applied matrix-free by ``jax.jvp`` of ``G``, and its top
    eigenpair comes from the Lanczos recurrence of :mod:`jaxcfl._core.spectral` (the one behind
    :mod:`jaxcfl.pde._theory`), warm-started from ``state.direction``. The estimate is the top Ritz
    value plus its residual bound, which errs towards a larger ``lambda``, a smaller step.
    """
    kernel = state.kernel

    def matvec(vec):
        _, tangent = jax.jvp(lambda k: grad_fn(k, hyper), (kernel,), (vec.reshape(kernel.shape).astype(kernel.dtype),))
        return tangent.reshape(-1)

    key = jax.random.fold_in(jax.random.key(0), state.iteration)
    pairs = lanczos_eigh(matvec, state.direction, key, iterations=min(iterations, kernel.size), k=1)
    return dataclasses.replace(state, curvature=(pairs.values[0] + pairs.residuals[0]).astype(kernel.dtype),
                               direction=pairs.vectors[0].astype(kernel.dtype))


def start_guard(state: State, grad_fn: GradFn, hyper: Hyper, schedule: GuardSchedule) -> State:
    """A state ready for ``guarded_gd``: kept as is if it carries a guard, else with a first
    estimate of ``lambda`` at its kernel (``schedule.first_iterations`` Lanczos iterations from
    a fixed random direction). Static branch: whether ``state.direction`` is ``None``."""
    if state.direction is not None:
        return state
    kernel = state.kernel
    nan = jnp.full((), jnp.nan, kernel.dtype)
    direction = jax.random.normal(jax.random.key(1), (kernel.size,), kernel.dtype)
    state = dataclasses.replace(state, curvature=nan, direction=direction, step_size=nan)
    return estimate_curvature(state, grad_fn, hyper, iterations=schedule.first_iterations)


def guarded_euler_step(state: State, grad_fn: GradFn, hyper: Hyper) -> State:
    """Forward Euler (eq 21) under the CFL guard: ``K^{n+1} = K^n - fl(dt_n k) fl(G(K^n) / k)``,
    ``dt_n = min(dt, safety 2 / lambda_n)``, ``lambda_n = state.curvature`` (:func:`estimate_curvature`).

    Every mode of the Jacobian with eigenvalue ``0 < l <= lambda_n`` is stable at this step
    (``dt_n l <= 2 safety < 2``). A step inside the limit (``dt lambda_n <= 2 safety``) is
    bit-identical to :func:`euler_step`.
    """
    dt = guarded_step_size(hyper.lr, state.curvature, hyper.safety * 2.0)
    g = grad_fn(state.kernel, hyper)
    new = state.kernel - scaled_update(dt, g, hyper.k)
    return dataclasses.replace(state, kernel=new, previous=state.kernel, iteration=state.iteration + 1, step_size=dt)


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


class Scheme(NamedTuple):
    """A scheme: its step, and the facts of its linear stability that :mod:`jaxcfl.pde._theory` uses.

    A mode of eigenvalue ``l`` of a linear ``G`` is multiplied by
    ``factor(1 - h l, mu)`` per step (its spectral radius), ``h = step_size(dt, mu)``,
    and is stable iff ``0 < h l < limit(mu)``. ``h`` is homogeneous of degree
    ``dt_power`` in ``dt`` (1: forward Euler, ``h = dt``; 2: Nesterov,
    ``h = (1 + mu) dt^2 / 2``), which turns a limit on ``h`` into one on ``dt``
    (:meth:`dt_limit`). A new scheme is one ``Scheme`` added to ``_SCHEMES``
    (and its name to :data:`SCHEMES`): the integrator, the sweeps, the bounds
    and the theory take it from there; none of them asks for a scheme by name.

    Attributes:
      name: its canonical name (a key of ``_SCHEMES``).
      step: ``step(state, grad_fn, hyper) -> state``.
      step_size: ``h(dt, mu)``, the gradient step.
      limit: ``S(mu)``, the stability limit on ``h l``.
      factor: ``factor(x, mu)``, the per-step growth of a mode with ``x = 1 - h l``.
      uses_momentum: whether ``mu`` enters the scheme.
      guarded: whether it carries the CFL guard (its linear theory is that of its
        nominal step: forward Euler's for ``guarded_gd``).
      dt_power: the degree of ``h`` in ``dt``.
    """

    name: str
    step: Callable[[State, GradFn, Hyper], State]
    step_size: Callable[[float, float], float]
    limit: Callable[[float], float]
    factor: Callable[[np.ndarray, float], np.ndarray]
    uses_momentum: bool
    guarded: bool = False
    dt_power: int = 1

    def dt_limit(self, eigenvalue: float, momentum: float) -> float:
        """The largest stable ``dt`` for a mode of eigenvalue ``eigenvalue > 0``: the root of
        ``step_size(dt, mu) eigenvalue = limit(mu)``, ``(S / (h(1, mu) l))^(1 / dt_power)``."""
        return (self.limit(momentum) / (self.step_size(1.0, momentum) * float(eigenvalue))) ** (1.0 / self.dt_power)


_SCHEMES = {
    "gd": Scheme("gd", euler_step, _euler_h, euler_limit, _euler_factor, uses_momentum=False),
    "nesterov": Scheme("nesterov", nesterov_step, _nesterov_h, nesterov_limit,
                       _nesterov_factor, uses_momentum=True, dt_power=2),
    # Its linear theory is forward Euler's at the nominal dt: the guard lowers dt only where
    # that theory says the step is unstable (dt lambda_max > 2 safety).
    "guarded_gd": Scheme("guarded_gd", guarded_euler_step, _euler_h, euler_limit, _euler_factor,
                         uses_momentum=False, guarded=True),
}




def canonical_scheme(name: str) -> str:
    """Resolve ``"gd"`` (aliases ``"euler"``, ``"forward_euler"``) or ``"nesterov"``."""
    if not isinstance(name, str) or name not in _ALIASES:
        v.check_choice("scheme", name, SCHEMES)
    return _ALIASES[name]


def get_scheme(name: str) -> Scheme:
    return _SCHEMES[canonical_scheme(name)]
