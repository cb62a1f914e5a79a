"""Shared building blocks of the CIFAR networks: activations, conv/BN/linear
factories with the PyTorch-equivalent defaults, and a stateless max-pool.

Conventions (shared by :mod:`jaxcfl.nn.nets._resnet` and :mod:`jaxcfl.nn.nets._vgg`):

* NHWC tensors, as everywhere in JAX.
* Conv kernels: Kaiming-normal, ``fan_out`` mode, gain sqrt(2) (torchvision's
  ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``); no conv bias, since
  every conv is followed by BatchNorm, which has its own shift.
* BatchNorm: scale 1, bias 0, ``momentum=0.9`` and ``epsilon=1e-5`` (flax's
  ``momentum`` is the weight of the *old* running average, so 0.9 equals
  PyTorch's default ``momentum=0.1``). The running variance is the biased batch
  variance (PyTorch stores the unbiased one; the difference is a factor n/(n-1)).
* Linear: PyTorch's default weight init, uniform on ``[-1/sqrt(fan_in),
  1/sqrt(fan_in)]``; bias zero.

References:
  He, Zhang, Ren & Sun, "Delving deep into rectifiers", ICCV 2015 (Kaiming init).
  Ioffe & Szegedy, "Batch normalization", ICML 2015.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcfl._core.validate import check_choice, check_int, check_positive
from jaxcfl.nn.nets._conv import conv_general_dilated

__all__ = ["ACTIVATIONS", "BN_MOMENTUM", "BN_EPSILON", "check_common", "as_rngs", "check_input", "Activation",
    "MaxPool", "conv", "batch_norm", "linear"]

ACTIVATIONS = ("relu", "swish")

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
linear_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def check_common(num_classes: int, in_channels: int, activation: str, beta: float) -> tuple[int, int, str, float]:
    """Validate the constructor arguments every network shares."""
    num_classes = check_int("num_classes", num_classes, minimum=1)
    in_channels = check_int("in_channels", in_channels, minimum=1)
    activation = check_choice("activation", activation, ACTIVATIONS)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a real number, got {type(beta).__name__} {beta!r}")
    check_positive("beta", beta)
    return num_classes, in_channels, activation, float(beta)


def as_rngs(rngs: nnx.Rngs | int | None) -> nnx.Rngs:
    """``None`` -> ``nnx.Rngs(0)``; an int seed -> ``nnx.Rngs(seed)``; an ``nnx.Rngs`` as is."""
    if rngs is None:
        return nnx.Rngs(0)
    if isinstance(rngs, nnx.Rngs):
        return rngs
    if isinstance(rngs, (int, jax.Array)) and not isinstance(rngs, bool):
        return nnx.Rngs(rngs)
    raise TypeError(f"rngs must be an nnx.Rngs, an int seed or None, got {type(rngs).__name__}")


def check_input(x: Any, in_channels: int) -> jax.Array:
    """``x`` must be an NHWC batch with ``in_channels`` channels."""
    x = jnp.asarray(x)
    if x.ndim != 4 or x.shape[-1] != in_channels:
        raise ValueError(f"x must be an NHWC batch of shape (N, H, W, {in_channels}), got shape {x.shape}")
    return x


class Activation(nnx.Module):
    """ReLU, or Swish(x) = x * sigmoid(beta * x) (Ramachandran et al. 2017).

    Stateless: ``kind`` and ``beta`` are static Python values (part of the
    ``GraphDef``), so ``beta`` is a fixed hyperparameter, not a trainable one.
    """

    def __init__(self, kind: str = "relu", beta: float = 1.0):
        self.kind = check_choice("activation", kind, ACTIVATIONS)
        self.beta = float(check_positive("beta", beta))

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind == "relu":
            return jax.nn.relu(x)
        return x * jax.nn.sigmoid(self.beta * x)


class MaxPool(nnx.Module):
    """2x2 max-pool, stride 2, ``"SAME"`` padding (PyTorch ``ceil_mode=True``).

    The output side is ``ceil(n / 2)``; padded positions are ignored (they hold
    ``-inf``), so on even sizes this equals the usual ``"VALID"`` pool, and odd
    sizes (7 -> 4 on 28x28 inputs) still shrink to 1x1 instead of to 0.
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        return max_pool_2x2(x)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2, ``"SAME"`` padding, of channels-last ``x`` (``(..., H, W, C)``):
    ``nnx.max_pool(x, (2, 2), (2, 2), "SAME")``, the same bits forward and backward, at a
    fraction of the cost of its gradient on CPU.

    ``lax.reduce_window``'s derivative (``select_and_gather_add``, transposed to
    ``select_and_scatter_add``) runs on XLA's CPU backend through index arithmetic and a
    scatter: it took 60% of a training step of the built-in ``cnn``. Here the windows are the
    four strided quarters of ``x`` (odd sides padded with ``-inf`` at the end, as ``"SAME"``
    pads them), their maximum is taken in window order, and the derivative selects the tangent
    of the first maximal entry in window order, as ``select_and_scatter_add`` does: elementwise
    selects that fuse, and exact.
    """
    h, w = x.shape[-3], x.shape[-2]
    if h % 2 or w % 2:
        pad = [(0, 0)] * (x.ndim - 3) + [(0, h % 2), (0, w % 2), (0, 0)]
        x = jnp.pad(x, pad, constant_values=-jnp.inf)
    return _window_max(x)


def _quarters(x: jax.Array) -> tuple[jax.Array, ...]:
    """The entries of each 2x2 window in window (row-major) order: four ``(..., H/2, W/2, C)`` arrays."""
    return tuple(x[..., i::2, j::2, :] for i in (0, 1) for j in (0, 1))


@jax.custom_jvp
def _window_max(x: jax.Array) -> jax.Array:
    q = _quarters(x)
    return jnp.maximum(jnp.maximum(jnp.maximum(q[0], q[1]), q[2]), q[3])


@_window_max.defjvp
def _window_max_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    out = _window_max(x)
    q, tq = _quarters(x), _quarters(t)
    tangent = tq[3]
    for i in (2, 1, 0):  # the first maximal entry in window order wins, as in select_and_scatter_add
        tangent = jnp.where(q[i] == out, tq[i], tangent)
    return out, tangent


def conv(in_ch: int, out_ch: int, kernel: int, stride: int, *, rngs: nnx.Rngs) -> nnx.Conv:
    """Bias-free conv with PyTorch-style symmetric padding ``kernel // 2``, through
    :func:`jaxcfl.nn.nets.conv_general_dilated` (gradients fast inside loops on CPU)."""
    return nnx.Conv(
        in_ch,
        out_ch,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=kernel // 2,
        use_bias=False,
        kernel_init=conv_init,
        conv_general_dilated=conv_general_dilated,
        rngs=rngs,
    )


def batch_norm(features: int, *, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """BatchNorm in training mode (``use_running_average=False``), momentum 0.9, eps 1e-5."""
    return nnx.BatchNorm(
        features,
        use_running_average=False,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        rngs=rngs,
    )


def linear(in_features: int, out_features: int, *, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        in_features,
        out_features,
        kernel_init=linear_init,
        bias_init=nnx.initializers.zeros_init(),
        rngs=rngs,
    )
