"""The one-layer CNN's loss and the right-hand sides of its gradient PDE.

The loss is binary cross-entropy with label ``y`` plus ``alpha/2 ||K||^2``
(eq 2) for ``f(I) = s(c sum_x r((K * I)(x)) + b)`` (:mod:`jaxcfl.pde._problem`). The
gradient PDE is ``dK/dt = -G(K)``; this module computes ``G`` ("the gradient")
for four models:

==============  ===============================================================
``nonlinear``   eqs 11-13: ``G = c (yhat - y) C^T r'(C K) + alpha K``
``linear``      eq 20 (constant ``a = yhat - y``):
                ``G = (c a / 2) (Ibar + beta C^T C K) + alpha K``
``nonconstant`` eq 28 (D.4), ``a(K) = s(b) - y + (c/2) s'(b) <Ibar, K>``:
                ``G = (c a(K) / 2) (Ibar + beta C^T C K) + alpha K``
``activated``   eq 35 (D.5), ``r' = 1`` with the same ``a(K)``:
                ``G = c a(K) Ibar + alpha K``
==============  ===============================================================

``Ibar = C^T 1`` is the windowed input sum (eq 19's "input sum"): for each
kernel offset ``z``, the sum of the image over the positions the kernel visits.
Every right-hand side is a ``w x w`` array. A new right-hand side is one
function ``G(problem, kernel, hyper)`` and one :class:`Model` (its facts:
linearised or not, the form of its linearisation) added to ``_MODELS``; the
integrator, the sweeps, the bounds and the windowed theory (the Jacobian of
``G`` at ``K = 0``) take it from there.

Conventions that differ from the printed text (kept consistent with the
paper's own amplifier, eq 23):

* Swish has ``r'(0) = 1/2`` and ``r''(0) = beta/2``, so ``r'(x) ~ (1 + beta x)/2``
  and ``r'(K*I)*I ~ (Ibar + beta C^T C K)/2`` (eq 19). paper-notes writes
  ``beta x / 4``; that would halve the ``|I(w)|^2`` term of eq 23, so we follow
  the Taylor coefficient and eq 23.
* The constant (forcing) term is the exact windowed ``Ibar = C^T 1``; the
  reference code uses ``mean(I)``. It does not enter any stability bound.

The typed record of a run (right-hand side, scheme and constants) is
:class:`jaxcfl.Setup` (:mod:`jaxcfl.pde._setup`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike, DTypeLike

from jaxcfl._core import validate as v
from jaxcfl.pde._problem import (
    POOLS,
    Hyper,
    Problem,
    correlate,
    correlate_adjoint,
    make_hyper,
    normal_operator,
)

__all__ = ["RIGHT_HAND_SIDES", "MODELS", "swish", "swish_grad", "logit", "loss", "grad_nonlinear",
    "grad_linear", "grad_nonconstant", "grad_activated", "Model", "get_model", "gradient_fn", "gradient"]

RightHandSide = Callable[[Problem, Array, Hyper], Array]


def swish(x: Array, beta: ArrayLike) -> Array:
    """``r(x) = x sigmoid(beta x)`` (eq 14)."""
    return x * jax.nn.sigmoid(beta * x)


def swish_grad(x: Array, beta: ArrayLike) -> Array:
    """``r'(x) = s(beta x) + beta x s(beta x)(1 - s(beta x))`` (eq 15)."""
    s = jax.nn.sigmoid(beta * x)
    return s + beta * x * s * (1.0 - s)


def logit(problem: Problem, kernel: Array, hyper: Hyper) -> Array:
    """``z = c sum_x r((K*I)(x)) + b``, so that ``yhat = s(z)``."""
    return problem.pool_scale * jnp.sum(swish(correlate(problem, kernel), hyper.beta)) + hyper.bias


def loss(problem: Problem, kernel: Array, hyper: Hyper) -> Array:
    """The regularised cross-entropy of eq 2: ``BCE(y, s(z)) + alpha/2 ||K||^2``.

    Written as ``softplus(z) - y z`` so that it stays finite for large ``|z|``.
    """
    z = logit(problem, kernel, hyper)
    return jax.nn.softplus(z) - hyper.label * z + 0.5 * hyper.alpha * jnp.sum(kernel * kernel)


# --- right-hand sides (the gradient G; the PDE is dK/dt = -G) -------------------

def _a_of_kernel(problem: Problem, kernel: Array, hyper: Hyper) -> Array:
    """``a(K) = s(b) - y + (c/2) s'(b) <Ibar, K>``: the linearised ``yhat - y`` of D.4."""
    s_b = jax.nn.sigmoid(hyper.bias)
    c = problem.pool_scale
    return s_b - hyper.label + 0.5 * c * s_b * (1.0 - s_b) * jnp.sum(problem.window_sum * kernel)


def grad_nonlinear(problem: Problem, kernel: Array, hyper: Hyper) -> Array:
    """Eqs 11-13: ``c (yhat - y) C^T r'(C K) + alpha K``."""
    c = problem.pool_scale
    z_map = correlate(problem, kernel)
    logit_ = c * jnp.sum(swish(z_map, hyper.beta)) + hyper.bias
    residual = jax.nn.sigmoid(logit_) - hyper.label
    return (c * residual) * correlate_adjoint(problem, swish_grad(z_map, hyper.beta)) + hyper.alpha * kernel


def _linearised_data_term(problem: Problem, kernel: Array, hyper: Hyper) -> Array:
    """``(Ibar + beta C^T C K) / 2``: eq 19's linearisation of ``r'(K*I)*I``."""
    return 0.5 * (problem.window_sum + hyper.beta * normal_operator(problem, kernel))


def grad_linear(problem: Problem, kernel: Array, hyper: Hyper) -> Array:
    """Eq 20: ``(c a / 2)(Ibar + beta C^T C K) + alpha K`` with constant ``a``."""
    return (problem.pool_scale * hyper.a) * _linearised_data_term(problem, kernel, hyper) + hyper.alpha * kernel


def grad_nonconstant(problem: Problem, kernel: Array, hyper: Hyper) -> Array:
    """Eq 28: the linearised model with ``a(K) = s(b) - y + (c/2) s'(b) <Ibar, K>``."""
    a_k = _a_of_kernel(problem, kernel, hyper)
    return (problem.pool_scale * a_k) * _linearised_data_term(problem, kernel, hyper) + hyper.alpha * kernel


def grad_activated(problem: Problem, kernel: Array, hyper: Hyper) -> Array:
    """Eq 35, the activated regime ``r' = 1``: ``c a(K) Ibar + alpha K``."""
    a_k = _a_of_kernel(problem, kernel, hyper)
    return (problem.pool_scale * a_k) * problem.window_sum + hyper.alpha * kernel


class Model(NamedTuple):
    """A right-hand side and the facts of it that the operators, the sweeps, the bounds and the theory use.

    Every linearised model has the form (eqs 20, 28, 35)

        ``G(K) = c a (r0 Ibar + r1 beta W C^T C W K) + alpha K``

    with ``a`` either the constant ``hyper.a`` (eq 20) or ``a(K) = s(b) - y + (c/2) s'(b) <Ibar, K>``
    (D.4), and ``r0``, ``r1`` the activation's linearisation ``r'(x) ~ r0 + r1 beta x``
    (``1/2, 1/2`` for Swish; ``1, 0`` in the activated regime ``r' = 1``). Its Jacobian at
    ``K = 0``, the operator ``L`` of :mod:`jaxcfl.pde._theory`, is ``c a0 r1 beta W C^T C W``
    (``a0 = a(0)``) plus, for ``a(K)``, the rank-one term ``(c^2/2) r0 s'(b) Ibar Ibar^T``.
    The nonlinear model's facts ``constant_residual``, ``slope`` and ``bend`` are those of its
    linearisation at ``K = 0`` (the ``nonconstant`` model). A new right-hand side is one
    ``Model`` added to ``_MODELS``: nothing else asks for a model by name.

    Attributes:
      name: its name (a key of ``_MODELS``, one of :data:`MODELS`).
      gradient: ``G(problem, kernel, hyper)``.
      linearised: ``G`` is built from ``Ibar`` and ``W C^T C W`` alone (no ``r'(C K)``): its step
        is matrix products and the dense operator serves it. ``False``: the correlations of the
        nonlinearity are needed (no dense operator), and the theory of :mod:`jaxcfl.pde._theory` is
        that of the linearisation at ``K = 0`` only.
      constant_residual: ``a`` is the constant ``hyper.a``; else ``a(K)``, through which
        ``label`` and ``bias`` enter.
      slope, bend: ``r0`` and ``r1`` above.
      paper_bounds: the paper's closed-form non-windowed bounds (eqs 26-27, 46-47;
        :func:`jaxcfl.pde._theory.alpha_bounds`, :func:`jaxcfl.pde._theory.dt_bound`) are this model's.
    """

    name: str
    gradient: RightHandSide
    linearised: bool
    constant_residual: bool
    slope: float = 0.5
    bend: float = 0.5
    paper_bounds: bool = False


_MODELS: Mapping[str, Model] = {
    "nonlinear": Model("nonlinear", grad_nonlinear, linearised=False, constant_residual=False),
    "linear": Model("linear", grad_linear, linearised=True, constant_residual=True, paper_bounds=True),
    "nonconstant": Model("nonconstant", grad_nonconstant, linearised=True, constant_residual=False),
    "activated": Model("activated", grad_activated, linearised=True, constant_residual=False, slope=1.0, bend=0.0),
}

#: The right-hand sides by name; the keys are :data:`MODELS`.
RIGHT_HAND_SIDES: Mapping[str, RightHandSide] = {name: m.gradient for name, m in _MODELS.items()}
MODELS = tuple(_MODELS)


def get_model(name: str) -> Model:
    """The :class:`Model` called ``name`` (one of :data:`MODELS`; anything else is refused)."""
    v.check_choice("model", name, MODELS)
    return _MODELS[name]


def gradient_fn(model: str) -> RightHandSide:
    """The right-hand side ``G(problem, kernel, hyper)`` of ``model`` (one of :data:`MODELS`)."""
    return get_model(model).gradient


def gradient(problem: Problem, kernel: Array, hyper: Hyper, model: str = "nonlinear") -> Array:
    """``G(K)`` for ``model``; the gradient PDE is ``dK/dt = -G(K)``.

    Example:
      >>> import jax, jaxcfl
      >>> prob = jaxcfl.make_problem(jaxcfl.checkerboard(16), 4)
      >>> K = jax.random.normal(jax.random.key(0), (4, 4))
      >>> jaxcfl.pde.gradient(prob, K, jaxcfl.make_hyper(1e-3, 1.0), "linear").shape
      (4, 4)
    """
    return gradient_fn(model)(problem, kernel, hyper)
