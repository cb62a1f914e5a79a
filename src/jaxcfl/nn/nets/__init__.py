"""Flax NNX networks for the CIFAR-10 / MNIST-size experiments.

``create(name, ...)`` builds one of :data:`NETWORKS`: the CIFAR ResNets of He et
al. (2016) (``resnet20`` ... ``resnet110``, option-B projection shortcuts) and
VGG-11/13/16/19 with BatchNorm (Simonyan & Zisserman 2015, CIFAR variant with a
single linear classifier). All take NHWC inputs (32x32x3 or 28x28x1, or any
other size) and return logits; all take ``activation="relu"`` or ``"swish"``
(x * sigmoid(beta x)).

Models follow the NNX convention for BatchNorm: built in training mode;
``model.eval()`` / ``model.train()`` switch it. For pure functions of the
parameters (``jit``, ``vmap`` over k copies, ``grad``) use
:func:`jaxcfl.nets.split` and :func:`jaxcfl.nets.apply`.

Their convolutions use :func:`conv_general_dilated`, a drop-in for
``lax.conv_general_dilated`` whose gradients XLA's CPU backend runs at full speed
inside ``lax.scan`` (bit-identical results); pass it to your own ``nnx.Conv``
as ``conv_general_dilated=`` to get the same. :func:`canonical_convs` rewrites any
traced function's convolutions into that fast form (for a mat-vec or a step that
runs in a loop: the guard's and :func:`jaxcfl.sharpness`'s Hessian-vector products,
the trainer's chunks of steps). :func:`max_pool_2x2` is the 2x2 max-pool they use:
``nnx.max_pool``'s bits, with a derivative XLA's CPU backend runs without the scatter of
``reduce_window``'s (1.7x the training speed of the built-in ``cnn``).

References:
  He, Zhang, Ren & Sun, "Deep residual learning for image recognition", CVPR 2016.
  Simonyan & Zisserman, "Very deep convolutional networks for large-scale image
  recognition", ICLR 2015.
  Ioffe & Szegedy, "Batch normalization", ICML 2015.
"""

from __future__ import annotations

from flax import nnx

from jaxcfl._core.canonical import canonical_convs
from jaxcfl._core.validate import check_choice
from jaxcfl.nn.nets import _functional as functional
from jaxcfl.nn.nets._conv import conv_general_dilated
from jaxcfl.nn.nets._layers import ACTIVATIONS, Activation, max_pool_2x2
from jaxcfl.nn.nets._functional import apply, count_params, merge, split, stack
from jaxcfl.nn.nets._resnet import ResNet
from jaxcfl.nn.nets._vgg import VGG

_REGISTRY: dict[str, tuple[type[nnx.Module], int] | tuple[type[nnx.Module], int, dict]] = {
    "resnet20": (ResNet, 20),
    "resnet32": (ResNet, 32),
    "resnet44": (ResNet, 44),
    "resnet56": (ResNet, 56),
    "resnet110": (ResNet, 110),
    "vgg11": (VGG, 11),
    "vgg13": (VGG, 13),
    "vgg16": (VGG, 16),
    "vgg19": (VGG, 19),
    "cnn": (VGG, 4),
    "cnn_avg": (VGG, 4, {"pool": "avg"}),
}

NETWORKS: tuple[str, ...] = tuple(_REGISTRY)
"""The network names :func:`create` builds (not :data:`jaxcfl.MODELS`, the PDE's right-hand sides)."""


def create(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    activation: str = "relu",
    beta: float = 1.0,
    rngs: nnx.Rngs | int | None = None,
) -> nnx.Module:
    """Build the network ``name`` (one of :data:`NETWORKS`).

    Args:
      name: ``"resnet20"``, ``"resnet32"``, ``"resnet44"``, ``"resnet56"``,
        ``"resnet110"``, ``"vgg11"``, ``"vgg13"``, ``"vgg16"``, ``"vgg19"``, or
        ``"cnn"``: a small VGG-style network (three 3x3 conv-BN-act blocks of
        16/32/64 channels, each followed by a max-pool, then the linear
        classifier), for the determinism benchmark and quick checks; or
        ``"cnn_avg"``: the same with average pools (smooth with Swish).
      num_classes: number of logits (>= 1).
      in_channels: input channels (3 for CIFAR, 1 for 28x28 greyscale).
      activation: ``"relu"`` or ``"swish"``.
      beta: Swish's beta, > 0 (the paper uses 5); ignored by ReLU.
      rngs: ``nnx.Rngs`` for the initialisation, an int seed, or ``None``
        for ``nnx.Rngs(0)`` (a fresh one per call: equal calls give equal
        models).

    Returns:
      The ``nnx.Module`` (BatchNorm in training mode).

    Raises:
      ValueError: unknown ``name`` or ``activation``, ``beta <= 0``,
        ``num_classes < 1`` or ``in_channels < 1``.

    Example:
      >>> from flax import nnx
      >>> from jaxcfl import nets
      >>> nets.NETWORKS[-2:]
      ('cnn', 'cnn_avg')
      >>> model = nnx.eval_shape(lambda: nets.create("cnn", in_channels=1, rngs=0))  # shapes only
      >>> nets.count_params(model)
      24058
    """
    check_choice("model name", name, NETWORKS)
    cls, depth, *extra = _REGISTRY[name]
    return cls(
        depth,
        **(extra[0] if extra else {}),
        num_classes=num_classes,
        in_channels=in_channels,
        activation=activation,
        beta=beta,
        rngs=rngs,
    )


__all__ = [
    "ACTIVATIONS",
    "NETWORKS",
    "VGG",
    "Activation",
    "ResNet",
    "apply",
    "canonical_convs",
    "conv_general_dilated",
    "count_params",
    "create",
    "functional",
    "max_pool_2x2",
    "merge",
    "split",
    "stack",
]
