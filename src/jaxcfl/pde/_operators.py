"""The correlation operator ``C`` of the one-layer CNN, as values: three back-ends, one choice.

``C K`` is the valid cross-correlation ``(K * I)(x) = sum_z K(z) I(x + z)`` of a
``w x w`` kernel with the image, ``C^T u`` its adjoint restricted to the window,
and ``W C^T C W`` the windowed normal operator behind every linearised model
(eqs 19-20). Each back-end below is a frozen pytree with the same three methods,
so the right-hand sides (:mod:`jaxcfl.pde._rhs`) never ask which one runs:

==============  ======================================================================
``fft``         any image: real FFTs of the image's size. A valid correlation needs
                no padding (the circular one agrees with it on every valid output);
                the 2-D transforms are split into row and column passes so that the
                rows known to be zero (a ``w x w`` kernel in an ``N x N`` grid) or
                not needed (a ``w x w`` adjoint output) are never transformed, and
                spectra are kept transposed so that every pass runs along the last
                axis and no ``N``-row array is ever transposed.
``separable``   an image of low rank ``r``, ``I = sum_j u_j v_j^T`` (the checkerboard
                has ``r = 1``): with ``T_u[x, z] = u[x + z]``,
                ``C K = sum_j T_{u_j} K T_{v_j}^T``, ``C^T R = sum_j T_{u_j}^T R T_{v_j}``
                and ``W C^T C W K = sum_{i,j} (T_{u_i}^T T_{u_j}) K (T_{v_j}^T T_{v_i})``:
                ``2 r (w^2 M + w M^2)`` multiply-adds per correlation pair and
                ``2 r^2 w^3`` for the normal operator, instead of four ``N x N`` FFTs.
``dense``       ``W C^T C W`` assembled as a ``w^2 x w^2`` matrix (one GEMM for a
                whole batch of configurations); correlations go to the FFT or
                separable back-end it was built from.
==============  ======================================================================

Each back-end also says how a batch of configurations is best mapped over it
(:meth:`FFTOperator.map_batch`): a step made of matrix products is one wide
``vmap``; a correlation-bound step runs :data:`FFT_MAP_BATCH` configurations at a
time, which on CPU keeps the transforms' working set in cache.

:func:`choose_operator` is the one place where ``operator="auto"`` is resolved,
for :func:`jaxcfl.make_problem` and :func:`jaxcfl.sweep` alike. Same scheme,
different rounding: the back-ends agree to rounding, not bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax
from jax.typing import ArrayLike, DTypeLike

from jaxcfl._core import validate as v

__all__ = ["OPERATORS", "FFT_COST_FACTOR", "AUTO_MAX_RANK", "DENSE_LIMIT", "FFT_MAP_BATCH", "FFTOperator",
    "SeparableOperator", "separable_factors", "separable_pays", "DenseOperator", "choose_operator"]
OPERATORS = ("auto", "fft", "separable", "dense")
# Break-even of "auto": separable products are used while their multiply-adds per
# correlation stay below FFT_COST_FACTOR * N0 N1 log2(N0 N1). Measured on CPU with
# benchmarks/operator_choice.py (see benchmarks/README.md): the break-even lies at
# 14-20 for 256 x 256 images and above 5-10 (the largest measured) for 64-128 pixel
# images; a least-squares fit of all the time differences gives 15.5.
FFT_COST_FACTOR = 14.0
# "auto" looks for at most this many factors: the separable path is for images of low rank,
# and a generic image (full rank) keeps the FFT path even where a full factorisation would pay.
AUTO_MAX_RANK = 8
DENSE_LIMIT = 64 * 64  # largest w^2 for which "auto" assembles the dense operator (64 MiB in float32)
FFT_MAP_BATCH = 8  # configurations per vmapped group when a step is correlation-bound (FFT or separable)

_HIGHEST = lax.Precision.HIGHEST  # full float32 products on GPU too (no TF32)


def _static(**kw):
    return dataclasses.field(metadata=dict(static=True), **kw)


# --- FFT -------------------------------------------------------------------------------

def _swap(x: Array) -> Array:
    return jnp.swapaxes(x, -1, -2)


def _rfft2_t(x: Array, shape: tuple[int, int]) -> Array:
    """``rfft2(x, s=shape)`` transposed, shape ``(..., shape[1] // 2 + 1, shape[0])``.

    Row transforms on ``x``'s rows only (the padding rows are zero); the small
    ``(rows, shape[1] // 2 + 1)`` result is transposed so that the column
    transforms, too, run along the last axis.
    """
    rows = jnp.fft.rfft(x, n=shape[1], axis=-1)
    return jnp.fft.fft(_swap(rows), n=shape[0], axis=-1)


def _irfft2_t(x_hat_t: Array, shape: tuple[int, int], out: tuple[int, int]) -> Array:
    """The top-left ``out`` block of ``irfft2(x_hat, s=shape)``, given ``x_hat`` transposed (as :func:`_rfft2_t`).

    Column transforms along the last axis, keeping ``out[0]`` rows; then one transpose
    of the kept block, and row transforms for those rows only.
    """
    cols = jnp.fft.ifft(x_hat_t, n=shape[0], axis=-1)[..., : out[0]]
    return jnp.fft.irfft(_swap(cols), n=shape[1], axis=-1)[..., : out[1]]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FFTOperator:
    """Correlations by real FFTs of the image's size; the image's transform is computed once.

    Spectra are kept transposed, ``image_hat_t = rfft2(I).T`` of shape
    ``(N1 // 2 + 1, N0)``: XLA's FFTs run along the last axis, so each 2-D
    transform is a pass along rows, one transpose of the smaller of its two
    intermediates (``w`` or ``M`` rows, not ``N``) and a pass along the last axis
    again. The passes are the 1-D transforms that ``jnp.fft.rfft2``/``irfft2`` make
    of the padded arrays, so the results agree with theirs to rounding (on the CPU,
    bit for bit).
    """

    name: ClassVar[str] = "fft"
    image_hat_t: Array
    image_shape: tuple[int, int] = _static()
    kernel_size: int = _static()

    @classmethod
    def build(cls, image: Array, kernel_size: int) -> "FFTOperator":
        return cls(_swap(jnp.fft.rfft2(image)), tuple(image.shape), kernel_size)

    @property
    def image_hat(self) -> Array:
        """``rfft2(I)``, shape ``(N0, N1 // 2 + 1)``."""
        return _swap(self.image_hat_t)

    @property
    def output_shape(self) -> tuple[int, int]:
        return _output_shape(self.image_shape, self.kernel_size)

    def correlate(self, kernel: Array) -> Array:
        """``C K``, shape :attr:`output_shape`."""
        k_hat = _rfft2_t(kernel, self.image_shape)
        return _irfft2_t(jnp.conj(k_hat) * self.image_hat_t, self.image_shape, self.output_shape).astype(kernel.dtype)

    def adjoint(self, u: Array) -> Array:
        """``C^T u``: ``(C^T u)(z) = sum_x u(x) I(x + z)`` for ``z`` in the ``w x w`` window."""
        u_hat = _rfft2_t(u, self.image_shape)
        w = self.kernel_size
        return _irfft2_t(jnp.conj(u_hat) * self.image_hat_t, self.image_shape, (w, w)).astype(u.dtype)

    def normal(self, kernel: Array) -> Array:
        """``W C^T C W K``."""
        return self.adjoint(self.correlate(kernel))

    def map_batch(self, linearised: bool) -> int | None:
        """Configurations per vmapped group (``None``: one wide ``vmap``); FFTs prefer small groups."""
        return FFT_MAP_BATCH


# --- separable (low-rank) images ------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SeparableOperator:
    """Correlations by products with the Toeplitz stacks of a rank-``r`` image's factors.

    ``toeplitz = (T_u, T_v)``, shapes ``(r, M0, w)`` and ``(r, M1, w)``;
    ``gram = (T_{u_i}^T T_{u_j}, T_{v_i}^T T_{v_j})``, shapes ``(r, r, w, w)``.
    """

    name: ClassVar[str] = "separable"
    toeplitz: tuple[Array, Array]
    gram: tuple[Array, Array]

    @classmethod
    def from_factors(cls, u: ArrayLike, v_: ArrayLike, kernel_size: int, dtype: DTypeLike) -> "SeparableOperator":
        """From ``image = u @ v_.T`` (``N0 x r`` and ``N1 x r``); built in float64, stored in ``dtype``."""
        u, v_ = np.asarray(u, np.float64), np.asarray(v_, np.float64)
        tu, tv = _toeplitz(u, kernel_size), _toeplitz(v_, kernel_size)
        gu = np.einsum("ixa,jxb->ijab", tu, tu)  # T_{u_i}^T T_{u_j}
        gv = np.einsum("ixa,jxb->ijab", tv, tv)  # T_{v_i}^T T_{v_j}
        as_dtype = lambda x: jnp.asarray(x, dtype)
        return cls(toeplitz=(as_dtype(tu), as_dtype(tv)), gram=(as_dtype(gu), as_dtype(gv)))

    @property
    def rank(self) -> int:
        return int(self.toeplitz[0].shape[0])

    @property
    def kernel_size(self) -> int:
        return int(self.toeplitz[0].shape[-1])

    def correlate(self, kernel: Array) -> Array:
        tu, tv = self.toeplitz
        # The contraction orders here and in adjoint (T_u first) were the fastest
        # under vmap on CPU of those timed (benchmarks/README.md, operator_choice.py).
        cols = jnp.einsum("jxa,ab->jxb", tu, kernel, precision=_HIGHEST)
        return jnp.einsum("jxb,jyb->xy", cols, tv, precision=_HIGHEST)

    def adjoint(self, u: Array) -> Array:
        tu, tv = self.toeplitz
        rows = jnp.einsum("jxa,xy->jay", tu, u, precision=_HIGHEST)  # T_{u_j}^T u
        return jnp.einsum("jay,jyb->ab", rows, tv, precision=_HIGHEST)

    def normal(self, kernel: Array) -> Array:
        gu, gv = self.gram
        left = jnp.einsum("ijab,bc->ijac", gu, kernel, precision=_HIGHEST)
        return jnp.einsum("ijac,jicd->ad", left, gv, precision=_HIGHEST)

    def map_batch(self, linearised: bool) -> int | None:
        """A linearised step is small matrix products (one wide ``vmap``); correlations go in groups."""
        return None if linearised else FFT_MAP_BATCH


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
    m0, m1 = _output_shape(image_shape, kernel_size)
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


# --- dense normal matrix ----------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseOperator:
    """``W C^T C W`` as a dense symmetric ``w^2 x w^2`` matrix; correlations by ``base``."""

    name: ClassVar[str] = "dense"
    matrix: Array
    base: Union[FFTOperator, SeparableOperator]

    @classmethod
    def assemble(cls, base: "FFTOperator | SeparableOperator", dtype: DTypeLike, *, batch: int = 256) -> "DenseOperator":
        """Built column by column from ``base``'s normal operator (``batch`` at a time), then symmetrised."""
        n = base.kernel_size**2
        return cls(matrix=_assemble(base, dtype=jnp.dtype(dtype), batch=min(batch, n)), base=base)

    @property
    def kernel_size(self) -> int:
        return self.base.kernel_size

    def correlate(self, kernel: Array) -> Array:
        return self.base.correlate(kernel)

    def adjoint(self, u: Array) -> Array:
        return self.base.adjoint(u)

    def normal(self, kernel: Array) -> Array:
        return jnp.matmul(self.matrix, kernel.reshape(-1), precision=_HIGHEST).reshape(kernel.shape)

    def map_batch(self, linearised: bool) -> int | None:
        """A linearised step is one GEMM for a whole batch (one wide ``vmap``)."""
        return None if linearised else self.base.map_batch(False)


@functools.partial(jax.jit, static_argnames=("dtype", "batch"))
def _assemble(base, *, dtype, batch: int) -> Array:
    w = base.kernel_size
    n = w * w
    columns = jax.vmap(lambda e: base.normal(e.reshape(w, w)).reshape(-1))

    def block(start):
        rows = start + jnp.arange(batch)
        eye = (rows[:, None] == jnp.arange(n)[None, :]).astype(dtype)
        return columns(eye)

    mat = lax.map(block, jnp.arange(0, n, batch)).reshape(-1, n)[:n]  # row j = M e_j = column j of the symmetric M
    return 0.5 * (mat + mat.T)


Operator = Union[FFTOperator, SeparableOperator, DenseOperator]


# --- the choice -------------------------------------------------------------------------

def _output_shape(image_shape: tuple[int, int], kernel_size: int) -> tuple[int, int]:
    return (image_shape[0] - kernel_size + 1, image_shape[1] - kernel_size + 1)


def choose_operator(operator: str, image: ArrayLike, img: Array, kernel_size: int, *, linearised: bool | None = None,
                    max_rank: int | None = None) -> Operator:
    """The back-end that ``operator`` names for ``image`` (already cast to ``img``), resolving ``"auto"``.

    * ``"fft"``: always possible.
    * ``"separable"``: needs a concrete image with at most ``max_rank`` factors.
    * ``"dense"``: the FFT back-end plus the assembled normal matrix; only for
      the linearised models (``linearised=False``, the nonlinear model, is refused).
    * ``"auto"``: separable when the image is concrete, has at most ``max_rank``
      factors (default: the largest rank for which :func:`separable_pays`, at
      most :data:`AUTO_MAX_RANK`), else FFT. When the model is linearised
      (``linearised=True``) and ``w^2 <= DENSE_LIMIT``, the dense matrix is taken instead where
      its ``w^4`` multiply-adds undercut the back-end's normal operator
      (always over FFT; over separable when ``w^4 < 2 r^2 w^3``).

    ``linearised`` is the stepped model's :attr:`jaxcfl.pde.Model.linearised` (``None``: not known).
    """
    v.check_choice("operator", operator, OPERATORS)
    if max_rank is not None:
        max_rank = v.check_int("max_rank", max_rank, minimum=1)
    if operator == "dense" and linearised is not None and not linearised:
        raise ValueError("operator='dense' applies to the linearised models only; the nonlinear model needs "
                         "operator='fft' or 'separable'")
    shape = tuple(img.shape)
    fft = FFTOperator.build(img, kernel_size)
    base: FFTOperator | SeparableOperator = fft
    if operator in ("auto", "separable"):
        if not v.is_concrete(image):
            if operator == "separable":
                raise ValueError("operator='separable' needs a concrete image (its factors are found on the host); "
                                 "this one is traced: build the problem outside jit, or use operator='fft'")
        else:
            limit = max_rank if max_rank is not None else min(AUTO_MAX_RANK, _cheapest_rank(shape, kernel_size))
            factors = separable_factors(image, max_rank=limit, dtype=img.dtype) if limit >= 1 else None
            if factors is not None:
                base = SeparableOperator.from_factors(*factors, kernel_size, img.dtype)
            elif operator == "separable":
                raise ValueError(f"operator='separable': the image has no separable factorisation of rank <= {limit} "
                                 f"(max_rank) to the precision of {np.dtype(img.dtype).name}; use operator='fft'")
    dense = operator == "dense"
    if operator == "auto" and linearised and kernel_size**2 <= DENSE_LIMIT:
        # Normal operator: 2 r^2 w^3 multiply-adds (separable) against w^4 (dense).
        dense = base is fft or kernel_size**2 < 2 * base.rank**2 * kernel_size
    return DenseOperator.assemble(base, img.dtype) if dense else base
