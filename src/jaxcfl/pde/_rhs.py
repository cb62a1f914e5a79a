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
function ``G(problem, kernel, hyper)`` and one :class:`Model` value (its facts:
linearised or not, the form of its linearisation), passed wherever a model's name is
accepted; the integrator, the sweeps, the bounds and the windowed theory (the Jacobian of
``G`` at ``K = 0``) take it from there. Adding it to ``_MODELS`` gives it a name.

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

import jax
import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike

from jaxcfl._core import validate as v
from jaxcfl.pde._problem import Hyper, Problem, correlate, correlate_adjoint, normal_operator

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


@dataclasses.dataclass(frozen=True)
class Model:
    """A right-hand side as a value: ``G`` and the facts of it that the operators, the sweeps, the
    bounds and the theory use (``str(model)`` is its name, the one a manifest records).

    Every linearised model has the form (eqs 20, 28, 35)

        ``G(K) = c a (r0 Ibar + r1 beta W C^T C W K) + alpha K``

    with ``a`` either the constant ``hyper.a`` (eq 20) or ``a(K) = s(b) - y + (c/2) s'(b) <Ibar, K>``
    (D.4), and ``r0``, ``r1`` the activation's linearisation ``r'(x) ~ r0 + r1 beta x``
    (``1/2, 1/2`` for Swish; ``1, 0`` in the activated regime ``r' = 1``). Its Jacobian at
    ``K = 0``, the operator ``L`` of :mod:`jaxcfl.theory`, is ``c a0 r1 beta W C^T C W``
    (``a0 = a(0)``) plus, for ``a(K)``, the rank-one term ``(c^2/2) r0 s'(b) Ibar Ibar^T``.
    The nonlinear model's facts ``constant_residual``, ``slope`` and ``bend`` are those of its
    linearisation at ``K = 0`` (the ``nonconstant`` model). A new right-hand side is one
    ``Model`` value, accepted wherever a model's name is (:func:`jaxcfl.sweep`,
    :func:`jaxcfl.integrate`, :class:`jaxcfl.Setup`, :mod:`jaxcfl.theory`); nothing asks for a
    model by name. Adding it to ``_MODELS`` names it for the command line.

    Attributes:
      name: its name (for the four of :data:`MODELS`, their key in ``_MODELS``).
      gradient: ``G(problem, kernel, hyper)``.
      linearised: ``G`` is built from ``Ibar`` and ``W C^T C W`` alone (no ``r'(C K)``): its step
        is matrix products and the dense operator serves it. ``False``: the correlations of the
        nonlinearity are needed (no dense operator), and the theory of :mod:`jaxcfl.theory` is
        that of the linearisation at ``K = 0`` only.
      constant_residual: ``a`` is the constant ``hyper.a``; else ``a(K)``, through which
        ``label`` and ``bias`` enter.
      slope, bend: ``r0`` and ``r1`` above.
      paper_bounds: the paper's closed-form non-windowed bounds (eqs 26-27, 46-47;
        :func:`jaxcfl.theory.alpha_bounds`, :func:`jaxcfl.theory.dt_bound`) are this model's.
    """

    name: str
    gradient: RightHandSide = dataclasses.field(repr=False)
    _: dataclasses.KW_ONLY
    linearised: bool
    constant_residual: bool
    slope: float = 0.5
    bend: float = 0.5
    paper_bounds: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"Model name must be a non-empty string, got {self.name!r:.60}")
        if not callable(self.gradient):
            raise TypeError(f"Model gradient must be callable G(problem, kernel, hyper), got {type(self.gradient).__name__}")
        for field in ("linearised", "constant_residual", "paper_bounds"):
            if not isinstance(getattr(self, field), bool):
                raise TypeError(f"Model {field} must be a bool, got {getattr(self, field)!r:.60}")
        for field in ("slope", "bend"):
            v.check_finite(field, getattr(self, field))
            object.__setattr__(self, field, float(getattr(self, field)))

    def __str__(self) -> str:
        return self.name

    @property
    def affine(self) -> bool:
        """``G`` is affine in ``K`` (linearised, with the constant ``a``): the windowed theory of
        :mod:`jaxcfl.theory` is then exact, not that of a linearisation."""
        return self.linearised and self.constant_residual


NONLINEAR = Model("nonlinear", grad_nonlinear, linearised=False, constant_residual=False)
LINEAR = Model("linear", grad_linear, linearised=True, constant_residual=True, paper_bounds=True)
NONCONSTANT = Model("nonconstant", grad_nonconstant, linearised=True, constant_residual=False)
ACTIVATED = Model("activated", grad_activated, linearised=True, constant_residual=False, slope=1.0, bend=0.0)
_MODELS: Mapping[str, Model] = {m.name: m for m in (NONLINEAR, LINEAR, NONCONSTANT, ACTIVATED)}

#: The right-hand sides by name; the keys are :data:`MODELS`.
RIGHT_HAND_SIDES: Mapping[str, RightHandSide] = {name: m.gradient for name, m in _MODELS.items()}
MODELS = tuple(_MODELS)


def get_model(model: str | Model) -> Model:
    """The :class:`Model` called ``model`` (one of :data:`MODELS`; any other name is refused), or
    ``model`` itself if it is one: where a name is parsed, once, at a public entry point."""
    if isinstance(model, Model):
        return model
    v.check_choice("model", model, MODELS)
    return _MODELS[model]


def gradient_fn(model: str | Model) -> RightHandSide:
    """The right-hand side ``G(problem, kernel, hyper)`` of ``model`` (a :class:`Model` or one of :data:`MODELS`)."""
    return get_model(model).gradient


def gradient(problem: Problem, kernel: Array, hyper: Hyper, model: str | Model = "nonlinear") -> Array:
    """``G(K)`` for ``model``; the gradient PDE is ``dK/dt = -G(K)``.

    Example:
      >>> import jax, jaxcfl
      >>> prob = jaxcfl.make_problem(jaxcfl.checkerboard(16), 4)
      >>> K = jax.random.normal(jax.random.key(0), (4, 4))
      >>> jaxcfl.pde.gradient(prob, K, jaxcfl.make_hyper(1e-3, 1.0), "linear").shape
      (4, 4)
    """
    return gradient_fn(model)(problem, kernel, hyper)
