"""The CFL guard: a step size kept inside the local stability bound of its scheme.

Sun et al. (JMLR 2024) explain the extreme sensitivity of training by *restrained
instabilities*: steps that break the local CFL condition, are bounded by the
nonlinearity, and amplify every last-bit error. Their extended discussion (appendix A) proposes
learning rates adapted in time so that every step satisfies the local stability
condition. :func:`cfl_guard` is that learning rate, as an optax transform.

For SGD with momentum ``mu`` (PyTorch convention, as :func:`jaxcfl.perturbed_sgd`)
a quadratic mode of curvature ``l`` is stable iff ``lr l < S(mu)``
(:func:`jaxcfl.limits.momentum_limit`: ``2`` for plain gradient descent, eq 21;
``2 (1 + mu)`` for heavy ball; ``2 (1 + mu) / (1 + 2 mu)`` for Nesterov, eqs 37-38).
The guard estimates the top eigenvalue ``lambda_max`` of the Hessian of the objective,
weight decay included, and takes the step

    lr_eff = min(lr, safety * S(mu) / lambda_max)

by scaling the optimiser's final update by ``lr_eff / lr``. In the PyTorch convention the
learning rate multiplies the momentum buffer at each step, so this scaling *is* a
learning-rate schedule: the optimiser with the guard is the optimiser with ``lr_eff``.

``lambda_max`` comes from Lanczos on Hessian-vector products (:func:`jaxcfl.spectral.lanczos_eigh`,
``jax.jvp`` of ``jax.grad``), refreshed every ``every`` steps and warm-started from the
previous top eigenvector, so that a refresh converges in a few iterations. The estimate
is the top Ritz value plus its residual bound, which errs on the side of a smaller step.
Lanczos runs as a compiled loop over one product whose convolutions
:func:`jaxcfl.canonical_convs` writes in the form XLA's CPU backend runs fast
inside a loop (see :func:`cfl_guard`, "Compile time").

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
from jaxcfl._core.canonical import canonical_convs
from jaxcfl.nn._perturb import PerturbedLrState
from jaxcfl._core.stability import guarded_step_size, momentum_limit
from jaxcfl._core.spectral import lanczos_eigh

ScalarOrSchedule = float | ArrayLike | Callable[[Array], ArrayLike]

__all__ = ["DEFAULTS", "CFLGuardState", "GuardDefaults", "adopt_estimate", "cfl_guard", "check_guarded",
           "guard_problems", "guard_state", "guarded_lr", "refresh_due", "warn_guard_problems"]


class GuardDefaults(NamedTuple):
    """The network guard's defaults, in one place: :func:`cfl_guard`, :class:`jaxcfl.TrainConfig`
    and ``jaxcfl reproduce open-question`` take them from :data:`DEFAULTS`.

    Measured on the built-in ``cnn`` (``benchmarks/cfl_guard.py``, ``docs/cfl_guard.md``): they cost
    22-26% of a training step on a 2-core CPU and stayed within 15% of a 48-iteration sharpness.
    The guard on the PDE (:class:`jaxcfl.GuardSchedule`) has its own schedule, measured on
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
      failed_estimates: refreshes whose estimate was not a finite number (a ``value_fn``
        that returned NaN, say). The guard fails closed: the last finite ``lambda_max``
        (and its vector) stay in force, and with none yet the step is refused.
      refused_steps: steps whose update the guard set to zero: no finite ``lambda_max``
        known yet, or a schedule's learning rate that was negative or not finite.
      bad_lr: steps whose schedule gave a negative or non-finite learning rate (refused).

    The three counters are never reset; :func:`guard_problems` reads them on the host.
    """

    count: Array
    lambda_max: Array
    lr: Array
    base_lr: Array
    vector: Array
    failed_estimates: Array
    refused_steps: Array
    bad_lr: Array


def guarded_lr(lr: ArrayLike, lambda_max: ArrayLike, *, safety: ArrayLike = DEFAULTS.safety, momentum: ArrayLike = 0.0,
               nesterov: bool = False) -> Array:
    """``min(lr, safety * S(momentum) / lambda_max)``: the step inside the stability region.

    ``S`` is :func:`jaxcfl.limits.momentum_limit`. A ``lambda_max`` that is not a finite
    positive number leaves ``lr`` unchanged (no mode to keep stable, or nothing known).
    Every argument but ``nesterov`` may be traced.
    """
    lr = jnp.asarray(lr)
    limit = jnp.asarray(safety, lr.dtype) * jnp.asarray(momentum_limit(momentum, nesterov), lr.dtype)
    return guarded_step_size(lr, lambda_max, limit)


_MAX_COUNT = int(np.iinfo(np.int32).max)
"""The largest step count the guard's int32 counter holds (and so the largest ``every``)."""


def _check_key(key: Any) -> Any:
    """A PRNG key (``jax.random.key(seed)``, or a legacy ``uint32[2]`` one), else ``TypeError`` naming ``key``."""
    dtype = getattr(key, "dtype", None)
    typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    raw = dtype == np.uint32 and np.shape(key) == (2,)
    if not (typed or raw) or (typed and np.ndim(key) != 0):
        got = f"shape {np.shape(key)} and dtype {dtype}" if dtype is not None else f"{type(key).__name__} {key!r:.60}"
        raise TypeError(f"key must be one PRNG key, e.g. jax.random.key(0), got {got}")
    return key


def _check(learning_rate, momentum, nesterov, weight_decay, safety, every, iterations) -> None:
    if not callable(learning_rate):
        v.check_positive("learning_rate", learning_rate)
    v.check_unit_interval("momentum", momentum)
    if nesterov and v.is_concrete(momentum) and float(momentum) == 0.0:
        raise ValueError("nesterov=True needs momentum > 0")
    v.check_nonnegative("weight_decay", weight_decay)
    v.check_safety("safety", safety)
    if v.is_concrete(every) and (isinstance(every, bool) or np.ndim(every) != 0 or not np.isfinite(float(every))
                                 or not float(every).is_integer() or not 1 <= every <= _MAX_COUNT):
        raise ValueError(f"every must be an integer in [1, {_MAX_COUNT}] (steps between refreshes of lambda_max), "
                         f"got {every!r:.40}")
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
        ``cnn`` two iterations from it estimated 0.16 where twenty estimated 7.2. A compiled
        loop, as every estimate is (see "Compile time" below).
      key: PRNG key of the first start vector and of restarts (default ``jax.random.key(0)``).

    Every number but ``nesterov`` and ``iterations`` may be a traced array: new values never
    recompile. The state (:class:`CFLGuardState`) records ``lambda_max`` and the effective lr.

    The guard fails closed. A refresh whose estimate is not finite (a ``value_fn`` that
    returns NaN) keeps the last finite ``lambda_max`` in force; with none yet, the step is
    refused (its update set to zero). A schedule's negative or non-finite learning rate is
    refused too. The state counts each case (``failed_estimates``, ``refused_steps``,
    ``bad_lr``); :func:`guard_problems` says them in words, and an ``update`` run outside
    ``jit`` warns at once (``RuntimeWarning``).

    When to refresh: by default the program decides (``lax.cond`` on the step count). Under
    ``jax.vmap`` (copies in lockstep) the branch becomes a select that estimates at every
    step; without ``vmap`` it costs little (the built-in ``cnn``: 27.8% overhead against 24.6%,
    ``benchmarks/cfl_guard.py``, variant ``in-program``). A caller that knows the step on the
    host passes ``update(..., refresh=refresh_due(step, every))`` instead: ``"first"`` at step 0,
    then ``True`` every ``every`` steps and ``False`` between, and compiles one program for each
    value, so that no branch runs in any of them (:class:`jaxcfl.Lockstep` does). ``"first"`` and
    ``True`` are the same estimate: its iteration count is traced, ``first_iterations`` at the
    guard's step 0 and ``iterations`` after (the Krylov basis sized for the larger), so a caller
    may pass ``True`` for both and compile one program (``Lockstep`` does).

    Compile time: Lanczos runs as a ``lax.fori_loop`` over one Hessian-vector product, not
    ``first_iterations`` products unrolled. Inside a loop XLA's CPU backend runs only the
    canonical form of a convolution fast, and the product's forward-mode tangents are not
    in it, so the product goes through :func:`jaxcfl.canonical_convs` (without it, the loop ran
    4-5x slower). On a quiet 2-core CPU the program of the first estimate compiled 3.3x faster
    than unrolled for one copy of the built-in ``cnn``, 6.4x for six copies in lockstep and 7.1x
    for ``resnet20``; a loop shares no work between products, so an estimate of six copies ran
    1.4x longer and their mean step 11% longer (``benchmarks/guard_compile.py``,
    ``benchmarks/README.md``). Since the first estimate and the refreshes share one program
    and ``Lockstep`` runs it as a program of its own (a refresh with everything but the estimate
    dropped, :func:`adopt_estimate`, then the plain step; 2026-12-08), a guarded run compiles the
    plain step and this estimate program: for one ``cnn`` copy the estimate compiled 4.3-5.7x
    faster than the unrolled guard's first program (3.4-3.7 s against 15-21 s; all programs
    4.4-5.1x), for six copies 9.7x (7.9x), for ``resnet20`` 10.5x (9.2x).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; its ``update`` needs ``params`` and
      ``value_fn``.

    Raises:
      ValueError: a number outside its range (naming it), or, at ``update``, a missing
        ``params`` or ``value_fn``.
    """
    _check(learning_rate, momentum, nesterov, weight_decay, safety, every, iterations)
    v.check_int("first_iterations", first_iterations, minimum=1)
    key = jax.random.key(0) if key is None else _check_key(key)

    def init_fn(params):
        flat, _ = ravel_pytree(params)
        start = jax.random.normal(key, flat.shape, flat.dtype)
        nan = jnp.full((), jnp.nan, flat.dtype)
        zero = jnp.zeros((), jnp.int32)
        return CFLGuardState(count=zero, lambda_max=nan, lr=nan, base_lr=nan, vector=start, failed_estimates=zero,
                             refused_steps=zero, bad_lr=zero)

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

        first_n, refresh_n = min(first_iterations, flat.size), min(iterations, flat.size)

        def estimate(first: bool = False):
            # One program for the first estimate and the refreshes: the iteration count is traced
            # (first_n at count 0), the Krylov basis sized for the larger. A compiled loop, its
            # convolutions canonical (fast inside it on CPU: _core/canonical.py).
            active = first_n if first else jnp.where(state.count == 0, first_n, refresh_n)
            pairs = lanczos_eigh(canonical_convs(hvp), state.vector, jax.random.fold_in(key, state.count),
                                 iterations=max(first_n, refresh_n), k=1, active=active)
            # The Ritz value plus its residual bound: errs towards a larger lambda, a smaller step.
            lam, vec = (pairs.values[0] + pairs.residuals[0]).astype(dtype), pairs.vectors[0].astype(dtype)
            # Fail closed: a non-finite estimate (value_fn gave NaN, ...) keeps the last finite one in force.
            ok = jnp.isfinite(lam) & jnp.all(jnp.isfinite(vec))
            return jnp.where(ok, lam, state.lambda_max), jnp.where(ok, vec, state.vector), ~ok

        def keep():
            return state.lambda_max, state.vector, jnp.zeros((), bool)

        if refresh is None:  # the schedule, in the program: a refresh every `every` steps
            due = (state.count % jnp.asarray(every, state.count.dtype)) == 0
            lam, vector, failed = lax.cond(due | (state.count == 0), estimate, keep)
        elif refresh == "first":  # the caller's choice, made on the host: no branch in the program
            lam, vector, failed = estimate(first=True)
        else:
            lam, vector, failed = estimate() if refresh else keep()
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        lr = jnp.asarray(lr, dtype)
        lr_ok = jnp.isfinite(lr) & (lr >= 0)  # a schedule's negative or NaN lr never passes
        known = jnp.isfinite(lam)  # no finite estimate yet: the step is refused, not left uncapped
        lr_eff = jnp.where(lr_ok & known, guarded_lr(jnp.where(lr_ok, lr, 0), lam, safety=safety, momentum=momentum,
                                                     nesterov=nesterov), 0)
        scale = jnp.where(lr_ok & known, jnp.where(lr > 0, lr_eff / jnp.where(lr > 0, lr, 1), 1), 0)
        passes = lr_ok & known  # a refused step is exactly zero, even where the incoming update is NaN
        updates = jax.tree.map(lambda u: None if u is None else jnp.where(passes, u * scale.astype(u.dtype),
                                                                           jnp.zeros_like(u)),
                               updates, is_leaf=lambda x: x is None)
        if v.is_concrete((failed, lr_ok, known)):  # run op by op, not traced: say so at once
            _warn_now(bool(failed), bool(lr_ok), bool(known), lr)
        one = jnp.ones((), jnp.int32)
        return updates, CFLGuardState(
            count=optax.safe_increment(state.count), lambda_max=lam, lr=lr_eff, base_lr=lr, vector=vector,
            failed_estimates=state.failed_estimates + jnp.where(failed, one, 0),
            refused_steps=state.refused_steps + jnp.where(lr_ok & known, 0, one),
            bad_lr=state.bad_lr + jnp.where(lr_ok, 0, one))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _warn_now(failed: bool, lr_ok: bool, known: bool, lr: Array) -> None:
    """The warnings of one step that ran outside ``jit`` (inside it, read :func:`guard_problems`)."""
    import warnings

    if failed:
        warnings.warn("cfl_guard: the estimate of lambda_max is not finite (value_fn returned NaN or inf?); "
                      "the last finite estimate (if any) stays in force", RuntimeWarning, stacklevel=3)
    if not lr_ok:
        warnings.warn(f"cfl_guard: the learning rate is {float(lr)!r}, negative or not finite; the step is refused "
                      f"(update set to zero)", RuntimeWarning, stacklevel=3)
    elif not known:
        warnings.warn("cfl_guard: no finite lambda_max is known yet; the step is refused (update set to zero)",
                      RuntimeWarning, stacklevel=3)


def refresh_due(step: int, every: int) -> bool | str:
    """What step ``step`` (0-based, host-side) does with ``lambda_max`` under :func:`cfl_guard`'s
    schedule: ``"first"`` (the first estimate, step 0), ``True`` (a warm refresh, every ``every``
    steps) or ``False``. For callers that pass ``update(..., refresh=...)``.

    Raises:
      ValueError: ``step`` is not an integer >= 0, or ``every`` not an integer >= 1.
    """
    whole = []
    for name, value, minimum in (("step", step, 0), ("every", every, 1)):
        try:
            number = None if isinstance(value, bool) else float(value)
        except (TypeError, ValueError):
            number = None
        if number is None or not np.isfinite(number) or not number.is_integer() or number < minimum:
            raise ValueError(f"refresh_due: {name} must be an integer >= {minimum}, got {value!r:.40}")
        whole.append(int(number))
    step, every = whole
    if step == 0:
        return "first"
    return step % every == 0


def guard_problems(state: CFLGuardState) -> list[str]:
    """What went wrong in a guard's run so far, in words (host-side; ``[]``: nothing).

    Reads the counters of :class:`CFLGuardState` (a lockstep state's counters are summed over
    its copies): failed estimates (the last finite ``lambda_max`` kept, or the step refused),
    refused steps, and steps whose schedule gave a negative or non-finite learning rate.
    A trainer reports them; :func:`warn_guard_problems` turns them into a warning.
    """
    failed, refused, bad = (int(np.sum(np.asarray(x))) for x in (state.failed_estimates, state.refused_steps,
                                                                  state.bad_lr))
    out = []
    if failed:
        out.append(f"{failed} refresh(es) of lambda_max gave a non-finite estimate (value_fn returned NaN or inf?); "
                   f"the last finite estimate stayed in force")
    if bad:
        out.append(f"{bad} step(s) had a negative or non-finite learning rate from the schedule; they were refused "
                   f"(update set to zero)")
    if refused - bad > 0:
        out.append(f"{refused - bad} step(s) were refused (update set to zero) because no finite lambda_max was known")
    return out


def warn_guard_problems(state: CFLGuardState) -> list[str]:
    """:func:`guard_problems`, each emitted as a ``RuntimeWarning``; returns them."""
    import warnings

    problems = guard_problems(state)
    for problem in problems:
        warnings.warn(f"cfl_guard: {problem}", RuntimeWarning, stacklevel=2)
    return problems


def guard_state(opt_state: Any) -> CFLGuardState | None:
    """The :class:`CFLGuardState` inside an optimiser state (e.g. of an ``optax.chain``), or ``None``."""
    found = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, CFLGuardState))
             if isinstance(s, CFLGuardState)]
    return found[0] if found else None


def adopt_estimate(opt_state: Any, estimated: Any) -> Any:
    """``opt_state`` with its guard's estimate (``lambda_max``, ``vector``, ``failed_estimates``)
    taken from ``estimated``, an optimiser state of the same structure returned by a refresh
    (``update(..., refresh=True)``); everything else stays as in ``opt_state``. A caller that
    runs the estimate as a program of its own, before the step, writes it back with this and
    then steps with ``refresh=False`` (:class:`jaxcfl.Lockstep` does)."""
    is_guard = lambda x: isinstance(x, CFLGuardState)  # noqa: E731

    def adopt(old, new):
        if not is_guard(old):
            return old
        return old._replace(lambda_max=new.lambda_max, vector=new.vector, failed_estimates=new.failed_estimates)

    return jax.tree.map(adopt, opt_state, estimated, is_leaf=is_guard)


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

    The guard keeps ``lr lambda_max`` below the limit of SGD (:func:`jaxcfl.limits.momentum_limit`),
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
