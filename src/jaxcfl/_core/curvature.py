"""Sharpness (the largest Hessian eigenvalue of a loss) and the largest stable learning rate.

Appendix F of Sun et al. (JMLR 2024) ties the stability of full-batch gradient
descent with weight decay ``alpha`` to ``dt < 2 / (alpha + l)``, ``l`` an
eigenvalue of the loss Hessian; Cohen et al. (2021) observed that the
*sharpness* (the largest eigenvalue) rises during training until it reaches
``2 / lr`` and then hovers there (the Edge of Stability). This module measures
both sides of that relation for any loss ``loss_fn(params, *args)`` on any
pytree of float arrays:

* :func:`sharpness`: Lanczos (:func:`jaxcfl.lanczos_extremes`) on
  Hessian-vector products (forward-over-reverse, ``jax.jvp`` of ``jax.grad``);
  no Hessian is ever formed. The products run in Lanczos's compiled loop, their
  convolutions rewritten into the form XLA's CPU backend runs fast there
  (:func:`jaxcfl.canonical_convs`: the 25 estimates of ``jaxcfl reproduce fig2`` took 62 s
  instead of 12.5 min).
  :func:`hessian_eigenpairs`: the ``k`` largest
  eigenvalues and their eigenvectors (:func:`jaxcfl.top_eigenpairs`).
  Both accept ``physical_batch_size``: the Hessian-vector products are then
  accumulated over chunks of the data, so that memory scales with the chunk,
  not with the data set (as locuslab/edge-of-stability does for Cohen et al.).
* :func:`sharpness_trajectory`: sharpness and loss every ``every`` steps of
  full-batch gradient descent, beside ``2 / lr`` (:func:`jaxcfl.integrate_sharpness`
  does the same along :func:`jaxcfl.integrate` for the one-layer CNN).
* :func:`max_stable_lr`: the largest learning rate whose gradient-descent run
  stays stable, by :func:`jaxcfl.log_bisect`; every round runs all its
  candidate learning rates in one vmapped, compiled program.

Everything numeric (params, data ``args``, ``alpha``, ``lr``) is traced; only
the number of steps of :func:`max_stable_lr` is static. New values of the same
shapes reuse the compiled programs, as long as ``loss_fn`` is the same Python
object (a fresh ``lambda`` or ``functools.partial`` per call compiles anew).
``args`` are arrays or pytrees of arrays (e.g. a
:class:`~jaxcfl.Problem` and a :class:`~jaxcfl.Hyper`).

References:
  Sun et al., "A PDE-based Explanation of Extreme Numerical Sensitivities and
  Edge of Stability in Training Neural Networks", JMLR 2024, appendix F.
  Cohen et al., "Gradient Descent on Neural Networks Typically Occurs at the
  Edge of Stability", ICLR 2021.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax
from jax.flatten_util import ravel_pytree
from jax.tree_util import Partial
from jax.typing import ArrayLike

from jaxcfl._core import validate as v
from jaxcfl._core.canonical import canonical_convs
from jaxcfl._core.results import jsonable
from jaxcfl._core.search import Bracket, log_bisect
from jaxcfl._core.spectral import Eigenpairs, Extremes, lanczos_extremes, top_eigenpairs

__all__ = ["DEFAULT_ITERATIONS", "sharpness", "hessian_eigenpairs", "SharpnessTrajectory",
    "sharpness_trajectory", "MaxStableLR", "max_stable_lr"]

LossFn = Callable[..., Array]

#: Default Krylov dimension of :func:`sharpness`: ``min(n, DEFAULT_ITERATIONS)``.
DEFAULT_ITERATIONS = 64


# --- the objective, its Hessian-vector product and a gradient-descent step ---------------
# Module-level functions of a `Partial(loss_fn)`: their compiled programs are cached
# on the loss function's identity and the shapes of params/args, never on values.

def _decay(params, alpha: Array) -> Array:
    """``alpha/2 ||params||^2``."""
    squares = sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(params))
    return 0.5 * alpha * squares


def _objective(loss_fn: Partial, params, args: tuple, alpha: Array) -> Array:
    """``loss_fn(params, *args) + alpha/2 ||params||^2``."""
    return loss_fn(params, *args) + _decay(params, alpha)


_objective_jit = jax.jit(_objective)


def _plain_hvp(loss_fn: Partial, params, args: tuple, alpha: Array, vec: Array) -> Array:
    _, unravel = ravel_pytree(params)
    grad = functools.partial(jax.grad(_objective, argnums=1), loss_fn, args=args, alpha=alpha)
    _, tangent = jax.jvp(grad, (params,), (unravel(vec),))
    return ravel_pytree(tangent)[0]


def _hvp(loss_fn: Partial, params, args: tuple, alpha: Array, vec: Array) -> Array:
    """``H vec`` on flat vectors (forward-over-reverse: the JVP of the gradient), its convolutions
    canonical: it runs inside Lanczos's loop, where XLA's CPU backend runs others slowly
    (:func:`jaxcfl.canonical_convs`)."""
    return canonical_convs(_plain_hvp)(loss_fn, params, args, alpha, vec)


# --- the same over chunks of the data (``physical_batch_size``) --------------------------------
# Convention: every leaf of ``args`` is batched along axis 0 (N examples) and ``loss_fn`` is a
# mean over them, so the full loss is ``sum_c (n_c / N) loss_c`` over chunks c of n_c examples,
# and so are its gradient and Hessian. The weight decay is added once, outside the sum.

def _chunk_mean(fn: Callable[[tuple], Any], args: tuple, batch: int) -> Any:
    """``sum_c (n_c / N) fn(args_c)`` over consecutive chunks of ``batch`` examples (a pytree).

    ``lax.scan`` over the ``N // batch`` full chunks, each a ``dynamic_slice`` of the data
    (no copy of it), then one call on the remainder: the live memory of ``fn`` scales with
    ``batch``, not ``N``. No padding: every example counts once, with weight ``1 / N``.
    """
    total = jax.tree_util.tree_leaves(args)[0].shape[0]
    full, rest = divmod(total, batch)
    parts = []
    if full:
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct((batch,) + x.shape[1:], x.dtype), args)
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(fn, shapes))

        def body(acc, i):
            chunk = jax.tree.map(lambda x: lax.dynamic_slice_in_dim(x, i * batch, batch), args)
            return jax.tree.map(jnp.add, acc, fn(chunk)), None

        acc, _ = lax.scan(body, zeros, jnp.arange(full))
        parts.append(jax.tree.map(lambda a: a * (batch / total), acc))
    if rest:
        out = fn(jax.tree.map(lambda x: x[full * batch:], args))
        parts.append(jax.tree.map(lambda a: a * (rest / total), out))
    return parts[0] if len(parts) == 1 else jax.tree.map(jnp.add, *parts)


@functools.partial(jax.jit, static_argnames=("batch",))
def _chunked_objective(loss_fn: Partial, params, args: tuple, alpha: Array, *, batch: int) -> Array:
    """:func:`_objective` with the loss accumulated over chunks of ``batch`` examples."""

    def chunk_loss(chunk):
        value = loss_fn(params, *chunk)
        if jnp.shape(value) != ():  # checked while tracing: a per-example loss would not add up across chunks
            raise ValueError(f"loss_fn must return a scalar, got shape {jnp.shape(value)} on a chunk of the data")
        return value

    return _chunk_mean(chunk_loss, args, batch) + _decay(params, alpha)


@dataclasses.dataclass(frozen=True)
class _ChunkedHVP:
    """:func:`_hvp` over chunks of ``batch`` examples: ``sum_c (n_c / N) H_c vec + alpha vec``.

    Equal and hashable by ``batch``: as the function of a ``Partial`` mat-vec, its compiled
    solver is cached per chunk size (``batch`` must be static: it sets the chunks' shapes).
    """

    batch: int

    def __call__(self, loss_fn: Partial, params, args: tuple, alpha: Array, vec: Array) -> Array:
        _, unravel = ravel_pytree(params)
        tangent = unravel(vec)

        @canonical_convs  # inside the scan over chunks and Lanczos's loop (see _hvp)
        def chunk_hvp(chunk):
            grad = lambda p: jax.grad(loss_fn)(p, *chunk)
            return ravel_pytree(jax.jvp(grad, (params,), (tangent,))[1])[0]

        return _chunk_mean(chunk_hvp, args, self.batch) + alpha * vec


def _gd_step(loss_fn: Partial, args: tuple, alpha: Array, lr: Array, params):
    """One step ``p - lr grad f(p)``; returns the new params and ``f(p)``."""
    value, grad = jax.value_and_grad(_objective, argnums=1)(loss_fn, params, args, alpha)
    new = jax.tree.map(lambda p, g: (p - lr * g).astype(p.dtype), params, grad)
    return new, value


@jax.jit
def _descend(loss_fn: Partial, params, args: tuple, alpha: Array, lr: Array, n: Array):
    """``n`` (traced) gradient-descent steps."""
    return lax.fori_loop(0, n, lambda _, p: _gd_step(loss_fn, args, alpha, lr, p)[0], params)


@functools.partial(jax.jit, static_argnames=("steps",))
def _run_lrs(loss_fn: Partial, params, args: tuple, alpha: Array, lrs: Array, *, steps: int):
    """For every ``lr`` of ``lrs`` (vmapped): ``steps`` GD steps from ``params``.

    Returns the final objective and whether every objective value on the way was finite.
    """

    def run(lr):
        def body(carry, _):
            p, finite = carry
            p, value = _gd_step(loss_fn, args, alpha, lr, p)
            return (p, finite & jnp.isfinite(value)), None

        (p, finite), _ = lax.scan(body, (params, jnp.array(True)), None, length=steps)
        final = _objective(loss_fn, p, args, alpha)
        return final, finite & jnp.isfinite(final)

    return jax.vmap(run)(lrs)


# --- inputs ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Setup:
    loss_fn: Partial
    params: Any
    args: tuple
    alpha: Array
    dtype: Any
    size: int
    value: float  # the objective at params
    batch: int | None = None  # physical_batch_size: HVPs over chunks of this many examples


def _check_batched(args: tuple, physical_batch_size: Any) -> int | None:
    """``physical_batch_size`` (an int >= 1) and the data it chunks: every leaf of ``args`` batched alike."""
    if physical_batch_size is None:
        return None
    if (isinstance(physical_batch_size, bool) or not isinstance(physical_batch_size, (int, np.integer))
            or physical_batch_size < 1):
        raise ValueError(f"physical_batch_size must be an int >= 1 or None, got {physical_batch_size!r}")
    leaves = jax.tree_util.tree_flatten_with_path(args)[0]
    if not leaves:
        raise ValueError("physical_batch_size needs data to chunk: args hold no arrays")
    lengths: dict[int, str] = {}
    for path, leaf in leaves:
        shape = np.shape(leaf)
        where = "args" + jax.tree_util.keystr(path)
        if not shape:
            raise ValueError(f"with physical_batch_size every leaf of args must be batched along axis 0, but {where} "
                             "is a scalar; close over unbatched values in loss_fn (e.g. jax.tree_util.Partial)")
        lengths.setdefault(shape[0], where)
    if len(lengths) > 1:
        seen = ", ".join(f"{w}: {n}" for n, w in lengths.items())
        raise ValueError(f"with physical_batch_size every leaf of args must have the same leading length "
                         f"(the number of examples), got {seen}")
    if 0 in lengths:
        raise ValueError("physical_batch_size needs at least one example; args have leading length 0")
    return int(physical_batch_size)


def _setup(loss_fn: LossFn, params, args: tuple, alpha: float, physical_batch_size: int | None = None) -> _Setup:
    """Validate the common inputs; evaluate the objective at ``params`` (it must be a finite scalar).

    With ``physical_batch_size``, the objective is evaluated over chunks of the data.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    leaves, treedef = jax.tree_util.tree_flatten(params)
    if not leaves:
        raise ValueError("params holds no arrays; give a pytree of float arrays")
    leaves = [jnp.asarray(x) for x in leaves]
    for path, leaf in zip(jax.tree_util.tree_flatten_with_path(params)[0], leaves):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(f"params must hold floating arrays; params{jax.tree_util.keystr(path[0])} has dtype {leaf.dtype}")
    params = jax.tree_util.tree_unflatten(treedef, leaves)
    flat, _ = ravel_pytree(params)
    if flat.size == 0:
        raise ValueError("params holds no entries; give a pytree of non-empty float arrays")
    v.check_nonnegative("alpha", alpha)
    alpha = jnp.asarray(alpha, flat.dtype)
    loss_fn = loss_fn if isinstance(loss_fn, Partial) else Partial(loss_fn)
    args = tuple(args)
    batch = _check_batched(args, physical_batch_size)
    if batch is None:
        value = _objective_jit(loss_fn, params, args, alpha)
    else:
        value = _chunked_objective(loss_fn, params, args, alpha, batch=batch)
    if np.shape(value) != ():
        raise ValueError(f"loss_fn must return a scalar, got shape {np.shape(value)}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"the loss (loss_fn(params, *args) + alpha/2 ||params||^2) is not finite at params: {value}")
    return _Setup(loss_fn, params, args, alpha, flat.dtype, int(flat.size), value, batch)


def _matvec(s: _Setup, params) -> Partial:
    """The Hessian-vector product at ``params`` as a ``Partial`` (compiled once per shapes and chunk size)."""
    hvp = _hvp if s.batch is None else _ChunkedHVP(s.batch)
    return Partial(hvp, s.loss_fn, params, s.args, s.alpha)


def _start(s: _Setup, key: Array | None) -> tuple[Array, Array]:
    """The random start vector and the key for restart directions."""
    key = jax.random.key(0) if key is None else key
    start_key, restart_key = jax.random.split(key)
    return jax.random.normal(start_key, (s.size,), s.dtype), restart_key


def _spectrum(s: _Setup, params, iterations: int | None, key: Array | None) -> Extremes:
    """Extreme Hessian eigenvalues of the objective at ``params`` (no checks)."""
    start, restart_key = _start(s, key)
    iterations = min(s.size, DEFAULT_ITERATIONS) if iterations is None else iterations
    return lanczos_extremes(_matvec(s, params), start, iterations=iterations, key=restart_key)


# --- sharpness ---------------------------------------------------------------------------------

def sharpness(
    loss_fn: LossFn,
    params: Any,
    *args: Any,
    alpha: float = 0.0,
    iterations: int | None = None,
    key: Array | None = None,
    return_extremes: bool = False,
    physical_batch_size: int | None = None,
) -> float | Extremes:
    """The largest eigenvalue of the Hessian of ``loss_fn(params, *args) + alpha/2 ||params||^2``.

    Lanczos with full re-orthogonalisation on Hessian-vector products
    (``jax.jvp`` of ``jax.grad``), on the flattened params
    (``jax.flatten_util.ravel_pytree``). Memory is ``iterations + 1`` vectors of
    the size of ``params``; the Hessian is never formed. The compiled solver is
    reused for new params/data of the same shapes.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``; keep the same function object
        across calls to reuse the compiled solver.
      params: any pytree of floating arrays (their promoted dtype is the working precision).
      *args: data, arrays or pytrees of arrays (traced).
      alpha: weight decay added to the loss (its Hessian adds ``alpha``).
      iterations: Krylov dimension; default ``min(n, 64)`` with ``n`` the number of
        parameters. The extreme eigenvalues converge first (the residual bound in
        :class:`~jaxcfl.spectral.Extremes` says how far); ``iterations = n`` is exact.
      key: PRNG key of the random start vector (default ``jax.random.key(0)``).
      return_extremes: return the :class:`~jaxcfl.spectral.Extremes` (smallest and
        largest eigenvalue with residual bounds) instead of the largest only.
      physical_batch_size: accumulate the Hessian-vector products (and the loss
        checked at ``params``) over chunks of this many examples; memory then scales
        with the chunk, not with the data. Needs every leaf of ``args`` batched along
        axis 0 with one length ``N`` and ``loss_fn`` a *mean* over the examples: the
        product is ``sum_c (n_c / N) H_c v + alpha v`` over the chunks ``c`` (the last
        one holds ``N mod physical_batch_size`` examples if that is not 0), the same
        operator as without chunks, up to rounding. ``None`` (default): one call on all the data.

    Returns:
      The sharpness as a float, or the :class:`~jaxcfl.spectral.Extremes`.

    Raises:
      ValueError: the loss is not a scalar or not finite at ``params``, ``params`` is
        empty, ``alpha < 0``, ``iterations`` is outside ``[1, n]``, or
        ``physical_batch_size`` is not an int >= 1 or ``args`` are not batched alike.
      TypeError: ``params`` holds non-floating arrays.

    References:
      Cohen et al. (2021), section 2 (sharpness); Sun et al., JMLR 2024, appendix F.
    """
    s = _setup(loss_fn, params, args, alpha, physical_batch_size)
    ext = _spectrum(s, s.params, iterations, key)
    return ext if return_extremes else ext.maximum


def hessian_eigenpairs(
    loss_fn: LossFn,
    params: Any,
    *args: Any,
    k: int = 1,
    alpha: float = 0.0,
    iterations: int | None = None,
    key: Array | None = None,
    physical_batch_size: int | None = None,
) -> Eigenpairs:
    """The ``k`` largest eigenvalues of the Hessian of ``loss_fn(params, *args) + alpha/2 ||params||^2``, with eigenvectors.

    :func:`jaxcfl.top_eigenpairs` on the Hessian-vector products of
    :func:`sharpness` (same start vector and Krylov space: ``values[0]`` is the
    sharpness). The top eigenvectors are the directions along which gradient descent
    turns unstable first (Cohen et al. 2021; Sun et al., JMLR 2024, appendix F:
    ``lr < 2 / (alpha + values[0])``).

    Args:
      loss_fn, params, *args, alpha, key, physical_batch_size: as in :func:`sharpness`.
      k: how many eigenpairs, an int in ``[1, n]`` (``n`` the number of parameters).
      iterations: Krylov dimension in ``[k, n]``; default ``min(n, max(64, 2 k))``.
        The largest pairs converge first; check ``residuals``.

    Returns:
      :class:`~jaxcfl.Eigenpairs`: ``values`` descending; ``vectors`` flat,
      ``(k, n)``, in the order of ``jax.flatten_util.ravel_pytree(params)`` (for dot
      products, projections, warm starts); ``vector_tree(i)`` gives the ``i``-th one
      shaped like ``params`` (e.g. to step along it), ``unravel`` the map itself.

    Raises:
      ValueError: as :func:`sharpness`, and ``k`` not an int in ``[1, iterations]``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxcfl import hessian_eigenpairs
      >>> loss = lambda p, x: jnp.mean(jnp.sum(x * p["w"] ** 2, axis=1))  # Hessian diag(2 mean(x))
      >>> x = jnp.array([[1.0, 2.0, 6.0], [3.0, 2.0, 2.0]])
      >>> pairs = hessian_eigenpairs(loss, {"w": jnp.ones(3)}, x, k=2, physical_batch_size=1)
      >>> pairs.values.round(4).tolist(), abs(pairs.vector_tree(0)["w"]).round(4).tolist()  # sign: arbitrary
      ([8.0, 4.0], [0.0, 0.0, 1.0])
    """
    s = _setup(loss_fn, params, args, alpha, physical_batch_size)
    k = v.check_count("k", k, s.size, "at most the number of parameters")
    start, restart_key = _start(s, key)
    if iterations is None:
        iterations = min(s.size, max(DEFAULT_ITERATIONS, 2 * k))
    pairs = top_eigenpairs(_matvec(s, s.params), start, k=k, iterations=iterations, key=restart_key)
    return dataclasses.replace(pairs, unravel=ravel_pytree(s.params)[1])


# --- sharpness along a run -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SharpnessTrajectory:
    """Sharpness and loss recorded along a run.

    Attributes:
      step: iteration of each record (0, ``every``, ``2 every``, ..., ``steps``).
      loss: the objective at each record.
      sharpness: the largest Hessian eigenvalue of the objective at each record.
      lr: the learning rate.
      threshold: the stability limit of the largest eigenvalue, ``2 / lr`` for gradient
        descent (the Edge of Stability line); for Nesterov ``4 / ((1 + 2 mu) lr^2)``.
      params: the final params (the one-layer kernel for :func:`integrate_sharpness`).
      diverged: the loss became non-finite; the records stop at the first such record
        (its sharpness is NaN).
    """

    step: np.ndarray
    loss: np.ndarray
    sharpness: np.ndarray
    lr: float
    threshold: float
    params: Any
    diverged: bool


def _track(s: _Setup, advance, state, params_of, *, lr: float, threshold: float, steps: int, every: int,
           iterations: int | None, key: Array | None) -> SharpnessTrajectory:
    """Record (step, loss, sharpness) at 0, every ``every`` steps of ``advance`` and at ``steps``."""
    records: list[tuple[int, float, float]] = []
    done, diverged = 0, False
    while True:
        params = params_of(state)
        value = float(_objective_jit(s.loss_fn, params, s.args, s.alpha))
        if not np.isfinite(value):
            records.append((done, value, float("nan")))
            diverged = True
            break
        records.append((done, value, _spectrum(s, params, iterations, key).maximum))
        if done >= steps:
            break
        n = min(every, steps - done)
        state = advance(state, n)
        done += n
    step, values, sharp = (np.array(x) for x in zip(*records))
    return SharpnessTrajectory(step=step, loss=values, sharpness=sharp, lr=float(lr), threshold=float(threshold),
                               params=params_of(state), diverged=diverged)


def sharpness_trajectory(
    loss_fn: LossFn,
    params0: Any,
    *args: Any,
    lr: float,
    steps: int,
    every: int = 10,
    alpha: float = 0.0,
    iterations: int | None = None,
    key: Array | None = None,
) -> SharpnessTrajectory:
    """Full-batch gradient descent on ``loss_fn``, recording loss and sharpness every ``every`` steps.

    The Edge of Stability plot (Cohen et al. 2021): under gradient descent
    with step ``lr`` the sharpness typically rises until it reaches ``2 / lr``
    (``threshold``) and then hovers there, while the loss keeps decreasing
    non-monotonically. The steps run compiled in chunks of ``every`` (``lr``
    traced); each record is one :func:`sharpness` call (same compiled solver).

    Args:
      loss_fn, params0, *args, alpha, iterations, key: as in :func:`sharpness`
        (the objective is ``loss_fn(params, *args) + alpha/2 ||params||^2``).
      lr: the learning rate (> 0).
      steps: number of gradient-descent steps (>= 1).
      every: record stride (>= 1); records at 0, ``every``, ... and at ``steps``.

    Returns:
      :class:`SharpnessTrajectory`. A diverging run is not an error: recording
      stops at the first non-finite loss and ``diverged`` is True.

    References:
      Cohen et al., ICLR 2021, figure 1; Sun et al., JMLR 2024, appendix F.
    """
    v.check_positive("lr", lr)
    steps = v.check_int("steps", steps, minimum=1)
    every = v.check_int("every", every, minimum=1)
    s = _setup(loss_fn, params0, args, alpha)
    lr_arr = jnp.asarray(lr, s.dtype)
    advance = lambda p, n: _descend(s.loss_fn, p, s.args, s.alpha, lr_arr, jnp.asarray(n, jnp.int32))
    return _track(s, advance, s.params, lambda p: p, lr=lr, threshold=2.0 / lr, steps=steps, every=every,
                  iterations=iterations, key=key)


# --- the largest stable learning rate -------------------------------------------------------

FOUND, BELOW_RANGE, ABOVE_RANGE = "found", "below_range", "above_range"


@dataclasses.dataclass
class MaxStableLR:
    """Result of :func:`max_stable_lr`.

    Attributes:
      max_lr: the estimate, the geometric midpoint of ``bracket`` (within ``rtol/2``
        of the transition); NaN unless ``status == "found"``.
      bracket: ``(lo, hi)``: ``lo`` was run and found stable, ``hi`` unstable, and
        ``hi / lo - 1 <= rtol``; ``None`` unless found.
      status: ``"found"``; ``"below_range"`` (even ``lr_range[0]`` is unstable: the
        largest stable lr lies below the range); ``"above_range"`` (every point of the
        initial grid, ``lr_range[1]`` included, is stable).
      alpha, steps, rtol, growth, lr_range: the inputs.
      rounds: vectorised evaluations (one compiled call per round, grid included).
      evaluations: gradient-descent runs.
      seconds: wall time.
      notes: anything unusual (e.g. the stable set is not an interval on the grid).
    """

    max_lr: float
    bracket: tuple[float, float] | None
    status: str
    alpha: float
    steps: int
    rtol: float
    growth: float
    lr_range: tuple[float, float]
    rounds: int
    evaluations: int
    seconds: float
    notes: list[str]

    @property
    def found(self) -> bool:
        return self.status == FOUND

    def to_dict(self) -> dict[str, Any]:
        return jsonable(dataclasses.asdict(self))


def max_stable_lr(
    loss_fn: LossFn,
    params: Any,
    *args: Any,
    lr_range: tuple[float, float] = (1e-6, 1e3),
    alpha: float = 0.0,
    steps: int = 500,
    rtol: float = 1e-2,
    growth: float = 1.0,
    initial_points: int = 16,
    candidates: int = 15,
    max_rounds: int = 20,
) -> MaxStableLR:
    """The largest stable learning rate of full-batch gradient descent from ``params``.

    *Stable* (the predicate): gradient descent ``p <- p - lr grad f(p)`` on
    ``f = loss_fn(params, *args) + alpha/2 ||params||^2``, run ``steps`` steps from
    ``params``, keeps every ``f`` value finite and ends with
    ``f(p_steps) - f(p_0) <= (growth - 1) |f(p_0)|`` (``f(p_steps) <= growth f(p_0)``
    for a non-negative loss; by default: it did not end higher than it started).
    Why: below ``2 / (alpha + l_max)`` a quadratic's every mode contracts
    (factor ``|1 - lr (alpha + l)| < 1``), so ``f`` decreases; above it the top mode
    grows by that factor each step and, after enough steps, dominates ``f``.
    The transition found lies within about ``log(1/s) / (4 steps)`` (relative) of
    ``2 / (alpha + l_max)``, ``s`` the top mode's share of ``f(p_0)``; take
    ``steps`` well above ``log(1/s) / rtol``. Away from a quadratic, the
    predicate states what it states: a catapult or a bounded oscillation (Edge of
    Stability, restrained instability) that ends lower counts as stable, and near
    the edge such runs are chaotic, so single verdicts there depend on rounding
    (the bracket is that of this implementation's runs). ``params`` must not be a
    stationary point (nothing moves there).

    Method: ``initial_points`` log-spaced lrs over ``lr_range`` (ends included),
    then :func:`jaxcfl.log_bisect` (``candidates`` per round) on the
    bracket around the first unstable point, down to relative width ``rtol``.
    Each round is one call of a compiled program: ``lax.scan`` of the steps,
    vmapped over the round's lrs (padded to a fixed width); lrs and ``alpha``
    are traced, so new values never recompile.

    Args:
      loss_fn, params, *args: as in :func:`sharpness`.
      lr_range: ``(lo, hi)``, finite, ``0 < lo < hi``.
      alpha: weight decay (>= 0, traced). Appendix F: with ``alpha`` dominant the
        limit tends to ``2 / alpha``.
      steps: gradient-descent steps per run (>= 1; static: a new value compiles anew).
      rtol: relative width of the final bracket (> 0).
      growth: the allowed final-loss factor of the predicate (> 0).
      initial_points: grid size (>= 2); candidates, max_rounds: as in :func:`log_bisect`.

    Returns:
      :class:`MaxStableLR`. When ``lr_range[0]`` is already unstable or the whole
      grid is stable, no exception is raised: ``status`` says which, ``max_lr`` is
      NaN and ``notes`` explains.

    Raises:
      ValueError: naming the argument, for bad ``lr_range``, ``steps < 1``,
        ``rtol``/``growth`` not > 0, ``alpha < 0``, or a loss that is not a finite
        scalar at ``params``.

    References:
      Sun et al., JMLR 2024, appendix F (eqs 50-51); Cohen et al., ICLR 2021.
    """
    start_time = time.perf_counter()
    try:
        lo, hi = (float(x) for x in lr_range)
    except (TypeError, ValueError) as err:
        raise ValueError(f"lr_range must be two numbers (lo, hi), got {lr_range!r}") from err
    if not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo < hi):
        raise ValueError(f"lr_range must be two finite numbers 0 < lo < hi, got {lr_range!r}")
    steps = v.check_int("steps", steps, minimum=1)
    v.check_positive("rtol", rtol)
    v.check_positive("growth", growth)
    initial_points = v.check_int("initial_points", initial_points, minimum=2)
    candidates = v.check_int("candidates", candidates, minimum=1)
    s = _setup(loss_fn, params, args, alpha)
    width = max(initial_points, candidates)  # one batch shape for every call: compiled once
    allowed = s.value + (growth - 1.0) * abs(s.value)

    def stable(lrs: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, lrs.size, width):
            chunk = lrs[i:i + width]
            padded = np.concatenate([chunk, np.full(width - chunk.size, lo)])
            final, finite = jax.device_get(_run_lrs(s.loss_fn, s.params, s.args, s.alpha,
                                                    jnp.asarray(padded, s.dtype), steps=steps))
            with np.errstate(invalid="ignore"):
                out.append((finite & (final <= allowed))[:chunk.size])
        return np.concatenate(out)

    grid = np.geomspace(lo, hi, initial_points)
    ok = stable(grid)
    rounds, evaluations, notes = 1, grid.size, []
    result = dict(max_lr=float("nan"), bracket=None)
    if not ok[0]:
        status = BELOW_RANGE
        notes.append(f"unstable at lr_range's lower end {lo:g}: the largest stable lr lies below the range")
    elif ok.all():
        status = ABOVE_RANGE
        notes.append(f"stable at every lr of the grid up to lr_range's upper end {hi:g}: the largest stable lr lies above")
    else:
        status = FOUND
        first_bad = int(np.argmin(ok))
        if ok[first_bad:].any():
            notes.append("the stable set is not an interval on the initial grid; the edge of the stable interval "
                         "starting at lr_range's lower end is returned")
        start = Bracket(float(grid[first_bad - 1]), float(grid[first_bad]), ok_lo=True)
        (bracket,), more_rounds, more = log_bisect(stable, [start], candidates=candidates, rtol=rtol, max_rounds=max_rounds)
        rounds, evaluations = rounds + more_rounds, evaluations + more
        if bracket.width > rtol:
            notes.append(f"max_rounds={max_rounds} reached before the bracket narrowed to rtol")
        result = dict(max_lr=bracket.boundary, bracket=(bracket.lo, bracket.hi))
    return MaxStableLR(**result, status=status, alpha=float(alpha), steps=steps, rtol=float(rtol), growth=float(growth),
                       lr_range=(lo, hi), rounds=rounds, evaluations=evaluations,
                       seconds=time.perf_counter() - start_time, notes=notes)
