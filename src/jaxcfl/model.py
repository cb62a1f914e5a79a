"""The one-layer CNN's loss and the right-hand sides of its gradient PDE, and the run's set-up.

The loss is binary cross-entropy with label ``y`` plus ``alpha/2 ||K||^2``
(eq 2) for ``f(I) = s(c sum_x r((K * I)(x)) + b)`` (:mod:`jaxcfl.problem`). The
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

:class:`Setup` is the typed, frozen record of a run's model constants and
scheme (model, scheme, pool, beta, a, label, bias, momentum) that the sweeps,
the bounds and their manifests share.
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

from jaxcfl import _validate as v
from jaxcfl.problem import (
    POOLS,
    Hyper,
    Problem,
    correlate,
    correlate_adjoint,
    make_hyper,
    normal_operator,
)
from jaxcfl.schemes import GuardSchedule, canonical_scheme, get_scheme

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
    ``K = 0``, the operator ``L`` of :mod:`jaxcfl.theory`, is ``c a0 r1 beta W C^T C W``
    (``a0 = a(0)``) plus, for ``a(K)``, the rank-one term ``(c^2/2) r0 s'(b) Ibar Ibar^T``.
    The nonlinear model's facts ``constant_residual``, ``slope`` and ``bend`` are those of its
    linearisation at ``K = 0`` (the ``nonconstant`` model). A new right-hand side is one
    ``Model`` added to ``_MODELS``: nothing else asks for a model by name.

    Attributes:
      name: its name (a key of ``_MODELS``, one of :data:`MODELS`).
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
      >>> jaxcfl.gradient(prob, K, jaxcfl.make_hyper(1e-3, 1.0), "linear").shape
      (4, 4)
    """
    return gradient_fn(model)(problem, kernel, hyper)


# --- the set-up of a run ---------------------------------------------------------

_GUARD_FIELDS = ("safety", "guard")


@dataclasses.dataclass(frozen=True)
class Setup:
    """The model constants and the scheme of a run: everything but ``lr``, ``alpha``, ``k`` and the data.

    Frozen and validated on construction (``scheme`` is stored under its
    canonical name). :meth:`hyper` packs it with ``lr`` and ``alpha`` into the
    traced :class:`~jaxcfl.problem.Hyper`; :meth:`to_dict` and
    :meth:`from_dict` round-trip it through a JSON manifest.

    Attributes:
      model: the right-hand side (:data:`MODELS`).
      scheme: ``"gd"`` (eq 21) or ``"nesterov"`` (eqs 37-38).
      pool: ``"sum"`` or ``"mean"`` (the ``c`` of eq 1).
      beta, a, label, bias: the model's constants (:class:`~jaxcfl.problem.Hyper`).
      momentum: Nesterov's ``mu``.
      safety, guard: the CFL guard of the ``guarded_gd`` scheme: its margin (``Hyper.safety``)
        and its :class:`~jaxcfl.schemes.GuardSchedule`; recorded by :meth:`to_dict` only for
        that scheme.

    Example:
      >>> import jaxcfl
      >>> s = jaxcfl.Setup(model="nonlinear", scheme="euler", beta=5.0)
      >>> s.scheme, jaxcfl.Setup.from_dict(s.to_dict()) == s
      ('gd', True)
    """

    model: str = "linear"
    scheme: str = "gd"
    pool: str = "sum"
    beta: float = 1.0
    a: float = -0.5
    label: float = 1.0
    bias: float = 0.0
    momentum: float = 0.9
    safety: float = 0.9
    guard: GuardSchedule = GuardSchedule()

    def __post_init__(self) -> None:
        v.check_choice("model", self.model, MODELS)
        object.__setattr__(self, "scheme", canonical_scheme(self.scheme))
        v.check_safety("safety", self.safety)
        if np.ndim(self.safety) != 0:
            raise ValueError(f"safety must be a real scalar in a Setup, got shape {np.shape(self.safety)}")
        object.__setattr__(self, "safety", float(self.safety))
        if isinstance(self.guard, Mapping):  # its JSON form (from_dict)
            object.__setattr__(self, "guard", GuardSchedule(**self.guard))
        if not isinstance(self.guard, GuardSchedule):
            raise TypeError(f"guard must be a jaxcfl.GuardSchedule, got {type(self.guard).__name__}")
        v.check_choice("pool", self.pool, POOLS)
        for name in ("beta", "a", "label", "bias"):
            v.check_finite(name, getattr(self, name))
        v.check_unit_interval("momentum", self.momentum)
        for name in ("beta", "a", "label", "bias", "momentum"):
            value = getattr(self, name)
            if np.ndim(value) != 0:
                raise ValueError(f"{name} must be a real scalar in a Setup, got shape {np.shape(value)}")
            object.__setattr__(self, name, float(value))

    @property
    def rhs(self) -> RightHandSide:
        """The right-hand side ``G`` of :attr:`model`."""
        return RIGHT_HAND_SIDES[self.model]

    @property
    def guarded(self) -> bool:
        """Whether the scheme carries the CFL guard (``guarded_gd``)."""
        return get_scheme(self.scheme).guarded

    def hyper(self, lr: ArrayLike, alpha: ArrayLike, *, k: ArrayLike = 1.0, dtype: DTypeLike | None = None) -> Hyper:
        """:func:`~jaxcfl.make_hyper` with this set-up's constants; every field broadcast to ``lr``/``alpha``'s shape."""
        return make_hyper(lr, alpha, beta=self.beta, a=self.a, label=self.label, bias=self.bias, k=k,
                          mu=self.momentum, safety=self.safety, dtype=dtype)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form. The guard's numbers appear only for a guarded scheme, so an unguarded
        set-up keeps the identity (result-folder manifest) it had before the guard existed."""
        out = dataclasses.asdict(self)
        if not self.guarded:
            for name in _GUARD_FIELDS:
                del out[name]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Setup:
        """The set-up recorded by :meth:`to_dict` (other keys, e.g. a sweep's, are ignored)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"Setup.from_dict needs a mapping, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls) if f.name not in _GUARD_FIELDS or f.name in data]
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"Setup.from_dict: missing {', '.join(missing)}")
        return cls(**{n: data[n] for n in names})

    def theory_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`jaxcfl.theory.windowed_alpha_bounds` for this set-up."""
        return dict(a=self.a, beta=self.beta, scheme=self.scheme, momentum=self.momentum, model=self.model,
                    pool=self.pool, label=self.label, bias=self.bias)
