"""A convolution whose gradients XLA's CPU backend runs at full speed inside loops.

``lax.conv_general_dilated`` differentiates into two more convolutions: the input
gradient (the cotangent correlated with the flipped kernel, its in- and out-channel
dimensions swapped) and the weight gradient (the input correlated with the cotangent,
batch and feature dimensions swapped). JAX writes both with permuted *dimension
numbers*, e.g. ``b01f_01oi->b01f`` and ``f01b_i01o->01bf``. XLA's CPU compiler
rewrites such convolutions into the canonical ``b01f_01io->b01f`` form (explicit
transposes around a convolution that its Eigen/YNNPACK kernels run) only in the
entry computation. Inside the body of a ``while`` (``lax.scan``, ``lax.fori_loop``)
they stay as they are and are emitted as a naive loop nest: a scanned SGD step of a
small conv net runs 30-50x slower than the same steps as separate calls
(jax-ml/jax#12868; ``benchmarks/scan_step.py`` measures it).

:func:`conv_general_dilated` is a drop-in replacement with the same signature. Its
forward pass is ``lax.conv_general_dilated``; its derivative is written so that
JAX's own transposition rules produce the canonical form directly: the tangent in
the input is a convolution with an explicitly transposed kernel (``HWOI`` storage),
and the tangent in the kernel is a convolution of the explicitly transposed input
(``CHWN``) with the transposed kernel tangent. Transposing these (reverse mode)
gives canonical ``NHWC``/``HWIO`` convolutions with explicit transposes, i.e. the
very program XLA builds for the entry computation, so

* gradients are **bit-identical** to ``lax.conv_general_dilated``'s outside loops
  (tests/test_conv.py), and now also fast inside them;
* every transformation works: ``grad``, ``vmap``, forward-over-reverse
  Hessian-vector products (``jax.jvp`` of ``jax.grad``, what :mod:`jaxcfl.sharpness`
  uses) and reverse-over-reverse.

The weight gradient reads the input through that transpose, and XLA:CPU would fuse the
input's producers (a ResNet stage's BatchNorm-add-ReLU chains) into it and recompute them
there; the input is therefore stored first (:func:`stored`: the same bits, ResNet-20's CPU
training step 1.28x faster).

The fast path covers what CNNs use: channels-last operands (``NHWC``/``HWIO`` or the
1-D/3-D analogues, as flax's ``nnx.Conv`` passes them), any strides and explicit or
``"SAME"``/``"VALID"`` padding, no dilation, one feature group. Anything else is
passed to ``lax.conv_general_dilated`` unchanged.

Use it in your own Flax model with
``nnx.Conv(..., conv_general_dilated=jaxcfl.nn.nets.conv_general_dilated)``; the
built-in ResNets and VGGs already do.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array, lax
from jax.custom_derivatives import SymbolicZero

from jaxcfl._core.canonical import non_canonical_convolutions  # re-exported: the count the trainer checks

__all__ = ["conv_general_dilated", "non_canonical_convolutions"]


def _specs(d: int) -> tuple[lax.ConvDimensionNumbers, lax.ConvDimensionNumbers, lax.ConvDimensionNumbers]:
    """Dimension numbers for ``d`` spatial dimensions: the channels-last convolution, the
    tangent in its input (kernel stored with its two channel axes swapped) and the tangent in
    its kernel (input stored channels-first, batch-last; output spatial-first)."""
    spatial = tuple(range(1, d + 1))
    kernel_spatial = tuple(range(d))
    canonical = lax.ConvDimensionNumbers((0, d + 1) + spatial, (d + 1, d) + kernel_spatial, (0, d + 1) + spatial)
    # Transposed w.r.t. the input: JAX swaps the kernel's two feature entries, giving (d+1, d, ...).
    input_tangent = lax.ConvDimensionNumbers(canonical.lhs_spec, (d, d + 1) + kernel_spatial, canonical.out_spec)
    # Transposed w.r.t. the kernel: JAX swaps batch/feature of lhs and out and the kernel's features,
    # giving lhs (0, d+1, ...), cotangent as kernel (d+1, d, ...), result (0, d+1, ...): canonical.
    kernel_tangent = lax.ConvDimensionNumbers((d + 1, 0) + spatial, (d + 1, 0) + spatial, (d, d + 1) + kernel_spatial)
    return canonical, input_tangent, kernel_tangent


def _channels_first(x: Array) -> Array:
    """(N, S..., C) -> (C, S..., N)."""
    d = x.ndim - 2
    return jnp.transpose(x, (d + 1,) + tuple(range(1, d + 1)) + (0,))


@partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x: Array, w: Array, strides: tuple[int, ...], padding: tuple[tuple[int, int], ...],
          precision: Any, preferred: Any) -> Array:
    canonical = _specs(x.ndim - 2)[0]
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=canonical, precision=precision,
                                    preferred_element_type=preferred)


def _opaque_identity(x: Array) -> Array:
    """``x`` bit for bit, through a conditional whose predicate is always true but not known
    to XLA (an integer ORed with 1 is never 0): XLA keeps the conditional, and the branch
    boundary is one that its fusion passes never cross."""
    word = jnp.dtype(f"int{8 * x.dtype.itemsize}")
    probe = lax.bitcast_convert_type(x.reshape(-1)[0], word)
    return lax.cond((probe | jnp.ones((), word)) != 0, lambda a: a, lambda a: -a, x)


@jax.custom_batching.custom_vmap
def _stored_batchable(x: Array) -> Array:
    return _opaque_identity(x)


@_stored_batchable.def_vmap
def _stored_vmap(axis_size, in_batched, x):
    # The copies' stacked array through one conditional; vmap of the cond itself would batch its
    # predicate and turn it into a select, which XLA fuses like any elementwise operation.
    return _stored_batchable(x), in_batched[0]


@jax.custom_jvp
def _stored(x: Array) -> Array:
    return _stored_batchable(x)


@_stored.defjvp
def _stored_jvp(primals, tangents):
    return _stored(primals[0]), tangents[0]


def stored(x: Array) -> Array:
    """``x`` unchanged (bit for bit, values and derivatives), but computed once into a buffer
    of its own when a compiled program runs on XLA's CPU backend.

    XLA:CPU fuses cheap elementwise producers into every consumer, and recomputes them there
    rather than read a stored result. The weight gradient of a convolution reads its input
    through a transpose (``NHWC -> CHWN``), so the transpose's fusion recomputes the chain that
    produced the input: in a ResNet, the BatchNorm-add-ReLU chains of every block back to the
    stage's first, a fusion of up to 20 operands read in transposed order. An input stored
    first is transposed alone. The boundary is a conditional XLA cannot remove (see
    :func:`_opaque_identity`); a vmapped call passes the stacked array through one conditional;
    derivatives pass straight through. On other backends, and for non-floating or empty
    arrays, ``x`` is returned as it is.
    """
    if x.size == 0 or not jnp.issubdtype(x.dtype, jnp.floating) or jax.default_backend() != "cpu":
        return x
    return _stored(x)


@partial(_conv.defjvp, symbolic_zeros=True)
def _conv_jvp(strides, padding, precision, preferred, primals, tangents):
    x, w = primals
    tx, tw = tangents
    d = x.ndim - 2
    _, input_tangent, kernel_tangent = _specs(d)
    if not isinstance(tw, SymbolicZero):
        # The weight gradient transposes x: store x first, so that the transpose does not recompute
        # x's producers (benchmarks/README.md, "A stored input": ResNet-20's step 1.28x faster on CPU).
        x = stored(x)
    y = _conv(x, w, strides, padding, precision, preferred)
    out = []
    if not isinstance(tx, SymbolicZero):
        swapped = jnp.swapaxes(w, d, d + 1)  # (K..., Co, Ci), read by input_tangent as HWIO
        out.append(lax.conv_general_dilated(tx, swapped, strides, padding, dimension_numbers=input_tangent,
                                            precision=precision, preferred_element_type=preferred))
    if not isinstance(tw, SymbolicZero):
        kernel_first = jnp.transpose(tw, (d,) + tuple(range(d)) + (d + 1,))  # (Ci, K..., Co)
        spatial_first = lax.conv_general_dilated(_channels_first(x), kernel_first, strides, padding,
                                                 dimension_numbers=kernel_tangent, precision=precision,
                                                 preferred_element_type=preferred)  # (S..., N, Co)
        out.append(jnp.transpose(spatial_first, (d,) + tuple(range(d)) + (d + 1,)))
    if not out:
        return y, jnp.zeros_like(y)
    return y, out[0] if len(out) == 1 else out[0] + out[1]


def _is_unit(dilation: Sequence[int] | None) -> bool:
    return dilation is None or all(int(s) == 1 for s in dilation)


def conv_general_dilated(
    lhs: Array,
    rhs: Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    **kwargs: Any,
) -> Array:
    """``lax.conv_general_dilated`` with gradients that stay fast inside ``lax.scan`` on CPU.

    Same arguments and result as :func:`jax.lax.conv_general_dilated`. Channels-last,
    undilated, ungrouped convolutions take the loop-friendly derivative described in this
    module's docstring (bit-identical gradients); every other call is forwarded unchanged.
    """
    lhs = jnp.asarray(lhs)
    rhs = jnp.asarray(rhs)
    fast = (
        lhs.ndim >= 3
        and lhs.ndim == rhs.ndim
        and _is_unit(lhs_dilation)
        and _is_unit(rhs_dilation)
        and feature_group_count == 1
        and batch_group_count == 1
        and kwargs.get("out_sharding") is None
    )
    if fast:
        d = lhs.ndim - 2
        fast = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == _specs(d)[0]
    if not fast:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, batch_group_count, precision,
                                        preferred_element_type, **kwargs)
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(lhs.shape[1:-1], rhs.shape[:-2], strides, padding)
    else:
        pads = padding
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    return _conv(lhs, rhs, strides, pads, precision, preferred_element_type)
