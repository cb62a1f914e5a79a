"""The one-layer windowed-kernel CNN and the right-hand sides of its gradient PDE.

Model (appendix D.1, eq 1, with the discrete conventions of paper-notes section 1)::

    f(I) = s( c * sum_x r((K * I)(x)) + b ),   r(x) = x sigmoid(beta x),

where ``*`` is the *valid* cross-correlation ``(K*I)(x) = sum_z K(z) I(x+z)``
(``C K`` below), ``c = 1`` for ``pool="sum"`` (the equations) and
``c = 1 / (number of output pixels)`` for ``pool="mean"`` (the Figure 4
experiment). The loss is binary cross-entropy with label ``y`` plus
``alpha/2 ||K||^2`` (eq 2). The window W is the kernel's own ``w x w`` support,
so every right-hand side below is a ``w x w`` array.

The gradient PDE is ``dK/dt = -G(K)``; this module computes ``G`` ("the
gradient") for four models:

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

Conventions that differ from the printed text (kept consistent with the
paper's own amplifier, eq 23):

* Swish has ``r'(0) = 1/2`` and ``r''(0) = beta/2``, so ``r'(x) ~ (1 + beta x)/2``
  and ``r'(K*I)*I ~ (Ibar + beta C^T C K)/2`` (eq 19). paper-notes writes
  ``beta x / 4``; that would halve the ``|I(w)|^2`` term of eq 23, so we follow
  the Taylor coefficient and eq 23.
* The constant (forcing) term is the exact windowed ``Ibar = C^T 1``; the
  reference code uses ``mean(I)``. It does not enter any stability bound.

Correlations are computed in one of two ways (``operator`` of :func:`make_problem`):

* ``"fft"``, for any image: real FFTs of the image's size. For a valid
  correlation no padding is needed: the circular correlation agrees with the
  valid one on every output the valid one has. The image transform is computed
  once, in :func:`make_problem`. The 2-D transforms are split into row and
  column passes so that the rows known to be zero (a ``w x w`` kernel inside an
  ``N x N`` grid) or not needed (a ``w x w`` adjoint output) are never transformed.
* ``"separable"``, for an image of low rank ``r``, ``I = sum_j u_j v_j^T`` (the
  checkerboard has ``r = 1``): with the Toeplitz matrices ``T_u[x, z] = u[x + z]``,
  ``C K = sum_j T_{u_j} K T_{v_j}^T`` and ``C^T R = sum_j T_{u_j}^T R T_{v_j}``,
  and the windowed normal operator is ``W C^T C W K = sum_{i,j} (T_{u_i}^T T_{u_j})
  K (T_{v_j}^T T_{v_i})``. These are small matrix products
  (``2 r (w^2 M + w M^2)`` multiply-adds per correlation pair, ``2 r^2 w^3`` for the
  normal operator) instead of four ``N x N`` FFTs. The factors come from
  :func:`separable_factors` (Gaussian elimination with complete pivoting, exact
  for integer images such as the checkerboard). Same scheme, different rounding.

``"auto"`` (the default) takes ``"separable"`` when the image is concrete, has
such factors and the products cost less than the FFTs (:func:`separable_pays`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax
from jax.typing import ArrayLike, DTypeLike

from jaxcfl import _validate as v

POOLS = ("sum", "mean")
MODELS = ("nonlinear", "linear", "nonconstant", "activated")
OPERATORS = ("auto", "fft", "separable")
# Break-even of "auto": separable products are used while their multiply-adds per
# correlation stay below FFT_COST_FACTOR * N0 N1 log2(N0 N1). Measured on CPU with
# benchmarks/operator_choice.py (see benchmarks/README.md): the break-even lies at
# 14-20 for 256 x 256 images and above 5-10 (the largest measured) for 64-128 pixel
# images; a least-squares fit of all the time differences gives 15.5.
FFT_COST_FACTOR = 14.0
# "auto" looks for at most this many factors: the separable path is for images of low rank,
# and a generic image (full rank) keeps the FFT path even where a full factorisation would pay.
AUTO_MAX_RANK = 8


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Problem:
    """The data of a one-layer CNN problem: image, its FFT, window, pooling.

    Build it with :func:`make_problem`. Array fields are pytree leaves;
    ``kernel_size`` and ``pool`` are static (they fix shapes and code paths).
    ``normal_matrix``, when set (:func:`with_dense_operator`), holds
    ``W C^T C W`` as a dense ``w^2 x w^2`` matrix: the linearised models then
    apply it by a matrix product, which for many configurations at once is a
    single GEMM and much faster than two FFT correlations per configuration.
    ``toeplitz``, when set (``operator="separable"``), holds the Toeplitz
    stacks ``(T_u, T_v)`` of the image's rank-``r`` factors, shapes
    ``(r, M0, w)`` and ``(r, M1, w)``, and ``gram`` the products
    ``(T_{u_i}^T T_{u_j}, T_{v_i}^T T_{v_j})``, shapes ``(r, r, w, w)``; every
    correlation is then a few small matrix products (module docstring).
    """

    image: Array
    image_hat: Array
    window_sum: Array
    kernel_size: int = dataclasses.field(metadata=dict(static=True))
    pool: str = dataclasses.field(metadata=dict(static=True))
    normal_matrix: Array | None = None
    toeplitz: tuple[Array, Array] | None = None
    gram: tuple[Array, Array] | None = None

    @property
    def operator(self) -> str:
        """How correlations are computed: ``"separable"`` or ``"fft"`` (see :func:`make_problem`)."""
        return "separable" if self.toeplitz is not None else "fft"

    @property
    def rank(self) -> int | None:
        """The number of separable factors of the image, or ``None`` on the FFT path."""
        return None if self.toeplitz is None else int(self.toeplitz[0].shape[0])

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
    """

    lr: Array
    alpha: Array
    beta: Array
    a: Array
    label: Array
    bias: Array
    k: Array
    mu: Array


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
    dtype = jax.dtypes.canonicalize_dtype(dtype if dtype is not None else float)
    fields = dict(lr=lr, alpha=alpha, beta=beta, a=a, label=label, bias=bias, k=k, mu=mu)
    arrays = {name: jnp.asarray(val, dtype) for name, val in fields.items()}
    shape = jnp.broadcast_shapes(*(x.shape for x in arrays.values()))
    return Hyper(**{name: jnp.broadcast_to(x, shape) for name, x in arrays.items()})


def make_problem(
    image: ArrayLike,
    kernel_size: int,
    *,
    pool: str = "sum",
    dtype: DTypeLike | None = None,
    operator: str = "auto",
    max_rank: int | None = None,
) -> Problem:
    """Set up the one-layer CNN problem for ``image`` and a ``kernel_size`` window.

    Args:
      image: any finite 2-D array (e.g. :func:`jaxcfl.checkerboard`).
      kernel_size: ``w``; the kernel and its window are ``w x w``.
      pool: ``"sum"`` (the equations) or ``"mean"`` (Figure 4).
      dtype: floating dtype; defaults to the image's floating dtype, else JAX's default.
      operator: ``"fft"`` (any image), ``"separable"`` (a low-rank image; module
        docstring) or ``"auto"``: separable when the image is concrete, has at
        most ``max_rank`` separable factors and :func:`separable_pays`, else FFT.
      max_rank: the most factors to look for (default: the largest rank for
        which the separable products are cheaper than the FFTs, at most
        ``AUTO_MAX_RANK = 8``).

    Raises:
      ValueError: for a non-2-D or non-finite image, a kernel larger than the
        image, an unknown pool or operator, or ``operator="separable"`` with an
        image that is traced or has no factorisation of rank ``<= max_rank``.
    """
    v.check_image(image)
    kernel_size = v.check_int("kernel_size", kernel_size, minimum=1)
    v.check_choice("pool", pool, POOLS)
    v.check_choice("operator", operator, OPERATORS)
    if max_rank is not None:
        max_rank = v.check_int("max_rank", max_rank, minimum=1)
    shape = np.shape(image)
    if kernel_size > min(shape):
        raise ValueError(f"kernel_size={kernel_size} is larger than the image of shape {shape}; it must be <= {min(shape)}")
    if dtype is None:
        src = np.asarray(image).dtype if v.is_concrete(image) else jnp.asarray(image).dtype
        dtype = src if jnp.issubdtype(src, jnp.floating) else float
    dtype = jax.dtypes.canonicalize_dtype(dtype)
    img = jnp.asarray(image, dtype)
    image_hat = jnp.fft.rfft2(img)
    ones = jnp.ones((shape[0] - kernel_size + 1, shape[1] - kernel_size + 1), dtype)
    window_sum = _adjoint(image_hat, ones, shape, kernel_size)
    problem = Problem(image=img, image_hat=image_hat, window_sum=window_sum, kernel_size=kernel_size, pool=pool)
    if operator == "fft":
        return problem
    concrete = v.is_concrete(image)
    if not concrete:
        if operator == "separable":
            raise ValueError("operator='separable' needs a concrete image (its factors are found on the host); "
                             "this one is traced: build the problem outside jit, or use operator='fft'")
        return problem
    limit = max_rank if max_rank is not None else min(AUTO_MAX_RANK, _cheapest_rank(shape, kernel_size))
    factors = separable_factors(image, max_rank=limit, dtype=dtype) if limit >= 1 else None
    if factors is None:
        if operator == "separable":
            raise ValueError(f"operator='separable': the image has no separable factorisation of rank <= {limit} "
                             f"(max_rank) to the precision of {np.dtype(dtype).name}; use operator='fft'")
        return problem
    return with_separable_operator(problem, *factors)


# --- separable (low-rank) images ----------------------------------------------------

def separable_factors(image: ArrayLike, *, max_rank: int = 8, dtype: DTypeLike | None = None,
                      rtol: float | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Factors ``U (N0 x r)``, ``V (N1 x r)`` with ``image = U V^T`` to rounding, or ``None``.

    Gaussian elimination with complete pivoting (a skeleton / cross
    decomposition), in float64: each step takes the largest remaining entry
    ``R[i, j]`` as pivot and removes the rank-1 term ``R[:, j] R[i, :] / R[i, j]``.
    It stops when every entry of the remainder is at most ``rtol * max|image|``
    (default ``4 eps`` of ``dtype``, i.e. below the rounding of the image in the
    working precision) and returns ``None`` if that takes more than ``max_rank``
    steps. For an integer image such as the checkerboard the factors are exact.
    Cost ``O(N0 N1 r)``.
    """
    max_rank = v.check_int("max_rank", max_rank, minimum=1)
    rest = np.array(image, dtype=np.float64)
    if rest.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {rest.shape}")
    eps = float(np.finfo(np.dtype(jax.dtypes.canonicalize_dtype(dtype if dtype is not None else float))).eps)
    tol = (4 * eps if rtol is None else float(rtol)) * float(np.max(np.abs(rest), initial=0.0))
    cols, rows = [], []
    while True:
        i, j = np.unravel_index(np.argmax(np.abs(rest)), rest.shape)
        pivot = rest[i, j]
        if abs(pivot) <= tol:
            break
        if len(cols) == max_rank:
            return None
        scale = np.sqrt(abs(pivot))
        col, row = rest[:, j] / scale, rest[i, :] / (np.sign(pivot) * scale)
        rest -= np.outer(col, row)
        cols.append(col)
        rows.append(row)
    if not cols:  # the zero image: one zero factor keeps shapes non-empty
        return np.zeros((rest.shape[0], 1)), np.zeros((rest.shape[1], 1))
    return np.stack(cols, axis=1), np.stack(rows, axis=1)


def separable_pays(image_shape: tuple[int, int], kernel_size: int, rank: int) -> bool:
    """Whether rank-``rank`` separable correlations cost less than the FFT ones.

    Compares the multiply-adds of the products, ``r (w^2 M1 + w M0 M1)`` per
    correlation, with ``FFT_COST_FACTOR * N0 N1 log2(N0 N1)``.
    """
    n0, n1 = image_shape
    m0, m1 = n0 - kernel_size + 1, n1 - kernel_size + 1
    w = kernel_size
    separable = rank * (w * w * m1 + w * m0 * m1)
    fft = FFT_COST_FACTOR * n0 * n1 * np.log2(max(2, n0 * n1))
    return bool(separable <= fft)


def _cheapest_rank(image_shape: tuple[int, int], kernel_size: int) -> int:
    """The largest rank for which :func:`separable_pays` (0 if none)."""
    rank = 0
    while rank < 64 and separable_pays(image_shape, kernel_size, rank + 1):
        rank += 1
    return rank


def _toeplitz(factors: np.ndarray, w: int) -> np.ndarray:
    """``T[j, x, z] = factors[x + z, j]`` for the valid positions ``x``: shape ``(r, N - w + 1, w)``."""
    n = factors.shape[0]
    index = np.arange(n - w + 1)[:, None] + np.arange(w)[None, :]
    return np.moveaxis(factors[index], -1, 0)


def with_separable_operator(problem: Problem, u: ArrayLike, v_: ArrayLike) -> Problem:
    """``problem`` with correlations by separable products, for ``image = u @ v_.T``.

    ``u`` is ``N0 x r`` and ``v_`` is ``N1 x r`` (e.g. from :func:`separable_factors`).
    The caller vouches for the factorisation; :func:`make_problem` finds and checks it.
    """
    u, v_ = np.asarray(u, np.float64), np.asarray(v_, np.float64)
    n0, n1 = problem.image_shape
    if u.ndim != 2 or v_.ndim != 2 or u.shape[0] != n0 or v_.shape[0] != n1 or u.shape[1] != v_.shape[1]:
        raise ValueError(f"factors must be N0 x r and N1 x r for an image of shape {(n0, n1)}, got {u.shape} and {v_.shape}")
    w = problem.kernel_size
    tu, tv = _toeplitz(u, w), _toeplitz(v_, w)
    gu = np.einsum("ixa,jxb->ijab", tu, tu)  # T_{u_i}^T T_{u_j}
    gv = np.einsum("ixa,jxb->ijab", tv, tv)  # T_{v_i}^T T_{v_j}
    as_dtype = lambda x: jnp.asarray(x, problem.dtype)
    return dataclasses.replace(problem, toeplitz=(as_dtype(tu), as_dtype(tv)), gram=(as_dtype(gu), as_dtype(gv)))


# --- correlations --------------------------------------------------------------

def _rfft2_block(x: Array, shape: tuple[int, int]) -> Array:
    """``rfft2`` of ``x`` zero-padded to ``shape``; the row transforms run on ``x``'s rows only."""
    return jnp.fft.fft(jnp.fft.rfft(x, n=shape[1], axis=-1), n=shape[0], axis=-2)


def _irfft2_block(x_hat: Array, shape: tuple[int, int], out: tuple[int, int]) -> Array:
    """The top-left ``out`` block of ``irfft2(x_hat, s=shape)``; row transforms only for the rows kept."""
    rows = jnp.fft.ifft(x_hat, n=shape[0], axis=-2)[..., : out[0], :]
    return jnp.fft.irfft(rows, n=shape[1], axis=-1)[..., : out[1]]


def _adjoint(image_hat: Array, u: Array, shape: tuple[int, int], w: int) -> Array:
    """``C^T u``: ``(C^T u)(z) = sum_x u(x) I(x + z)`` for ``z`` in the ``w x w`` window."""
    u_hat = _rfft2_block(u, shape)
    return _irfft2_block(jnp.conj(u_hat) * image_hat, shape, (w, w)).astype(u.dtype)


_HIGHEST = lax.Precision.HIGHEST  # full float32 products on GPU too (no TF32)


def correlate(problem: Problem, kernel: Array) -> Array:
    """``C K``: the valid cross-correlation ``(K * I)(x)``, shape :attr:`Problem.output_shape`."""
    if problem.toeplitz is not None:
        tu, tv = problem.toeplitz
        # The contraction orders here and in correlate_adjoint (T_u first) were the fastest
        # under vmap on CPU of those timed (benchmarks/README.md, operator_choice.py).
        cols = jnp.einsum("jxa,ab->jxb", tu, kernel, precision=_HIGHEST)
        return jnp.einsum("jxb,jyb->xy", cols, tv, precision=_HIGHEST)
    shape = problem.image_shape
    k_hat = _rfft2_block(kernel, shape)
    return _irfft2_block(jnp.conj(k_hat) * problem.image_hat, shape, problem.output_shape).astype(kernel.dtype)


def correlate_adjoint(problem: Problem, u: Array) -> Array:
    """``C^T u`` for ``u`` of shape :attr:`Problem.output_shape`; returns ``w x w``."""
    if problem.toeplitz is not None:
        tu, tv = problem.toeplitz
        rows = jnp.einsum("jxa,xy->jay", tu, u, precision=_HIGHEST)  # T_{u_j}^T u
        return jnp.einsum("jay,jyb->ab", rows, tv, precision=_HIGHEST)
    return _adjoint(problem.image_hat, u, problem.image_shape, problem.kernel_size)


def normal_operator(problem: Problem, kernel: Array) -> Array:
    """``W C^T C W K``: the windowed normal operator behind every linearised model."""
    if problem.normal_matrix is not None:
        return jnp.matmul(problem.normal_matrix, kernel.reshape(-1), precision=_HIGHEST).reshape(kernel.shape)
    if problem.gram is not None:
        gu, gv = problem.gram
        left = jnp.einsum("ijab,bc->ijac", gu, kernel, precision=_HIGHEST)
        return jnp.einsum("ijac,jicd->ad", left, gv, precision=_HIGHEST)
    return correlate_adjoint(problem, correlate(problem, kernel))


def with_dense_operator(problem: Problem, *, batch: int = 256) -> Problem:
    """``problem`` with ``W C^T C W`` assembled as a dense symmetric matrix.

    Built column by column from FFT mat-vecs (``batch`` at a time), then
    symmetrised. Memory: ``w^4`` floats (64 MiB in float32 for ``w = 64``). Only
    the linearised models use it; the nonlinear model always correlates by FFT.
    """
    n = problem.kernel_size**2
    plain = dataclasses.replace(problem, normal_matrix=None)
    mat = _assemble_normal_matrix(plain, batch=min(batch, n))
    return dataclasses.replace(problem, normal_matrix=mat)


@functools.partial(jax.jit, static_argnames=("batch",))
def _assemble_normal_matrix(problem: Problem, *, batch: int) -> Array:
    w = problem.kernel_size
    n = w * w
    columns = jax.vmap(lambda e: normal_operator(problem, e.reshape(w, w)).reshape(-1))
    starts = jnp.arange(0, n, batch)

    def block(start):
        rows = start + jnp.arange(batch)
        eye = (rows[:, None] == jnp.arange(n)[None, :]).astype(problem.dtype)
        return columns(eye)

    mat = lax.map(block, starts).reshape(-1, n)[:n]  # row j = M e_j = column j of the symmetric M
    return 0.5 * (mat + mat.T)


# --- the model and its loss ------------------------------------------------------

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


_GRADIENTS = {
    "nonlinear": grad_nonlinear,
    "linear": grad_linear,
    "nonconstant": grad_nonconstant,
    "activated": grad_activated,
}


def gradient_fn(model: str):
    """The right-hand side ``G(problem, kernel, hyper)`` of ``model`` (one of :data:`MODELS`)."""
    v.check_choice("model", model, MODELS)
    return _GRADIENTS[model]


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


def check_kernel(problem: Problem, kernel: Any, name: str = "kernel") -> None:
    if tuple(np.shape(kernel)) != problem.kernel_shape:
        raise ValueError(f"{name} must have shape {problem.kernel_shape} (kernel_size={problem.kernel_size}), got {np.shape(kernel)}")
