"""The CFL guard: a step size kept inside the local stability bound of its scheme.

Sun et al. (JMLR 2024) explain the extreme sensitivity of training by *restrained
instabilities*: steps that break the local CFL condition, are bounded by the
nonlinearity, and amplify every last-bit error. Their extended discussion (appendix A) proposes
learning rates adapted in time so that every step satisfies the local stability
condition. :func:`cfl_guard` is that learning rate, as an optax transform.

For SGD with momentum ``mu`` (PyTorch convention, as :func:`jaxcfl.nn._perturb.perturbed_sgd`)
a quadratic mode of curvature ``l`` is stable iff ``lr l < S(mu)``
(:func:`jaxcfl.pde._schemes.momentum_limit`: ``2`` for plain gradient descent, eq 21;
``2 (1 + mu)`` for heavy ball; ``2 (1 + mu) / (1 + 2 mu)`` for Nesterov, eqs 37-38).
The guard estimates the top eigenvalue ``lambda_max`` of the Hessian of the objective,
weight decay included, and takes the step

    lr_eff = min(lr, safety * S(mu) / lambda_max)

by scaling the optimiser's final update by ``lr_eff / lr``. In the PyTorch convention the
learning rate multiplies the momentum buffer at each step, so this scaling *is* a
learning-rate schedule: the optimiser with the guard is the optimiser with ``lr_eff``.

``lambda_max`` comes from Lanczos on Hessian-vector products (:func:`jaxcfl._core.spectral.lanczos_eigh`,
``jax.jvp`` of ``jax.grad``), refreshed every ``every`` steps and warm-started from the
previous top eigenvector, so that a refresh converges in a few iterations. The estimate
is the top Ritz value plus its residual bound, which errs on the side of a smaller step.

References:
  Sun et al., "A PDE-based Explanation of Extreme Numerical Sensitivities and Edge of
  Stability in Training Neural Networks", JMLR 2024: Sections 3-5 (eqs 21-23, 36-38) and
  appendix A (the open question: do adaptive, stability-keeping steps remove the variance?).
  Cohen et al., "Gradient Descent on Neural Networks Typically Occurs at the Edge of
  Stability", ICLR 2021.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import Array, lax
from jax.flatten_util import ravel_pytree
from jax.typing import ArrayLike

from jaxcfl._core import validate as v
from jaxcfl.nn._perturb import PerturbedLrState
from jaxcfl._core.stability import guarded_step_size, momentum_limit
from jaxcfl._core.spectral import lanczos_eigh

ScalarOrSchedule = float | ArrayLike | Callable[[Array], ArrayLike]

__all__ = ["DEFAULTS", "CFLGuardState", "GuardDefaults", "cfl_guard", "check_guarded", "guard_state", "guarded_lr",
           "refresh_due"]


class GuardDefaults(NamedTuple):
    """The network guard's defaults, in one place: :func:`cfl_guard`, :class:`jaxcfl.nn._preset.TrainConfig`
    and ``jaxcfl reproduce open-question`` take them from :data:`DEFAULTS`.

    Measured on the built-in ``cnn`` (``benchmarks/cfl_guard.py``, ``docs/cfl_guard.md``): they cost
    22-26% of a training step on a 2-core CPU and stayed within 15% of a 48-iteration sharpness.
    The guard on the PDE (:class:`jaxcfl.pde._schemes.GuardSchedule`) has its own schedule, measured on
    Figure 4's problem: a refresh every 10 iterations and at every one of the first 20.
    """

    safety: float = 0.9
    every: int = 20
    iterations: int = 4
    first_iterations: int = 20


DEFAULTS = GuardDefaults()


class CFLGuardState(NamedTuple):
    """State of :func:`cfl_guard`: what a user plots along a run.

    Attributes:
      count: steps taken.
      lambda_max: the current estimate of the top Hessian eigenvalue of the objective,
        weight decay included (``nan`` before the first step).
      lr: the effective learning rate of the last step, ``min(lr, safety S / lambda_max)``.
      base_lr: the optimiser's learning rate at the last step (its schedule's value).
      vector: the flat top-eigenvector estimate: the warm start of the next refresh.
    """

    count: Array
    lambda_max: Array
    lr: Array
    base_lr: Array
    vector: Array


def guarded_lr(lr: ArrayLike, lambda_max: ArrayLike, *, safety: ArrayLike = DEFAULTS.safety, momentum: ArrayLike = 0.0,
               nesterov: bool = False) -> Array:
    """``min(lr, safety * S(momentum) / lambda_max)``: the step inside the stability region.

    ``S`` is :func:`jaxcfl.pde._schemes.momentum_limit`. A ``lambda_max`` that is not a finite
    positive number leaves ``lr`` unchanged (no mode to keep stable, or nothing known).
    Every argument but ``nesterov`` may be traced.
    """
    lr = jnp.asarray(lr)
    limit = jnp.asarray(safety, lr.dtype) * jnp.asarray(momentum_limit(momentum, nesterov), lr.dtype)
    return guarded_step_size(lr, lambda_max, limit)


def _check(learning_rate, momentum, nesterov, weight_decay, safety, every, iterations) -> None:
    if not callable(learning_rate):
        v.check_positive("learning_rate", learning_rate)
    v.check_unit_interval("momentum", momentum)
    if nesterov and v.is_concrete(momentum) and float(momentum) == 0.0:
        raise ValueError("nesterov=True needs momentum > 0")
    v.check_nonnegative("weight_decay", weight_decay)
    v.check_safety("safety", safety)
    if v.is_concrete(every) and (isinstance(every, bool) or not float(every).is_integer() or every < 1):
        raise ValueError(f"every must be an integer >= 1 (steps between refreshes of lambda_max), got {every!r}")
    v.check_int("iterations", iterations, minimum=1)


def cfl_guard(
    learning_rate: ScalarOrSchedule,
    *,
    momentum: ArrayLike = 0.0,
    nesterov: bool = False,
    weight_decay: ArrayLike = 0.0,
    safety: ArrayLike = DEFAULTS.safety,
    every: int | ArrayLike = DEFAULTS.every,
    iterations: int = DEFAULTS.iterations,
    first_iterations: int = DEFAULTS.first_iterations,
    key: Array | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Keep every step of an SGD optimiser inside its local stability region.

    Chain it after the optimiser whose step it guards, with that optimiser's numbers::

        opt = optax.chain(perturbed_sgd(lr, k, momentum=0.9, weight_decay=wd),
                          cfl_guard(lr, momentum=0.9, weight_decay=wd))
        updates, state = opt.update(grads, state, params, value_fn=lambda p: loss(p, batch))

    The objective comes through the extra argument ``value_fn`` (``params -> scalar``, the
    loss *without* weight decay, which the guard adds), as :func:`optax.scale_by_zoom_linesearch`
    takes it. ``perturb_update`` chains after the guard as after any optimiser; with
    ``perturbed_sgd`` before it, ``k = 2^n`` stays bit-identical to ``k = 1``.

    Args:
      learning_rate: the optimiser's ``lr > 0``, or its optax schedule ``count -> lr``
        (the guard counts steps as the optimiser does).
      momentum: the optimiser's ``mu`` in ``[0, 1)``.
      nesterov: whether the optimiser uses Nesterov momentum (static).
      weight_decay: the optimiser's ``wd >= 0``; its Hessian adds ``wd`` to every eigenvalue.
      safety: the margin in ``(0, 1]``: ``lr_eff lambda_max <= safety S``.
      every: refresh ``lambda_max`` every ``every`` steps (the first step always refreshes).
      iterations: Lanczos iterations per refresh (static; at most the number of parameters).
        The defaults (20, 4) cost 22-26% of a training step of the built-in-data ``cnn`` on a
        2-core CPU, and the warm-started estimates stayed within 15% of a 48-iteration
        sharpness along its first 240 steps (``benchmarks/cfl_guard.py``, ``docs/cfl_guard.md``).
      first_iterations: Lanczos iterations of the first estimate, whose start vector is random
        (static). A random vector barely sees an outlying top eigenvalue: on the built-in
        ``cnn`` two iterations from it estimated 0.16 where twenty estimated 7.2. Unrolled like
        the others: in a loop, on CPU, it took 11 s instead of 1.5 s (compiling it unrolled
        took about 16 s, once per program).
      key: PRNG key of the first start vector and of restarts (default ``jax.random.key(0)``).

    Every number but ``nesterov`` and ``iterations`` may be a traced array: new values never
    recompile. The state (:class:`CFLGuardState`) records ``lambda_max`` and the effective lr.

    When to refresh: by default the program decides (``lax.cond`` on the step count). On
    XLA's CPU backend a convolution inside a ``lax.cond`` branch runs about 10x slower than
    outside one, and under ``jax.vmap`` (copies in lockstep) the branch becomes a select
    that estimates at every step. A caller that knows the step on the host passes
    ``update(..., refresh=refresh_due(step, every))`` instead: ``"first"`` at step 0, then
    ``True`` every ``every`` steps and ``False`` between, and compiles one program for each
    value, so that no branch runs in any of them.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; its ``update`` needs ``params`` and
      ``value_fn``.

    Raises:
      ValueError: a number outside its range (naming it), or, at ``update``, a missing
        ``params`` or ``value_fn``.
    """
    _check(learning_rate, momentum, nesterov, weight_decay, safety, every, iterations)
    v.check_int("first_iterations", first_iterations, minimum=1)
    key = jax.random.key(0) if key is None else key

    def init_fn(params):
        flat, _ = ravel_pytree(params)
        start = jax.random.normal(key, flat.shape, flat.dtype)
        nan = jnp.full((), jnp.nan, flat.dtype)
        return CFLGuardState(count=jnp.zeros((), jnp.int32), lambda_max=nan, lr=nan, base_lr=nan, vector=start)

    def update_fn(updates, state, params=None, *, value_fn=None, refresh=None, **extra_args):
        del extra_args
        if refresh is not None and not (isinstance(refresh, (bool, np.bool_)) or refresh == "first"):
            raise TypeError(f"refresh must be None, a Python bool or 'first' (it chooses the compiled program), "
                            f"got {refresh!r:.40}")
        if params is None:
            raise ValueError("cfl_guard needs params: call update(updates, state, params, value_fn=...)")
        if value_fn is None or not callable(value_fn):
            raise ValueError("cfl_guard needs the objective: pass value_fn=(params -> loss) to update()")
        flat, unravel = ravel_pytree(params)
        dtype = flat.dtype
        decay = jnp.asarray(weight_decay, dtype)
        grad = jax.grad(value_fn)

        def hvp(vec):
            _, tangent = jax.jvp(grad, (params,), (unravel(vec),))
            return ravel_pytree(tangent)[0].astype(dtype) + decay * vec

        def estimate(first: bool = False):
            n_iter = min(first_iterations if first else iterations, flat.size)
            # Unrolled: in a loop, XLA's CPU backend runs convolutions about 10x slower.
            pairs = lanczos_eigh(hvp, state.vector, jax.random.fold_in(key, state.count), iterations=n_iter, k=1,
                                 unroll=True)
            # The Ritz value plus its residual bound: errs towards a larger lambda, a smaller step.
            return (pairs.values[0] + pairs.residuals[0]).astype(dtype), pairs.vectors[0].astype(dtype)

        def keep():
            return state.lambda_max, state.vector

        if refresh is None:  # the schedule, in the program: a refresh every `every` steps
            due = (state.count % jnp.asarray(every, state.count.dtype)) == 0
            lam, vector = lax.cond(state.count == 0, lambda: estimate(first=True),
                                   lambda: lax.cond(due, estimate, keep))
        elif refresh == "first":  # the caller's choice, made on the host: no branch in the program
            lam, vector = estimate(first=True)
        else:
            lam, vector = estimate() if refresh else keep()
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        lr = jnp.asarray(lr, dtype)
        lr_eff = guarded_lr(lr, lam, safety=safety, momentum=momentum, nesterov=nesterov)
        scale = jnp.where(lr > 0, lr_eff / jnp.where(lr > 0, lr, 1), 1)
        updates = jax.tree.map(lambda u: None if u is None else (u * scale.astype(u.dtype)), updates,
                               is_leaf=lambda x: x is None)
        return updates, CFLGuardState(count=optax.safe_increment(state.count), lambda_max=lam, lr=lr_eff,
                                      base_lr=lr, vector=vector)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def refresh_due(step: int, every: int) -> bool | str:
    """What step ``step`` (0-based, host-side) does with ``lambda_max`` under :func:`cfl_guard`'s
    schedule: ``"first"`` (the first estimate, step 0), ``True`` (a warm refresh, every ``every``
    steps) or ``False``. For callers that pass ``update(..., refresh=...)``."""
    step = int(step)
    if step == 0:
        return "first"
    return step % int(every) == 0


def guard_state(opt_state: Any) -> CFLGuardState | None:
    """The :class:`CFLGuardState` inside an optimiser state (e.g. of an ``optax.chain``), or ``None``."""
    found = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, CFLGuardState))
             if isinstance(s, CFLGuardState)]
    return found[0] if found else None


_SGD_STATES = (optax.EmptyState, optax.TraceState, optax.ScaleByScheduleState, PerturbedLrState)
"""States of the transforms whose step the guard's limits describe: SGD (plain, heavy ball, Nesterov,
PyTorch convention), weight decay, lr schedules, and the perturbation (``optax.sgd``,
:func:`jaxcfl.perturbed_sgd`, ``optax.add_decayed_weights``, ``optax.scale_by_schedule``...)."""


def _states_in_order(tree: Any):
    """The transforms' states of an optimiser state, in the order of their chain (wrappers opened)."""
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        inner = getattr(tree, "inner_state", None)
        if inner is not None:  # inject_hyperparams, masked, ...: the wrapped transform's state
            yield from _states_in_order(inner)
        else:
            yield tree
    elif isinstance(tree, (tuple, list)):
        for item in tree:
            yield from _states_in_order(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _states_in_order(item)


def check_guarded(opt_state: Any) -> None:
    """Refuse a :func:`cfl_guard` that guards an optimiser whose stability limit it does not know.

    The guard keeps ``lr lambda_max`` below the limit of SGD (:func:`jaxcfl.pde._schemes.momentum_limit`),
    which is wrong for an adaptive optimiser (Adam's limit is on the *preconditioned* sharpness,
    Cohen et al. 2022). Every transform chained before the guard must be one of SGD's
    (:data:`_SGD_STATES`: SGD, momentum, weight decay, schedules, the perturbation), and only
    stateless ones (``perturb_update``) may follow it. :class:`jaxcfl.Lockstep` calls this on every
    optimiser; call it yourself on ``optimizer.init(params)`` when you use the guard without it.

    Raises:
      ValueError: naming the state of the transform the guard does not know.
    """
    states = list(_states_in_order(opt_state))
    at = [i for i, s in enumerate(states) if isinstance(s, CFLGuardState)]
    if not at:
        return
    unknown = [type(s).__name__ for s in states[:at[0]] if not isinstance(s, _SGD_STATES)]
    if unknown:
        raise ValueError(f"cfl_guard follows a transform whose stability limit it does not know (state "
                         f"{', '.join(unknown)}): it knows SGD's (plain, heavy ball, Nesterov); an adaptive "
                         f"optimiser such as Adam is stable on its preconditioned sharpness instead, which the "
                         f"guard does not estimate")
    after = [type(s).__name__ for s in states[at[0] + 1:] if not isinstance(s, optax.EmptyState)]
    if len(at) > 1 or after:
        raise ValueError(f"cfl_guard must be the last stateful transform of the chain (after it: "
                         f"{', '.join(after) or 'another cfl_guard'}); chain only perturb_update after it")
