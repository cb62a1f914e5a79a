"""CIFAR ResNets (He et al. 2016, Section 4.2) in Flax NNX.

Depth ``6n + 2``: a 3x3 conv stem with 16 channels, three stages of ``n`` basic
blocks with 16, 32 and 64 channels (stride 2 at the first block of stages 2 and
3), global average pooling and a linear classifier. ``6n + 2`` counts the 3x3
convs and the linear layer; the two 1x1 projection shortcuts are not counted,
as in the paper.

Shortcuts: identity where shapes agree, and **option B** (1x1 conv, stride 2,
followed by BatchNorm) in the two downsampling blocks. The paper's CIFAR models
use option A (identity with stride-2 subsampling and zero-padded channels,
parameter-free), as does the widely used PyTorch reproduction (akamaster's
``resnet.py``, its default ``option='A'``). Option B adds 2 x (in*out + 2*out)
= 576 + 2176 = 2752 parameters to every depth. Trainable parameters here
(option A in brackets; the paper's Table 6 rounds those): ResNet-20 272,474
(269,722; 0.27M), ResNet-32 466,906 (464,154; 0.46M), ResNet-44 661,338
(658,586; 0.66M), ResNet-56 855,770 (853,018; 0.85M), ResNet-110 1,730,714
(1,727,962; 1.7M).

Train / eval: NNX convention. BatchNorm layers are built in training mode
(batch statistics, running averages updated on every call); ``model.eval()``
switches them to the running averages, ``model.train()`` back. ``__call__``
takes only ``x``. For the pure, jit/vmap-friendly form see
:mod:`jaxcfl.nets.functional`.

References:
  He, Zhang, Ren & Sun, "Deep residual learning for image recognition",
  CVPR 2016.
  Ioffe & Szegedy, "Batch normalization", ICML 2015.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcfl.nn.nets._layers import Activation, as_rngs, batch_norm, check_common, check_input, conv, linear

__all__ = ["DEPTHS", "STAGE_WIDTHS", "Shortcut", "BasicBlock", "ResNet"]

DEPTHS = (20, 32, 44, 56, 110)
STAGE_WIDTHS = (16, 32, 64)


class Shortcut(nnx.Module):
    """Option-B projection: 1x1 conv with stride ``stride``, then BatchNorm."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, *, rngs: nnx.Rngs):
        self.conv = conv(in_ch, out_ch, 1, stride, rngs=rngs)
        self.bn = batch_norm(out_ch, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.conv(x))


class BasicBlock(nnx.Module):
    """conv3x3-BN-act-conv3x3-BN, plus the shortcut, then act."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, *, activation: str, beta: float, rngs: nnx.Rngs):
        self.conv1 = conv(in_ch, out_ch, 3, stride, rngs=rngs)
        self.bn1 = batch_norm(out_ch, rngs=rngs)
        self.conv2 = conv(out_ch, out_ch, 3, 1, rngs=rngs)
        self.bn2 = batch_norm(out_ch, rngs=rngs)
        self.act = Activation(activation, beta)
        if stride != 1 or in_ch != out_ch:
            self.shortcut = Shortcut(in_ch, out_ch, stride, rngs=rngs)
        else:
            self.shortcut = None

    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.shortcut is None else self.shortcut(x)
        return self.act(out + skip)


class ResNet(nnx.Module):
    """CIFAR ResNet of depth ``6n + 2``.

    Args:
      depth: ``6n + 2`` with ``n >= 1`` (20, 32, 44, 56, 110 are the paper's).
      num_classes: output logits.
      in_channels: input channels (3 for CIFAR, 1 for MNIST-like 28x28 inputs).
      activation: ``"relu"`` or ``"swish"`` (x * sigmoid(beta x)).
      beta: Swish's beta (> 0; ignored by ReLU).
      rngs: ``nnx.Rngs``, an int seed, or ``None`` for ``nnx.Rngs(0)``.

    Calling ``model(x)`` with ``x`` of shape ``(N, H, W, in_channels)`` returns
    logits of shape ``(N, num_classes)``; any H, W >= 1 work (32x32 -> 8x8 and
    28x28 -> 7x7 feature maps before the global average pool).

    References:
      He et al., "Deep residual learning for image recognition", CVPR 2016, Sec. 4.2.
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
    ):
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (e.g. {DEPTHS}), got {depth!r}")
        num_classes, in_channels, activation, beta = check_common(num_classes, in_channels, activation, beta)
        rngs = as_rngs(rngs)
        self.depth = depth
        self.num_blocks = (depth - 2) // 6
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.activation = activation
        self.beta = beta

        self.stem_conv = conv(in_channels, STAGE_WIDTHS[0], 3, 1, rngs=rngs)
        self.stem_bn = batch_norm(STAGE_WIDTHS[0], rngs=rngs)
        self.stem_act = Activation(activation, beta)
        blocks = []
        in_ch = STAGE_WIDTHS[0]
        for stage, width in enumerate(STAGE_WIDTHS):
            for i in range(self.num_blocks):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(BasicBlock(in_ch, width, stride, activation=activation, beta=beta, rngs=rngs))
                in_ch = width
        self.blocks = nnx.List(blocks)
        self.fc = linear(in_ch, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = check_input(x, self.in_channels)
        x = self.stem_act(self.stem_bn(self.stem_conv(x)))
        for block in self.blocks:
            x = block(x)
        x = jnp.mean(x, axis=(1, 2))
        return self.fc(x)
