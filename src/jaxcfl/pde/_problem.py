"""The data of the one-layer windowed-kernel CNN problem: image, window, pooling, hyperparameters.

Model (appendix D.1, eq 1, with the discrete conventions of paper-notes section 1)::

    f(I) = s( c * sum_x r((K * I)(x)) + b ),   r(x) = x sigmoid(beta x),

where ``*`` is the *valid* cross-correlation ``(K*I)(x) = sum_z K(z) I(x+z)``
(``C K``), ``c = 1`` for ``pool="sum"`` (the equations) and
``c = 1 / (number of output pixels)`` for ``pool="mean"`` (the Figure 4
experiment). The window W is the kernel's own ``w x w`` support.

This module holds the containers: :class:`Problem` (the image, its windowed
input sum ``Ibar = C^T 1``, the pooling and the correlation back-end of
:mod:`jaxcfl.pde._operators`) and :class:`Hyper` (the traced numeric
hyperparameters), with :func:`correlate`, :func:`correlate_adjoint` and
:func:`normal_operator` applying ``C``, ``C^T`` and ``W C^T C W``. The loss and
the right-hand sides of the gradient PDE are in :mod:`jaxcfl.pde._rhs`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike, DTypeLike

from jaxcfl._core import validate as v
from jaxcfl.pde._operators import (
    OPERATORS,
    DenseOperator,
    FFTOperator,
    Operator,
    SeparableOperator,
    choose_operator,
)

__all__ = ["POOLS", "Problem", "Hyper", "make_hyper", "with_separable_operator",
    "with_dense_operator", "correlate", "correlate_adjoint", "normal_operator", "as_kernel", "check_kernel"]

POOLS = ("sum", "mean")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Problem:
    """The data of a one-layer CNN problem: image, windowed input sum, pooling, correlation back-end.

    Build it with :func:`make_problem`. Array fields (and the back-end's arrays)
    are pytree leaves; ``pool`` is static. ``backend`` is one of
    :class:`~jaxcfl.pde.FFTOperator`, :class:`~jaxcfl.pde.SeparableOperator`
    or :class:`~jaxcfl.pde.DenseOperator`; :attr:`operator` names it.
    """

    image: Array
    window_sum: Array
    backend: Operator
    pool: str = dataclasses.field(metadata=dict(static=True))

    @property
    def operator(self) -> str:
        """What computes the correlations: ``"fft"``, ``"separable"`` or ``"dense"`` (see :mod:`jaxcfl.pde._operators`)."""
        return self.backend.name

    @property
    def kernel_size(self) -> int:
        return self.backend.kernel_size

    @property
    def rank(self) -> int | None:
        """The number of separable factors of the image, or ``None`` when correlations are not separable."""
        base = self.backend.base if isinstance(self.backend, DenseOperator) else self.backend
        return base.rank if isinstance(base, SeparableOperator) else None

    @property
    def image_shape(self) -> tuple[int, int]:
        return tuple(self.image.shape)  # type: ignore[return-value]

    @property
    def output_shape(self) -> tuple[int, int]:
        """Shape of the valid correlation ``K * I``: ``(N0 - w + 1, N1 - w + 1)``."""
        n0, n1 = self.image_shape
        w = self.kernel_size
        return (n0 - w + 1, n1 - w + 1)

    @property
    def kernel_shape(self) -> tuple[int, int]:
        return (self.kernel_size, self.kernel_size)

    @property
    def pool_scale(self) -> float:
        """``c``: 1 for sum pooling, ``1 / #outputs`` for mean pooling."""
        m0, m1 = self.output_shape
        return 1.0 if self.pool == "sum" else 1.0 / (m0 * m1)

    @property
    def dtype(self):
        return self.image.dtype


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Hyper:
    """Numeric hyperparameters, all traced arrays (changing them never recompiles).

    Attributes:
      lr: the step ``dt`` (eq 21; for Nesterov, eqs 37-38).
      alpha: weight decay.
      beta: Swish parameter.
      a: the constant ``yhat - y`` of the linearised model (eq 20).
      label: the label ``y``.
      bias: the sigmoid bias ``b``.
      k: perturbation factor of the update (paper-notes section 2).
      mu: Nesterov momentum coefficient ``(2 - d dt)/(2 + d dt)``.
      safety: the CFL guard's margin in ``(0, 1]`` (scheme ``guarded_gd`` only):
        ``dt_n lambda_n <= 2 safety``.
    """

    lr: Array
    alpha: Array
    beta: Array
    a: Array
    label: Array
    bias: Array
    k: Array
    mu: Array
    safety: Array


def make_hyper(
    lr: ArrayLike,
    alpha: ArrayLike,
    *,
    beta: ArrayLike = 1.0,
    a: ArrayLike = -0.5,
    label: ArrayLike = 1.0,
    bias: ArrayLike = 0.0,
    k: ArrayLike = 1.0,
    mu: ArrayLike = 0.9,
    safety: ArrayLike = 0.9,
    dtype: DTypeLike | None = None,
) -> Hyper:
    """Validate and pack hyperparameters; array arguments broadcast together.

    A batch of configurations is a ``Hyper`` whose fields carry a leading axis;
    ``jax.vmap`` over it runs them all in one program.
    """
    v.check_positive("lr", lr)
    v.check_nonnegative("alpha", alpha)
    v.check_finite("beta", beta)
    v.check_finite("a", a)
    v.check_finite("label", label)
    v.check_finite("bias", bias)
    v.check_positive("k", k)
    v.check_unit_interval("mu", mu)
    v.check_safety("safety", safety)
    dtype = jax.dtypes.canonicalize_dtype(dtype if dtype is not None else float)
    # Checked in the dtype the numbers will be computed in, not only in float64.
    for name, value in dict(lr=lr, alpha=alpha, beta=beta, a=a, label=label, bias=bias, k=k, mu=mu, safety=safety).items():
        v.check_representable(name, value, dtype)
    if v.is_concrete((lr, k)):
        with np.errstate(all="ignore"):
            v.check_representable("k * lr", np.multiply(np.asarray(k, np.float64), np.asarray(lr, np.float64)), dtype)
            v.check_representable("1 / k", 1.0 / np.asarray(k, np.float64), dtype)
    fields = dict(lr=lr, alpha=alpha, beta=beta, a=a, label=label, bias=bias, k=k, mu=mu, safety=safety)
    arrays = {name: jnp.asarray(val, dtype) for name, val in fields.items()}
    try:
        shape = jnp.broadcast_shapes(*(x.shape for x in arrays.values()))
    except ValueError:
        shapes = ", ".join(f"{name} {x.shape}" for name, x in arrays.items() if x.shape)
        raise ValueError(f"make_hyper: the array arguments must broadcast together, got {shapes}") from None
    return Hyper(**{name: jnp.broadcast_to(x, shape) for name, x in arrays.items()})


def with_separable_operator(problem: Problem, u: ArrayLike, v_: ArrayLike) -> Problem:
    """``problem`` with correlations by separable products, for ``image = u @ v_.T``.

    ``u`` is ``N0 x r`` and ``v_`` is ``N1 x r`` (e.g. from :func:`jaxcfl.pde.separable_factors`).
    The caller vouches for the factorisation; :func:`make_problem` finds and checks it.
    """
    u, v_ = np.asarray(u, np.float64), np.asarray(v_, np.float64)
    n0, n1 = problem.image_shape
    if u.ndim != 2 or v_.ndim != 2 or u.shape[0] != n0 or v_.shape[0] != n1 or u.shape[1] != v_.shape[1]:
        raise ValueError(f"factors must be N0 x r and N1 x r for an image of shape {(n0, n1)}, got {u.shape} and {v_.shape}")
    backend = SeparableOperator.from_factors(u, v_, problem.kernel_size, problem.dtype)
    return dataclasses.replace(problem, backend=backend)


def with_dense_operator(problem: Problem, *, batch: int = 256) -> Problem:
    """``problem`` with ``W C^T C W`` assembled as a dense symmetric matrix.

    Built column by column from the back-end's mat-vecs (``batch`` at a time),
    then symmetrised. Memory: ``w^4`` floats (64 MiB in float32 for ``w = 64``).
    Only the linearised models use it; correlations stay with the back-end it
    was built from.
    """
    base = problem.backend.base if isinstance(problem.backend, DenseOperator) else problem.backend
    return dataclasses.replace(problem, backend=DenseOperator.assemble(base, problem.dtype, batch=batch))


def correlate(problem: Problem, kernel: Array) -> Array:
    """``C K``: the valid cross-correlation ``(K * I)(x)``, shape :attr:`Problem.output_shape`."""
    return problem.backend.correlate(kernel)


def correlate_adjoint(problem: Problem, u: Array) -> Array:
    """``C^T u`` for ``u`` of shape :attr:`Problem.output_shape`; returns ``w x w``."""
    return problem.backend.adjoint(u)


def normal_operator(problem: Problem, kernel: Array) -> Array:
    """``W C^T C W K``: the windowed normal operator behind every linearised model."""
    return problem.backend.normal(kernel)


def as_kernel(problem: Problem, kernel: Any, name: str = "kernel") -> Array:
    """``kernel`` as an array in the problem's dtype, after checking that it is a real array of
    the problem's kernel shape (and that ``problem`` is a :class:`Problem`)."""
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be a jaxcfl.Problem (use jaxcfl.make_problem), got {type(problem).__name__}")
    try:
        arr = np.asarray(kernel, dtype=np.float64) if not isinstance(kernel, jax.Array) else kernel
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real array of shape {problem.kernel_shape}, got {kernel!r:.60}") from None
    check_kernel(problem, arr, name)
    return jnp.asarray(arr, problem.dtype)


def check_kernel(problem: Problem, kernel: Any, name: str = "kernel") -> None:
    if tuple(np.shape(kernel)) != problem.kernel_shape:
        raise ValueError(f"{name} must have shape {problem.kernel_shape} (kernel_size={problem.kernel_size}), got {np.shape(kernel)}")
