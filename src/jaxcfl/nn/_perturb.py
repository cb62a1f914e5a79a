"""Last-bit perturbations of SGD as optax transforms (Section 4, appendix B).

Perturbed SGD is plain SGD with the final update written as ``fl(lr k) * fl(d / k)``
(paper-notes section 2). In exact arithmetic ``k`` cancels; in floating point
it changes only the rounding of the update. ``k = 2^n`` is exact, so ``k`` and
``k 2^n`` train bit-identical networks (Table 2); odd ``k`` perturb the last bit,
and the training amplifies that perturbation (Tables 3 and 4).

The reference arithmetic, with every operation rounded on its own (no fused
multiply-add), in the dtype of the parameters::

    d   = g + wd * p                      # weight decay
    buf = mu * buf + d                    # momentum (PyTorch convention; buf_0 = 0)
    d   = d + mu * buf   if nesterov else buf
    u   = -( fl(lr * k) * fl(d / k) )     # the only place k enters

XLA would otherwise contract ``mu * buf + d`` into an FMA and turn ``d / k`` into
``d * (1/k)``; the primitives of :mod:`jaxcfl._core.rounding` prevent both, and
``tests/test_perturb.py`` checks every transform bit for bit against NumPy.

Building blocks compose with :func:`optax.chain` like optax's own:
:func:`rounded_decayed_weights`, :func:`rounded_trace`, :func:`scale_by_perturbed_lr`;
:func:`perturbed_sgd` is their chain. :func:`perturb_update` perturbs the final
update of any optimiser. :func:`ulp_perturb` moves chosen entries of a pytree by
one ulp.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import Array
from jax.typing import ArrayLike

from jaxcfl._core import validate as v
from jaxcfl._core.rounding import rounded_mul, scaled_update, true_divide

ScalarOrSchedule = float | ArrayLike | Callable[[Array], ArrayLike]

__all__ = [
    "PerturbedLrState",
    "perturb_update",
    "perturbed_sgd",
    "rounded_decayed_weights",
    "rounded_trace",
    "scale_by_perturbed_lr",
    "ulp_perturb",
]


def _tree_map(fn, *trees):
    """``jax.tree.map`` that passes ``None`` leaves (frozen parameters) through."""
    return jax.tree.map(lambda x, *rest: None if x is None else fn(x, *rest), *trees, is_leaf=lambda x: x is None)


def rounded_decayed_weights(weight_decay: ArrayLike = 0.0) -> optax.GradientTransformation:
    """``d = g + fl(wd p)``: weight decay added to the gradient with two roundings.

    Args:
      weight_decay: ``wd >= 0`` (may be traced).

    Returns:
      An :class:`optax.GradientTransformation`; its ``update`` needs ``params``.
    """
    v.check_nonnegative("weight_decay", weight_decay)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("rounded_decayed_weights needs params: call update(grads, state, params)")
        updates = _tree_map(lambda g, p: g + rounded_mul(jnp.asarray(weight_decay, g.dtype), p), updates, params)
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def rounded_trace(momentum: ArrayLike, nesterov: bool = False) -> optax.GradientTransformation:
    """Heavy-ball or Nesterov momentum in the PyTorch convention, without FMAs.

    ``buf <- fl(fl(mu buf) + d)``; the output is ``buf``, or ``fl(d + fl(mu buf))``
    with ``nesterov=True``. The same recursion as :func:`optax.trace`.

    Args:
      momentum: ``mu`` in ``[0, 1)`` (may be traced).
      nesterov: use Nesterov's look-ahead.

    Returns:
      An :class:`optax.GradientTransformation` with state :class:`optax.TraceState`.
    """
    v.check_unit_interval("momentum", momentum)

    def init_fn(params):
        return optax.TraceState(trace=optax.tree.zeros_like(params))

    def update_fn(updates, state, params=None):
        del params

        def push(d, buf):
            return rounded_mul(jnp.asarray(momentum, d.dtype), buf) + d

        trace = _tree_map(push, updates, state.trace)
        out = _tree_map(push, updates, trace) if nesterov else trace
        return out, optax.TraceState(trace=trace)

    return optax.GradientTransformation(init_fn, update_fn)


class PerturbedLrState(NamedTuple):
    """Step counter for learning-rate schedules."""

    count: Array


def _check_k(k: ArrayLike) -> None:
    """``k > 0``, with ``k`` and ``1/k`` normal numbers in JAX's default float dtype (float32 unless x64)."""
    v.check_positive("k", k)
    dtype = jax.dtypes.canonicalize_dtype(float)
    v.check_representable("k", k, dtype)
    if v.is_concrete(k):
        v.check_representable("1 / k", 1.0 / np.asarray(k, np.float64), dtype)


def _check_learning_rate(learning_rate: ScalarOrSchedule) -> None:
    if not callable(learning_rate):
        v.check_nonnegative("learning_rate", learning_rate)


def scale_by_perturbed_lr(learning_rate: ScalarOrSchedule, k: ArrayLike = 1.0) -> optax.GradientTransformation:
    """``u = -fl(lr k) * fl(d / k)``: the descent step with perturbation factor ``k``.

    Args:
      learning_rate: ``lr >= 0`` or an optax schedule ``count -> lr``.
      k: perturbation factor ``k > 0`` (may be traced, e.g. vmapped over copies).

    Returns:
      An :class:`optax.GradientTransformation` with state :class:`PerturbedLrState`.

    References:
      Sun et al., JMLR 25(174), 2024: Section 4 (perturbed SGD), appendix B.
    """
    _check_learning_rate(learning_rate)
    _check_k(k)

    def init_fn(params):
        del params
        return PerturbedLrState(count=jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        updates = _tree_map(lambda d: -scaled_update(lr, d, k), updates)
        return updates, PerturbedLrState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def perturbed_sgd(
    learning_rate: ScalarOrSchedule,
    k: ArrayLike = 1,
    *,
    momentum: ArrayLike = 0.0,
    nesterov: bool = False,
    weight_decay: ArrayLike = 0.0,
) -> optax.GradientTransformation:
    r"""SGD whose final update is ``-fl(lr k) fl(d / k)``: perturbed SGD of Section 4.

    .. math::
       d = g + wd\,p,\quad b \leftarrow \mu b + d,\quad
       d \leftarrow d + \mu b \ (\text{Nesterov}) \text{ or } b,\quad
       p \leftarrow p - \mathrm{fl}(lr\,k)\,\mathrm{fl}(d/k)

    Every operation is rounded on its own, bit for bit, after ``jit``, whether
    ``learning_rate`` and ``k`` are Python numbers or traced values. With ``k = 1``
    it equals ``optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum,
    nesterov=nesterov))`` evaluated op by op. ``k = 2^n`` is bit-identical to
    ``k = 1``; odd ``k`` perturb the last bit of each update.

    Args:
      learning_rate: ``lr >= 0``, or an optax schedule (e.g. step decay).
      k: perturbation factor ``k > 0``; traced values allow ``jax.vmap`` over copies.
      momentum: ``mu`` in ``[0, 1)``; 0 gives plain SGD (no momentum buffer is kept).
      nesterov: Nesterov momentum (PyTorch convention).
      weight_decay: ``wd >= 0``, added to the gradient as ``wd * p``.

    Returns:
      An :class:`optax.GradientTransformation`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from jaxcfl import perturbed_sgd
      >>> opt = perturbed_sgd(0.1, k=3, momentum=0.9, nesterov=True, weight_decay=5e-4)
      >>> params = {"w": jnp.ones(3)}
      >>> state = opt.init(params)
      >>> updates, state = opt.update({"w": jnp.full(3, 0.5)}, state, params)
      >>> params = optax.apply_updates(params, updates)

    References:
      Sun et al., JMLR 25(174), 2024: Section 4 and appendix B (Tables 2-4).
    """
    parts = []
    if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
        parts.append(rounded_decayed_weights(weight_decay))
    if not (isinstance(momentum, (int, float)) and momentum == 0):
        parts.append(rounded_trace(momentum, nesterov))
    elif nesterov:
        raise ValueError("nesterov=True needs momentum > 0")
    parts.append(scale_by_perturbed_lr(learning_rate, k))
    return optax.chain(*parts)


def perturb_update(k: ArrayLike) -> optax.GradientTransformation:
    """Perturb the final update of any optimiser: ``u -> fl(fl(u k) / k)``.

    Chain it last, e.g. ``optax.chain(optax.adam(1e-3), perturb_update(3))``.
    ``k = 2^n`` leaves every update unchanged bit for bit; odd ``k`` move some
    entries by one ulp.

    Args:
      k: perturbation factor ``k > 0`` (may be traced).

    Returns:
      A stateless :class:`optax.GradientTransformation`.
    """
    _check_k(k)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        return _tree_map(lambda u: true_divide(rounded_mul(u, jnp.asarray(k, u.dtype)), k), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def ulp_perturb(tree: Any, key: Array, *, fraction: float | None = None, direction: str = "random",
                count: int | None = None) -> Any:
    """Move chosen entries of the floating leaves of ``tree`` by one ulp (``jnp.nextafter``).

    Either a share of the entries of every leaf (``fraction``) or exactly ``count`` entries of the
    whole tree: ``count=1`` is Summers & Dinneen's "one-bit change" (ICML 2021), one weight of the
    whole network moved by one ulp.

    Args:
      tree: a pytree of arrays (initial weights, a data batch, ...).
      key: PRNG key (``jax.random.key``); it chooses the entries and the signs.
      fraction: share of the entries moved, in ``(0, 1]``; each entry is chosen
        independently with this probability. ``None``: 1 (every entry), unless ``count`` is given.
      direction: ``"random"`` (+-1 ulp with equal odds), ``"up"`` or ``"down"``.
      count: move exactly this many distinct entries, chosen uniformly at random among all
        the floating entries of all leaves together (not per leaf); an int in ``[1, number of
        floating entries]``, static under ``jit``. Leave ``fraction`` unset with it.

    Returns:
      A pytree like ``tree``; non-floating leaves are returned unchanged.
    """
    v.check_choice("direction", direction, ("random", "up", "down"))
    if count is not None and fraction is not None:
        raise ValueError(f"give count or fraction, not both (got count={count!r}, fraction={fraction!r})")
    if fraction is None:
        fraction = 1.0
    if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if count is not None:
        return jax.tree_util.tree_unflatten(treedef, _perturb_count(leaves, key, count, direction))
    keys = jax.random.split(key, max(len(leaves), 1))
    out = []
    for leaf, leaf_key in zip(leaves, keys):
        x = jnp.asarray(leaf)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            out.append(leaf)
            continue
        choose_key, sign_key = jax.random.split(leaf_key)
        chosen = jax.random.bernoulli(choose_key, fraction, x.shape)
        if direction == "random":
            up = jax.random.bernoulli(sign_key, 0.5, x.shape)
        else:
            up = jnp.full(x.shape, direction == "up")
        out.append(_step_ulp(x, chosen, up))
    return jax.tree_util.tree_unflatten(treedef, out)


def _step_ulp(x: Array, chosen: Array, up: Array) -> Array:
    """``x`` with the ``chosen`` entries moved one ulp up (where ``up``) or down."""
    target = jnp.where(up, jnp.asarray(jnp.inf, x.dtype), jnp.asarray(-jnp.inf, x.dtype))
    return jnp.where(chosen, jnp.nextafter(x, target), x)


def _perturb_count(leaves: list[Any], key: Array, count: Any, direction: str) -> list[Any]:
    """:func:`ulp_perturb` with ``count``: ``count`` distinct entries over all floating leaves together."""
    arrays = [jnp.asarray(leaf) for leaf in leaves]
    floating = [i for i, x in enumerate(arrays) if jnp.issubdtype(x.dtype, jnp.floating)]
    total = sum(arrays[i].size for i in floating)
    if total == 0:
        raise ValueError(f"count needs floating entries in the tree, and it has none (got count={count!r})")
    count = v.check_count("count", count, total, "distinct floating entries of the whole tree")
    choose_key, sign_key = jax.random.split(key)
    # A uniformly random subset of `count` distinct entries (one: a uniform index; more: a random permutation's head).
    if count == 1:
        picked = jax.random.randint(choose_key, (1,), 0, total)
    else:
        picked = jax.random.choice(choose_key, total, (count,), replace=False)
    chosen = jnp.zeros(total, bool).at[picked].set(True)
    if direction == "random":
        up = jax.random.bernoulli(sign_key, 0.5, (total,))
    else:
        up = jnp.full(total, direction == "up")
    out = list(leaves)
    offset = 0
    for i in floating:
        x = arrays[i]
        mask = chosen[offset:offset + x.size].reshape(x.shape)
        out[i] = _step_ulp(x, mask, up[offset:offset + x.size].reshape(x.shape))
        offset += x.size
    return out
