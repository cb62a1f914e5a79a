"""Time-stepping schemes for the gradient PDE ``dK/dt = -G(K)``.

Both schemes are pure ``step(state, grad_fn, hyper) -> state`` functions over a
:class:`State` pytree, with ``grad_fn(kernel, hyper) -> G``. The update enters
through the rounding primitive :func:`jaxcfl.rounding.scaled_update`, so the
perturbation factor ``hyper.k`` applies ``fl(h k) * fl(G / k)`` to the step
``h`` of each scheme (``k = 1``: the plain scheme).

==========  ===========================================================  ===============================
scheme      update                                                       linear stability (eigenvalue l)
==========  ===========================================================  ===============================
``gd``      eq 21, forward Euler: ``K+ = K - fl(dt k) fl(G(K)/k)``       ``0 < dt l < 2``
``nesterov`` eqs 37-38: ``V = K + mu (K - K-)``,                          ``0 < h l < 2(1+mu)/(1+2 mu)``
            ``K+ = V - fl(h k) fl(G(V)/k)``, ``h = (1+mu) dt^2 / 2``
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
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike

from jaxcfl import _validate as v
from jaxcfl.problem import Hyper
from jaxcfl.rounding import rounded_mul, scaled_update

GradFn = Callable[[Array, Hyper], Array]

SCHEMES = ("gd", "nesterov")
_ALIASES = {"gd": "gd", "euler": "gd", "forward_euler": "gd", "nesterov": "nesterov"}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class State:
    """Iterate of a scheme: ``kernel = K^n``, ``previous = K^{n-1}``, ``iteration = n``."""

    kernel: Array
    previous: Array
    iteration: Array


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
    """A scheme: its step, and the facts of its linear stability that :mod:`jaxcfl.theory` uses.

    A mode of eigenvalue ``l`` of a linear ``G`` is multiplied by
    ``factor(1 - h l, mu)`` per step (its spectral radius), ``h = step_size(dt, mu)``,
    and is stable iff ``0 < h l < limit(mu)``. A new scheme is one ``Scheme``
    added to ``_SCHEMES`` (and its name to :data:`SCHEMES`): the integrator,
    the sweeps, the bounds and the theory take it from there.
    """

    name: str
    step: Callable[[State, GradFn, Hyper], State]
    step_size: Callable[[float, float], float]
    limit: Callable[[float], float]
    factor: Callable[[np.ndarray, float], np.ndarray]
    uses_momentum: bool


_SCHEMES = {
    "gd": Scheme("gd", euler_step, _euler_h, lambda mu: 2.0, _euler_factor, uses_momentum=False),
    "nesterov": Scheme("nesterov", nesterov_step, _nesterov_h, lambda mu: 2.0 * (1.0 + mu) / (1.0 + 2.0 * mu),
                       _nesterov_factor, uses_momentum=True),
}


def momentum_limit(momentum: ArrayLike = 0.0, nesterov: bool = False) -> ArrayLike:
    """The exact upper limit ``S`` on ``lr l`` for SGD on a quadratic mode of curvature ``l``.

    SGD with momentum ``mu`` in the PyTorch convention (``buf = mu buf + d``; the step is
    ``lr buf``, or ``lr (d + mu buf)`` with Nesterov, as :func:`jaxcfl.perturb.perturbed_sgd`)
    is stable iff ``0 < lr l < S``:

    * ``mu = 0``: ``S = 2``, forward Euler (eq 21), the ``gd`` scheme's limit;
    * heavy ball: ``S = 2 (1 + mu)`` (characteristic polynomial ``z^2 - (1 + mu - x) z + mu``,
      ``x = lr l``; its root ``-1`` is reached at ``x = 2 (1 + mu)``);
    * Nesterov: ``S = 2 (1 + mu) / (1 + 2 mu)``, the ``nesterov`` scheme's limit (eqs 37-38)
      with ``h = lr``: both have the polynomial ``z^2 - (1 + mu)(1 - x) z + mu (1 - x)``.

    ``momentum`` may be traced (a JAX array); the result then is one.
    """
    if nesterov:
        return _SCHEMES["nesterov"].limit(momentum)
    return _SCHEMES["gd"].limit(momentum) * (1.0 + momentum)


def canonical_scheme(name: str) -> str:
    """Resolve ``"gd"`` (aliases ``"euler"``, ``"forward_euler"``) or ``"nesterov"``."""
    if not isinstance(name, str) or name not in _ALIASES:
        v.check_choice("scheme", name, SCHEMES)
    return _ALIASES[name]


def get_scheme(name: str) -> Scheme:
    return _SCHEMES[canonical_scheme(name)]
