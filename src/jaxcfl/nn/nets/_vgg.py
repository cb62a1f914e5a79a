"""VGG-11/13/16/19 with BatchNorm (configs A, B, D, E), CIFAR variant, in Flax NNX.

Feature extractor: the configuration's 3x3 convs (each conv-BN-act, padding 1,
no conv bias since BN follows) with five 2x2 max-pools. Classifier: the common
CIFAR variant, global average pool over what is left of the map followed by a
single ``Linear(512, num_classes)`` (no 4096-wide fully connected layers, no
dropout). Trainable parameters with 10 classes: VGG-11 9,228,362, VGG-13
9,413,066, VGG-16 14,724,042, VGG-19 20,035,018 (torchvision-style convs with
bias would add 2752, 2944, 4224 and 5504).

Small inputs: the pools use ``"SAME"`` padding (PyTorch ``ceil_mode=True``),
so the side goes 32 -> 16 -> 8 -> 4 -> 2 -> 1 for 32x32 inputs (identical to
the usual ``"VALID"`` pools) and 28 -> 14 -> 7 -> 4 -> 2 -> 1 for 28x28 inputs
(``"VALID"`` pools would reach 0 at the fifth pool). The final map is therefore
1x1 for both, and the global average pool is then a plain flatten.

Train / eval: NNX convention, as in :mod:`jaxcfl.nn.nets._resnet` (built in train
mode; ``model.eval()`` / ``model.train()``).

References:
  Simonyan & Zisserman, "Very deep convolutional networks for large-scale
  image recognition", ICLR 2015.
  Ioffe & Szegedy, "Batch normalization", ICML 2015.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcfl._core.validate import check_choice
from jaxcfl.nn.nets._layers import Activation, MaxPool, as_rngs, batch_norm, check_common, check_input, conv, linear

__all__ = ["POOLS", "CONFIGS", "AvgPool", "ConvBNAct", "VGG"]

POOLS = ("max", "avg")


class AvgPool(nnx.Module):
    """2x2 average pool, stride 2, ``"SAME"`` padding (the padded positions are not counted),
    the smooth twin of :class:`~jaxcfl.nn.nets._layers.MaxPool`."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2), padding="SAME", count_include_pad=False)

# Simonyan & Zisserman (2015), Table 1: integers are conv widths, "M" a max-pool.
CONFIGS: dict[int, tuple[int | str, ...]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),  # A
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),  # B
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),  # D
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),  # E
    4: (16, "M", 32, "M", 64, "M"),  # jaxcfl's "cnn": three conv-BN-act blocks, for quick checks on a CPU
}


class ConvBNAct(nnx.Module):
    """3x3 conv (stride 1, padding 1, no bias) -> BatchNorm -> activation."""

    def __init__(self, in_ch: int, out_ch: int, *, activation: str, beta: float, rngs: nnx.Rngs):
        self.conv = conv(in_ch, out_ch, 3, 1, rngs=rngs)
        self.bn = batch_norm(out_ch, rngs=rngs)
        self.act = Activation(activation, beta)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.act(self.bn(self.conv(x)))


class VGG(nnx.Module):
    """VGG with BatchNorm, CIFAR variant.

    Args:
      depth: 11, 13, 16 or 19 (8, 10, 13 or 16 convs plus 3 FC layers in the
        original; here the convs plus one linear classifier).
      num_classes: output logits.
      in_channels: input channels (3 for CIFAR, 1 for MNIST-like 28x28 inputs).
      activation: ``"relu"`` or ``"swish"`` (x * sigmoid(beta x)).
      beta: Swish's beta (> 0; ignored by ReLU).
      rngs: ``nnx.Rngs``, an int seed, or ``None`` for ``nnx.Rngs(0)``.
      pool: ``"max"`` (VGG's 2x2 max-pools) or ``"avg"`` (2x2 average pools, same
        ``"SAME"`` padding): a network with no discrete choice in its forward pass
        when the activation is Swish (``jaxcfl.nn.nets.create("cnn_avg")``).

    Calling ``model(x)`` with ``x`` of shape ``(N, H, W, in_channels)`` returns
    logits of shape ``(N, num_classes)``.

    References:
      Simonyan & Zisserman, ICLR 2015, Table 1.
    """

    def __init__(
        self,
        depth: int,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        activation: str = "relu",
        beta: float = 1.0,
        rngs: nnx.Rngs | int | None = None,
        pool: str = "max",
    ):
        pool = check_choice("pool", pool, POOLS)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth not in CONFIGS:  # 4: the small "cnn"
            raise ValueError(f"depth must be one of {tuple(CONFIGS)}, got {depth!r}")
        num_classes, in_channels, activation, beta = check_common(num_classes, in_channels, activation, beta)
        rngs = as_rngs(rngs)
        self.depth = depth
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.activation = activation
        self.beta = beta

        layers: list[nnx.Module] = []
        in_ch = in_channels
        for item in CONFIGS[depth]:
            if item == "M":
                layers.append(MaxPool() if pool == "max" else AvgPool())
            else:
                layers.append(ConvBNAct(in_ch, item, activation=activation, beta=beta, rngs=rngs))
                in_ch = item
        self.features = nnx.List(layers)
        self.fc = linear(in_ch, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = check_input(x, self.in_channels)
        for layer in self.features:
            x = layer(x)
        x = jnp.mean(x, axis=(1, 2))
        return self.fc(x)
