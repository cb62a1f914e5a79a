"""Compile options for the training engine's programs on XLA's CPU backend.

This jaxlib hands three kinds of operation to the YNNPACK library by default (the debug
option ``xla_cpu_experimental_ynn_fusion_type``: individual dots, individual convolutions,
reductions). For the convolutions of a CNN's training step, XLA's own Eigen kernels are
faster: YNNPACK takes every 2-D ``NHWC``/``HWIO`` float convolution with more than 16 channels
on one side, which includes every weight gradient (its "channels" are the batch), and runs
those slowly. :func:`training_compiler_options` keeps dots and reductions on YNNPACK and sends
convolutions to Eigen, for each compiled program of :class:`jaxcfl.Lockstep` alone (XLA's
``compiler_options``; nothing global is set). Measured on a 2-core CPU (``benchmarks/README.md``,
"Convolutions on Eigen"): ResNet-20's training step 1.23x faster, the built-in ``cnn``'s 1.05x,
VGG-16's unchanged, and every one compiles faster.

The bits of a CPU training step differ from those of the same step compiled with XLA's
defaults (another kernel sums in another order); runs of jaxcfl agree with each other, since
every program of the engine is compiled the same way. A user who sets the option in
``XLA_FLAGS`` keeps their choice, and a jaxlib without the option is left at its defaults.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["YNN_OPTION", "CONVOLUTIONS_ON_EIGEN", "training_compiler_options", "jit"]

YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
"""XLA's debug option that lists the kinds of operation sent to YNNPACK."""

CONVOLUTIONS_ON_EIGEN = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
"""The option's value: XLA's default list without ``LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION``."""


@functools.cache
def training_compiler_options() -> tuple[tuple[str, str], ...]:
    """``((YNN_OPTION, CONVOLUTIONS_ON_EIGEN),)`` on a CPU backend that accepts it, where
    ``XLA_FLAGS`` does not set the option already; ``()`` otherwise."""
    if jax.default_backend() != "cpu" or YNN_OPTION in os.environ.get("XLA_FLAGS", ""):
        return ()
    try:  # an option this jaxlib does not know is an error at compile time: ask once
        jax.jit(lambda a: a + 1).lower(jnp.zeros((), jnp.float32)).compile(
            compiler_options={YNN_OPTION: CONVOLUTIONS_ON_EIGEN})
    except Exception:  # noqa: BLE001 - any refusal means: leave XLA's defaults alone
        return ()
    return ((YNN_OPTION, CONVOLUTIONS_ON_EIGEN),)


def jit(fn: Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
    """``jax.jit(fn, **kwargs)`` with :func:`training_compiler_options`."""
    options = dict(training_compiler_options())
    return jax.jit(fn, compiler_options=options or None, **kwargs)
