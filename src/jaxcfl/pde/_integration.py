"""The integrator: many steps of a scheme under ``lax.scan``, with diagnostics at a stride.

One loop, :func:`solve`, serves everything that steps the PDE: :func:`integrate`
(one configuration), :func:`integrate_many` (a batch in one program) and the
sweep engine (:mod:`jaxcfl.pde._sweeps`). What it records is a :class:`SaveAt`; it
can step a second copy with another perturbation factor ``k`` in lock-step and
accumulate the divergence between the two (paper-notes section 2).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax
from jax.typing import ArrayLike

from jaxcfl._core import validate as v
from jaxcfl._core.determinism import divergence
from jaxcfl.pde._controllers import GuardSchedule, StepSizeController, check_controller
from jaxcfl.pde._problem import Hyper, Problem, as_kernel, check_kernel
from jaxcfl.pde._rhs import Model, get_model, loss
from jaxcfl.pde._schemes import Scheme, get_scheme
from jaxcfl.pde._state import State, init

__all__ = ["Diagnostics", "Trajectory", "diagnose", "scaled_norm", "SaveAt", "Solution", "solve", "integrate",
    "integrate_many", "map_configs", "check_guard", "controller_of"]


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
      curvature, step_size: with the guarded scheme, its estimate ``lambda_n`` and the step
        ``dt_n`` it took last (:class:`~jaxcfl.pde.State`); ``None`` otherwise.
    """

    iteration: Array
    loss: Array
    kernel_norm: Array
    kernel_max: Array
    update_norm: Array
    finite: Array
    curvature: Array | None = None
    step_size: Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Trajectory:
    """Result of :func:`integrate`: the final :class:`State` and the recorded :class:`Diagnostics`.

    ``divergence`` (with ``compare_k``): at each record, the divergence between
    the run and its copy perturbed by ``compare_k``, averaged over the iterations
    since the previous record; NaN once a copy is non-finite. ``None`` otherwise.
    """

    state: State
    diagnostics: Diagnostics
    divergence: Array | None = None


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
        curvature=state.curvature,
        step_size=state.step_size,
    )


def scaled_norm(x: Array) -> Array:
    """``||x||_2`` computed as ``m ||x / m||`` with ``m = max |x|``, so it does not overflow early."""
    m = jnp.max(jnp.abs(x))
    finite_positive = (m > 0) & jnp.isfinite(m)
    safe = jnp.where(finite_positive, m, 1)
    norm = safe * jnp.sqrt(jnp.sum(jnp.square(x / safe)))
    return jnp.where(finite_positive, norm, jnp.where(jnp.any(jnp.isnan(x)), jnp.nan, m))


@dataclasses.dataclass(frozen=True)
class SaveAt:
    """Which iterations are recorded (cf. diffrax's ``SaveAt``).

    Records fall at iteration 0 (``initial``), at ``offset + j * stride`` for
    ``j = 1, 2, ...`` up to ``steps``, and at ``steps`` itself (``final``) when
    that is not already one of them. The ``offset`` iterations run first,
    unrecorded: ``SaveAt(stride, offset=steps % stride, initial=False)`` puts
    the last record exactly at ``steps`` (the sweep engine's records).
    """

    stride: int = 1
    offset: int = 0
    initial: bool = True
    final: bool = True

    def iterations(self, steps: int) -> np.ndarray:
        """The recorded iterations of a run of ``steps`` iterations."""
        strided = np.arange(self.offset + self.stride, steps + 1, self.stride)
        parts = [[0]] if self.initial else []
        parts.append(strided)
        if self.final and (strided.size == 0 or strided[-1] != steps):
            parts.append([steps])
        return np.concatenate(parts).astype(int)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Solution:
    """What the integrator core returns.

    Attributes:
      state: the final :class:`State` (with a paired copy: leading axis 2, copy 1 perturbed).
      diagnostics: :class:`Diagnostics` of copy 0 at the :class:`SaveAt` iterations.
      divergence: with a paired copy, the paper's divergence between the copies
        averaged over the iterations since the previous record (0 at iteration 0;
        NaN once a copy is non-finite); else ``None``.
      tail_divergence: with a paired copy, the sum of that divergence over the
        iterations ``> steps - tail``; else ``None``.
    """

    state: State
    diagnostics: Diagnostics
    divergence: Array | None = None
    tail_divergence: Array | None = None


def solve(problem: Problem, state: State, hyper: Hyper, *, scheme: str | Scheme, model: str | Model, steps: int,
          save: SaveAt, pair_k: Array | None = None, tail: int = 0, with_loss: bool = True,
          guard: GuardSchedule | None = None, controller: StepSizeController | None = None) -> Solution:
    """The one integrator loop: ``steps`` iterations of ``scheme`` on ``model``, recorded at ``save``.

    Pure and traceable (``scheme``, ``model``, ``steps``, ``save``, ``tail``, ``guard``,
    ``controller`` and whether ``pair_k`` is given are static). With ``pair_k`` a second copy runs
    in lock-step with perturbation factor ``k = pair_k`` (the first keeps
    ``hyper.k``), and the divergence between them is accumulated at every
    iteration. :func:`integrate`, :func:`integrate_many` and the sweep engine
    (:mod:`jaxcfl.pde._sweeps`) are all this function.

    Each step's size comes from ``controller`` (cf. diffrax's ``stepsize_controller``;
    :mod:`jaxcfl.pde._controllers`), by default the scheme's own (:attr:`Scheme.controller`),
    given ``guard`` as its schedule: :meth:`init` readies the state, :meth:`refresh` runs before
    every step, :meth:`step_size` picks ``dt_n``, and the scheme's ``step`` takes it. Under the
    CFL guard (``guarded_gd``) that is a first estimate of ``lambda``, a ``lax.cond`` refresh on
    the iterations that ``guard.due`` names (the same for every configuration of a batch, so
    under ``jax.vmap`` it stays a branch), and ``dt_n = min(dt, safety 2 / lambda_n)``.
    """
    sch, rhs = get_scheme(scheme), get_model(model).gradient
    ctrl = controller_of(sch, guard) if controller is None else check_controller(controller)

    def grad_fn(kernel, hyp):
        return rhs(problem, kernel, hyp)

    def step_one(st, hyp):
        dt, st = ctrl.step_size(st, hyp, sch.limit)
        return sch.step(st, grad_fn, hyp, dt)

    state = ctrl.init(state, grad_fn, hyper)
    paired = pair_k is not None
    if paired:
        hyps = jax.tree.map(lambda x: jnp.broadcast_to(x, (2,)), hyper)
        hyps = dataclasses.replace(hyps, k=jnp.stack([hyper.k, pair_k]))
        state = jax.tree.map(lambda x: jnp.broadcast_to(x, (2, *x.shape)), state)
        each = jax.vmap
        primary = lambda st: jax.tree.map(lambda x: x[0], st)
    else:
        hyps = hyper
        each = lambda fn: fn
        primary = lambda st: st

    def advance_one(st):
        st = ctrl.refresh(st, grad_fn, hyps, primary(st).iteration, each)
        return each(step_one)(st, hyps)

    zero = jnp.zeros((), state.kernel.dtype)

    def body(_, carry):
        st, div_tail, div_block = carry
        st = advance_one(st)
        if paired:
            # NaN once a copy is non-finite (`divergence` itself counts NaN entries as 0), so that
            # neither the tail sum nor the recorded curve reads a blown-up run as converged.
            div = jnp.where(jnp.all(jnp.isfinite(st.kernel)), divergence(st.kernel[0], st.kernel[1]), jnp.nan)
            in_tail = primary(st).iteration > steps - tail
            div_tail = div_tail + jnp.where(in_tail, div, 0.0)
            div_block = div_block + div
        return st, div_tail, div_block

    # With losses recorded, each block's first iteration runs outside the loop, beside the
    # record of the state it starts from (`chunk`), so that the two share a correlation. Not
    # worth a second copy of the step (compile time) for a paired run, whose steps are vmapped
    # over both copies, or under an adaptive controller, whose refresh would be copied too.
    peel = with_loss and not paired and not ctrl.adaptive

    def advance(carry, n):
        """``n`` iterations from ``(state, tail sum)``; also returns the block sum of the divergence."""
        start = (*carry, zero)
        if peel and n > 1:
            return lax.fori_loop(1, n, body, body(0, start))
        return lax.fori_loop(0, n, body, start)

    def record(st):
        return diagnose(problem, primary(st), hyper, with_loss=with_loss)

    def chunk(carry, _):
        # Record the state a block starts from, then advance: the loss and the block's first
        # gradient evaluate the same correlation C K, which XLA then computes once (CSE).
        # The mean of the divergence over the block's `stride` iterations goes with the record
        # at its end, so that a moving average over a multiple of `stride` iterations is exact.
        rec = record(carry[0])
        st, div_tail, div_block = advance(carry, save.stride)
        return (st, div_tail), (rec, div_block / save.stride)

    offset = min(save.offset, steps)
    n_records, leftover = divmod(steps - offset, save.stride)
    carry = (state, zero)
    shared_first = save.initial and not offset and n_records > 0  # the scan's first record is the initial one
    first = record(state) if save.initial and not shared_first else None
    if offset:
        carry = advance(carry, offset)[:2]
    carry, (starts, div_curve) = lax.scan(chunk, carry, None, length=n_records)
    # starts[j] is the record at iteration offset + j stride; the records are those at the blocks' ends.
    records = starts if not n_records else jax.tree.map(
        lambda s, e: jnp.concatenate([s[1:], e[None]]), starts, record(carry[0]))
    if shared_first:
        first = jax.tree.map(lambda x: x[0], starts)
    head = lambda x: x[None]
    parts, curves = [records], [div_curve]
    if save.initial:
        parts.insert(0, jax.tree.map(head, first))
        curves.insert(0, head(zero))
    if leftover:
        st, div_tail, div_block = advance(carry, leftover)
        carry = (st, div_tail)
        if save.final:
            parts.append(jax.tree.map(head, record(st)))
            curves.append(head(div_block / leftover))
    diagnostics = parts[0] if len(parts) == 1 else jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
    state, div_tail = carry
    if not paired:
        return Solution(state=state, diagnostics=diagnostics)
    curve = curves[0] if len(curves) == 1 else jnp.concatenate(curves)
    return Solution(state=state, diagnostics=diagnostics, divergence=curve, tail_divergence=div_tail)


@functools.partial(jax.jit, static_argnames=("scheme", "model", "steps", "record_every", "compare", "controller"))
def _integrate(problem: Problem, state: State, hyper: Hyper, compare_k: Array, *, scheme: Scheme, model: Model,
               steps: int, record_every: int, compare: bool, controller: StepSizeController) -> Trajectory:
    sol = solve(problem, state, hyper, scheme=scheme, model=model, steps=steps, save=SaveAt(record_every),
                pair_k=compare_k if compare else None, controller=controller)
    state = jax.tree.map(lambda x: x[0], sol.state) if compare else sol.state
    return Trajectory(state=state, diagnostics=sol.diagnostics, divergence=sol.divergence)


def controller_of(scheme: Scheme, guard: GuardSchedule | None = None) -> StepSizeController:
    """The step-size controller of ``scheme``, with ``guard`` as its schedule if given (a
    constant step ignores it)."""
    return scheme.controller if guard is None else scheme.controller.with_schedule(guard)


def integrate(
    problem: Problem,
    kernel: ArrayLike | State,
    hyper: Hyper,
    *,
    scheme: str | Scheme = "gd",
    model: str | Model = "linear",
    steps: int = 1000,
    record_every: int = 1,
    compare_k: float | None = None,
    guard: GuardSchedule | None = None,
) -> Trajectory:
    """Run ``steps`` iterations of ``scheme`` on ``model``, recording diagnostics.

    Args:
      problem: from :func:`jaxcfl.make_problem`.
      kernel: initial ``w x w`` kernel, or a :class:`~jaxcfl.pde.State` to continue from.
      hyper: from :func:`jaxcfl.make_hyper`; its fields are traced, so new
        values reuse the compiled program. ``jax.vmap`` over a batched ``hyper``
        runs many configurations at once.
      scheme: a :class:`~jaxcfl.pde.Scheme`, or the name of one: ``"gd"`` (forward Euler, eq 21),
        ``"nesterov"`` (eqs 37-38) or ``"guarded_gd"``: forward Euler with
        ``dt_n = min(dt, hyper.safety * 2 / lambda_n)`` (:class:`~jaxcfl.pde.CFLController`),
        ``lambda_n`` the top eigenvalue of the Jacobian of the gradient at ``K^n``
        (:func:`jaxcfl.pde.guarded_euler_step`; its estimates and steps are recorded
        in ``diagnostics.curvature`` and ``diagnostics.step_size``).
      model: a :class:`~jaxcfl.pde.Model`, or the name of one: ``"nonlinear"``, ``"linear"``,
        ``"nonconstant"`` or ``"activated"``.
      steps: number of iterations (static).
      record_every: stride of the diagnostics (static). Records are taken at
        iteration 0, every ``record_every`` iterations, and at ``steps``.
      compare_k: also step a copy whose update is perturbed by ``k = compare_k``
        (paper-notes section 2) and record the divergence between the two
        (:attr:`Trajectory.divergence`); traced, so new values reuse the program.
      guard: the schedule of the guarded scheme's controller, a :class:`~jaxcfl.GuardSchedule`
        (static; default ``GuardSchedule()``: a refresh every 10 iterations, 4 Lanczos
        iterations, 30 for the first estimate). Ignored under a constant step.

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
    scheme, model, steps, record_every, pair_k = _check_run(problem, hyper, model, scheme, steps, record_every, compare_k)
    controller = controller_of(scheme, check_guard(guard))
    state = kernel if isinstance(kernel, State) else init(as_kernel(problem, kernel))
    check_kernel(problem, state.kernel)
    return _integrate(problem, state, hyper, pair_k, scheme=scheme, model=model, steps=steps, record_every=record_every,
                      compare=compare_k is not None, controller=controller)


def integrate_many(
    problem: Problem,
    kernel: ArrayLike,
    hypers: Hyper,
    *,
    scheme: str | Scheme = "gd",
    model: str | Model = "linear",
    steps: int = 1000,
    record_every: int = 1,
    compare_k: float | None = None,
    map_batch: int | None = 8,
    guard: GuardSchedule | None = None,
) -> Trajectory:
    """:func:`integrate` for many configurations (``hypers`` with a leading axis) in one program.

    Equivalent to ``jax.vmap`` of :func:`integrate` over ``hypers`` (tested to
    rounding), but FFT-bound steps run ``map_batch`` configurations at a time
    (``lax.map`` over vmapped groups), which on CPU keeps the transforms' working
    set in cache; ``map_batch=None`` is a plain ``vmap`` (best for the dense operator).
    """
    scheme, model, steps, record_every, pair_k = _check_run(problem, hypers, model, scheme, steps, record_every, compare_k)
    if map_batch is not None:
        map_batch = v.check_int("map_batch", map_batch, minimum=1)
    controller = controller_of(scheme, check_guard(guard))
    state = init(as_kernel(problem, kernel))
    return _integrate_many(problem, state, hypers, pair_k, scheme=scheme, model=model, steps=steps,
                           record_every=record_every, compare=compare_k is not None, map_batch=map_batch,
                           controller=controller)


@functools.partial(jax.jit, static_argnames=("scheme", "model", "steps", "record_every", "compare", "map_batch",
                                             "controller"))
def _integrate_many(problem, state, hypers, pair_k, *, scheme, model, steps, record_every, compare, map_batch, controller):
    run = lambda h: _integrate(problem, state, h, pair_k, scheme=scheme, model=model, steps=steps,
                               record_every=record_every, compare=compare, controller=controller)
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


def check_guard(guard: object) -> GuardSchedule | None:
    """``guard`` itself, if it is ``None`` or a :class:`~jaxcfl.GuardSchedule`; else a ``TypeError``."""
    if guard is not None and not isinstance(guard, GuardSchedule):
        raise TypeError(f"guard must be a jaxcfl.GuardSchedule or None, got {type(guard).__name__} {guard!r:.60}")
    return guard


def _check_run(problem, hyper, model, scheme, steps, record_every, compare_k):
    """Validate :func:`integrate`'s arguments; returns the scheme and the model (parsed from their names),
    the counts and ``k`` of the copy."""
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be a jaxcfl.Problem (use jaxcfl.make_problem), got {type(problem).__name__}")
    if not isinstance(hyper, Hyper):
        raise TypeError(f"hyper must be a jaxcfl.Hyper (use jaxcfl.make_hyper), got {type(hyper).__name__}")
    v.check_positive("lr", hyper.lr)
    v.check_nonnegative("alpha", hyper.alpha)
    v.check_positive("k", hyper.k)
    v.check_unit_interval("mu", hyper.mu)
    v.check_safety("safety", hyper.safety)
    model = get_model(model)
    scheme = get_scheme(scheme)
    steps = v.check_int("steps", steps, minimum=1)
    record_every = v.check_int("record_every", record_every, minimum=1)
    if compare_k is not None:
        v.check_positive("compare_k", compare_k)
    pair_k = jnp.asarray(1.0 if compare_k is None else compare_k, problem.dtype)
    return scheme, model, steps, record_every, pair_k
