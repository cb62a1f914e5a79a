"""Pure-function view of the NNX networks, for ``jit`` / ``vmap`` / ``grad``.

The trainer keeps a model as three pieces::

    graphdef, params, batch_stats = split(model)
    logits, batch_stats = apply(graphdef, params, batch_stats, x, train=True)

``graphdef`` is static (hashable, no array leaves: it may be passed to a
jitted function as an ordinary argument, or closed over); ``params`` and
``batch_stats`` are ``nnx.State`` pytrees (their leaves are ``nnx.Param`` /
``nnx.BatchStat`` variables, which JAX flattens to their arrays).

``apply`` never mutates its inputs: it merges with ``copy=True``, sets the
train/eval mode on the fresh copy, runs it, and returns the copy's batch
statistics. In train mode BatchNorm normalises with the batch's own mean and
(biased) variance and the returned running averages are updated
(``new = 0.9 * old + 0.1 * batch``); in eval mode it normalises with the
running averages, which come back unchanged.

``k`` models in lockstep: stack ``k`` param / stat states along a new leading
axis (:func:`stack`) and ``jax.vmap(apply, in_axes=(None, 0, 0, x_axis))``;
each copy normalises with the statistics of its own batch. All models built by
:func:`jaxcfl.nn.nets.create` with the same name and arguments share one
``graphdef`` (whatever the seed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["split", "merge", "apply", "stack", "count_params"]


def split(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """Split ``model`` into ``(graphdef, params, batch_stats)``.

    Unlike a bare ``nnx.split(model, nnx.Param, nnx.BatchStat)``, whose states
    hold the model's own ``Variable`` objects (so a later train-mode call of
    ``model``, or of an eager ``nnx.merge`` of them, changes them in place),
    the returned states are decoupled from ``model`` (new variables around
    the same immutable arrays).

    Args:
      model: a network from :func:`jaxcfl.nn.nets.create` (any NNX module whose
        state is only ``nnx.Param`` and ``nnx.BatchStat``).

    Returns:
      ``(graphdef, params, batch_stats)``.
    """
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return graphdef, _copy(params), _copy(batch_stats)


def merge(graphdef: nnx.GraphDef, params: Any, batch_stats: Any, *, train: bool = False) -> nnx.Module:
    """A stateful model from the pieces (a copy: the inputs are not aliased).

    Args:
      graphdef, params, batch_stats: as returned by :func:`split` (unstacked).
      train: ``True`` for BatchNorm in training mode, ``False`` for eval mode.

    Returns:
      The ``nnx.Module``.
    """
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    if train:
        model.train()
    else:
        model.eval()
    return model


def apply(
    graphdef: nnx.GraphDef,
    params: Any,
    batch_stats: Any,
    x: jax.Array,
    *,
    train: bool,
) -> tuple[jax.Array, nnx.State]:
    """Pure forward pass.

    Args:
      graphdef, params, batch_stats: as returned by :func:`split`.
      x: NHWC batch ``(N, H, W, in_channels)``.
      train: BatchNorm mode (a Python bool: mark it static under ``jit``).

    Returns:
      ``(logits, new_batch_stats)``: logits ``(N, num_classes)``; the updated
      running statistics in train mode, the unchanged ones in eval mode.
    """
    model = merge(graphdef, params, batch_stats, train=train)
    logits = model(x)
    return logits, nnx.state(model, nnx.BatchStat)


def stack(trees: Sequence[Any]) -> Any:
    """Stack equally structured pytrees (e.g. ``params`` of k models) along a new axis 0."""
    if len(trees) == 0:
        raise ValueError("trees is empty; give at least one pytree to stack")
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def count_params(model_or_params: nnx.Module | Any) -> int:
    """Number of trainable scalars: the ``nnx.Param`` entries of a module, or
    all array entries of a params pytree (a stacked pytree counts every copy)."""
    if isinstance(model_or_params, nnx.Module):
        tree = nnx.state(model_or_params, nnx.Param)
    else:
        tree = model_or_params
    return int(sum(np.prod(np.shape(leaf), dtype=np.int64) for leaf in jax.tree.leaves(tree)))


def _copy(state: nnx.State) -> nnx.State:
    # jax.tree.map rebuilds every Variable; the (immutable) arrays are shared.
    return jax.tree.map(lambda a: a, state)
