"""The integrator: many steps of a scheme under ``lax.scan``, with diagnostics at a stride."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import Array, lax
from jax.typing import ArrayLike

from jaxcfl import _validate as v
from jaxcfl.problem import Hyper, Problem, check_kernel, gradient_fn, loss
from jaxcfl.schemes import State, get_scheme, init


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Diagnostics:
    """Quantities recorded every ``record_every`` steps (leading axis: record index).

    Attributes:
      iteration: the iteration ``n`` of each record (0 is the initial kernel).
      loss: the true objective of eq 2 (cross-entropy + ``alpha/2 ||K||^2``),
        evaluated with the nonlinear model whatever model is stepped.
      kernel_norm: ``||K^n||_2`` (Frobenius).
      kernel_max: ``max |K^n|``.
      update_norm: ``||K^n - K^{n-1}||_2``.
      finite: whether every entry of ``K^n`` is finite.
    """

    iteration: Array
    loss: Array
    kernel_norm: Array
    kernel_max: Array
    update_norm: Array
    finite: Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Trajectory:
    """Result of :func:`integrate`: the final :class:`State` and the recorded :class:`Diagnostics`."""

    state: State
    diagnostics: Diagnostics


def diagnose(problem: Problem, state: State, hyper: Hyper, *, with_loss: bool = True) -> Diagnostics:
    """Diagnostics of one state (``with_loss=False`` skips the loss, which costs a correlation, and records NaN)."""
    kernel = state.kernel
    return Diagnostics(
        iteration=state.iteration,
        loss=loss(problem, kernel, hyper) if with_loss else jnp.full((), jnp.nan, kernel.dtype),
        kernel_norm=scaled_norm(kernel),
        kernel_max=jnp.max(jnp.abs(kernel)),
        update_norm=scaled_norm(kernel - state.previous),
        finite=jnp.all(jnp.isfinite(kernel)),
    )


def scaled_norm(x: Array) -> Array:
    """``||x||_2`` computed as ``m ||x / m||`` with ``m = max |x|``, so it does not overflow early."""
    m = jnp.max(jnp.abs(x))
    finite_positive = (m > 0) & jnp.isfinite(m)
    safe = jnp.where(finite_positive, m, 1)
    norm = safe * jnp.sqrt(jnp.sum(jnp.square(x / safe)))
    return jnp.where(finite_positive, norm, jnp.where(jnp.any(jnp.isnan(x)), jnp.nan, m))


@functools.partial(jax.jit, static_argnames=("scheme", "model", "steps", "record_every"))
def _integrate(problem: Problem, state: State, hyper: Hyper, *, scheme: str, model: str, steps: int, record_every: int) -> Trajectory:
    step = get_scheme(scheme).step
    grad = gradient_fn(model)

    def grad_fn(kernel, hyp):
        return grad(problem, kernel, hyp)

    def advance(st, n):
        return lax.fori_loop(0, n, lambda _, s: step(s, grad_fn, hyper), st)

    def chunk(st, _):
        st = advance(st, record_every)
        return st, diagnose(problem, st, hyper)

    first = diagnose(problem, state, hyper)
    full, rest = divmod(steps, record_every)
    state, records = lax.scan(chunk, state, None, length=full)
    parts = [jax.tree.map(lambda x: x[None], first), records]
    if rest:
        state = advance(state, rest)
        parts.append(jax.tree.map(lambda x: x[None], diagnose(problem, state, hyper)))
    diagnostics = jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
    return Trajectory(state=state, diagnostics=diagnostics)


def integrate(
    problem: Problem,
    kernel: ArrayLike | State,
    hyper: Hyper,
    *,
    scheme: str = "gd",
    model: str = "linear",
    steps: int = 1000,
    record_every: int = 1,
) -> Trajectory:
    """Run ``steps`` iterations of ``scheme`` on ``model``, recording diagnostics.

    Args:
      problem: from :func:`jaxcfl.make_problem`.
      kernel: initial ``w x w`` kernel, or a :class:`~jaxcfl.schemes.State` to continue from.
      hyper: from :func:`jaxcfl.make_hyper`; its fields are traced, so new
        values reuse the compiled program. ``jax.vmap`` over a batched ``hyper``
        runs many configurations at once.
      scheme: ``"gd"`` (forward Euler, eq 21) or ``"nesterov"`` (eqs 37-38).
      model: ``"nonlinear"``, ``"linear"``, ``"nonconstant"`` or ``"activated"``.
      steps: number of iterations (static).
      record_every: stride of the diagnostics (static). Records are taken at
        iteration 0, every ``record_every`` iterations, and at ``steps``.

    Returns:
      A :class:`Trajectory`. A diverging run is not an error: its kernel
      becomes non-finite and ``diagnostics.finite`` turns False.

    Example:
      >>> import jax, jaxcfl
      >>> prob = jaxcfl.make_problem(jaxcfl.checkerboard(32), 8)
      >>> K0 = jax.random.normal(jax.random.key(0), (8, 8))
      >>> traj = jaxcfl.integrate(prob, K0, jaxcfl.make_hyper(1e-4, 10.0), steps=100, record_every=10)
      >>> traj.diagnostics.loss.shape
      (11,)
    """
    v.check_choice("model", model, ("nonlinear", "linear", "nonconstant", "activated"))
    scheme = get_scheme(scheme).name
    steps = v.check_int("steps", steps, minimum=1)
    record_every = v.check_int("record_every", record_every, minimum=1)
    _check_hyper(hyper)
    state = kernel if isinstance(kernel, State) else init(jnp.asarray(kernel, problem.dtype))
    check_kernel(problem, state.kernel)
    return _integrate(problem, state, hyper, scheme=scheme, model=model, steps=steps, record_every=record_every)


def integrate_many(
    problem: Problem,
    kernel: ArrayLike,
    hypers: Hyper,
    *,
    scheme: str = "gd",
    model: str = "linear",
    steps: int = 1000,
    record_every: int = 1,
    map_batch: int | None = 8,
) -> Trajectory:
    """:func:`integrate` for many configurations (``hypers`` with a leading axis) in one program.

    Equivalent to ``jax.vmap`` of :func:`integrate` over ``hypers`` (tested to
    rounding), but FFT-bound steps run ``map_batch`` configurations at a time
    (``lax.map`` over vmapped groups), which on CPU keeps the transforms' working
    set in cache; ``map_batch=None`` is a plain ``vmap`` (best for the dense operator).
    """
    v.check_choice("model", model, ("nonlinear", "linear", "nonconstant", "activated"))
    scheme = get_scheme(scheme).name
    steps = v.check_int("steps", steps, minimum=1)
    record_every = v.check_int("record_every", record_every, minimum=1)
    _check_hyper(hypers)
    if map_batch is not None:
        map_batch = v.check_int("map_batch", map_batch, minimum=1)
    state = init(jnp.asarray(kernel, problem.dtype))
    check_kernel(problem, state.kernel)
    return _integrate_many(problem, state, hypers, scheme=scheme, model=model, steps=steps, record_every=record_every,
                           map_batch=map_batch)


@functools.partial(jax.jit, static_argnames=("scheme", "model", "steps", "record_every", "map_batch"))
def _integrate_many(problem, state, hypers, *, scheme, model, steps, record_every, map_batch):
    run = lambda h: _integrate(problem, state, h, scheme=scheme, model=model, steps=steps, record_every=record_every)
    return map_configs(run, hypers, map_batch=map_batch)


def map_configs(fn, xs, *, groups: int = 1, map_batch: int | None = None):
    """Apply ``fn`` to every configuration (leading axis of ``xs``).

    ``map_batch=None``: one ``vmap`` over all (best when a step is a GEMM, as with
    the dense operator). Otherwise the configurations are split into ``groups``
    (one per device; this axis is ``vmap``-ed and can be sharded) and each group
    is processed ``map_batch`` at a time with ``lax.map``: on CPU this keeps an FFT
    step's working set in cache and is faster than one wide ``vmap``.
    """
    if map_batch is None:
        return jax.vmap(fn)(xs)
    grouped = jax.tree.map(lambda x: x.reshape(groups, -1, *x.shape[1:]), xs)
    out = jax.vmap(lambda g: lax.map(fn, g, batch_size=map_batch))(grouped)
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), out)


def _check_hyper(hyper: Hyper) -> None:
    if not isinstance(hyper, Hyper):
        raise TypeError(f"hyper must be a jaxcfl.Hyper (use jaxcfl.make_hyper), got {type(hyper).__name__}")
    v.check_positive("lr", hyper.lr)
    v.check_nonnegative("alpha", hyper.alpha)
    v.check_positive("k", hyper.k)
    v.check_unit_interval("mu", hyper.mu)
