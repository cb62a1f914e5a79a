"""The sweep engine: many configurations of one problem in one vmapped, sharded program.

A *sweep* runs the scheme for every ``(lr, alpha)`` pair of a grid (or any flat
list of configurations), each optionally paired with a copy whose update is
perturbed by ``compare_k`` (paper-notes section 2), and classifies every run as
stable, restrained or divergent (:mod:`jaxcfl._core.classify`).

* **One program.** Configurations are a batch axis: ``jax.vmap`` over
  :class:`~jaxcfl.Hyper`, compiled once per chunk shape. Hyperparameters
  are traced, so new values never recompile.
* **Bounded memory.** The configuration list is cut into chunks of
  ``chunk_size``; only per-run summaries and ``record_points`` samples of the loss,
  deviation and (with ``compare_k``) divergence curves are kept.
* **Sharded.** Each chunk's configuration axis is laid on a 1-D
  ``jax.sharding.Mesh`` over all devices (axis name ``"config"``); the problem
  is replicated. The same code runs on one CPU, one GPU or several devices.
* **Persistent.** With ``out=DIR`` every finished chunk is written atomically
  (temporary file, then ``os.replace``) next to a manifest of the sweep. A killed
  sweep resumes from the chunks on disk; a directory holding a different sweep
  is refused.
* **Contained.** A diverging configuration becomes non-finite in its own batch
  lane only; it is a result ("divergent"), never an exception.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.typing import ArrayLike

from jaxcfl._core import validate as v
from jaxcfl._core import distributed as distributed
from jaxcfl._core.classify import MIN_STEPS, STATUSES, Rule, classify
from jaxcfl._core.folder import ResultFolder
from jaxcfl._core.results import SWEEP_CHUNK, csv_text, json_text, jsonable, npz_bytes, write_csv, write_json
from jaxcfl._core.determinism import fingerprint
from jaxcfl.pde._controllers import GuardSchedule, StepSizeController
from jaxcfl.pde._integration import SaveAt, check_guard, map_configs, solve
from jaxcfl.pde._operators import OPERATORS
from jaxcfl.pde._problem import Hyper, Problem
from jaxcfl.pde._rhs import Model
from jaxcfl.pde._schemes import Scheme
from jaxcfl.pde._setup import Setup, make_problem, setup_from
from jaxcfl.pde._state import init

__all__ = ["SUMMARY_FIELDS", "CURVE_FIELDS", "GUARD_FIELDS", "config_mesh", "SweepSpec", "SweepResult",
    "classify_metrics", "run_configs", "sweep", "prepare"]

SUMMARY_FIELDS = (
    "finite",
    "first_nonfinite",
    "final_loss",
    "growth_rate",
    "growth_stderr",
    "final_update",
    "final_norm",
    "max_abs_kernel",
    "loss_oscillation",
    "divergence",
)
CURVE_FIELDS = ("loss", "update_norm", "divergence")
#: What a guarded scheme (``guarded_gd``) adds to the summary: its last estimate ``lambda_n``,
#: its last step ``dt_n``, and the smallest recorded ``dt_n`` (NaN for a non-finite run's guard).
GUARD_FIELDS = ("guard_lambda", "guard_lr", "guard_lr_min")


def config_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``"config"`` over ``devices`` (default: all devices).

    In a multi-process run (:mod:`jaxcfl.distributed`) "all devices" means every device of
    every process: the configuration axis spans the global mesh.
    """
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.array(devices), ("config",))


# --- one configuration --------------------------------------------------------------------

def _fit_slope(x: Array, y: Array, mask: Array) -> tuple[Array, Array]:
    """Masked least-squares slope of ``y`` on ``x`` and its standard error."""
    m = mask.astype(x.dtype)
    n = jnp.sum(m)
    xm = jnp.sum(m * x) / jnp.maximum(n, 1)
    ym = jnp.sum(m * jnp.where(mask, y, 0)) / jnp.maximum(n, 1)
    dx = jnp.where(mask, x - xm, 0)
    dy = jnp.where(mask, y - ym, 0)
    sxx = jnp.sum(dx * dx)
    slope = jnp.sum(dx * dy) / jnp.where(sxx > 0, sxx, 1)
    resid = jnp.where(mask, dy - slope * dx, 0)
    var = jnp.sum(resid * resid) / jnp.maximum(n - 2, 1)
    stderr = jnp.sqrt(var / jnp.where(sxx > 0, sxx, 1))
    ok = n >= 3
    return jnp.where(ok, slope, jnp.nan), jnp.where(ok, stderr, jnp.nan)


def _records(steps: int, stride: int) -> SaveAt:
    """What a sweep records: every ``stride`` iterations, ending at ``steps``."""
    return SaveAt(stride, offset=steps % stride, initial=False)


def _run_one(problem: Problem, kernel0: Array, hyper: Hyper, compare_k: Array, *, scheme: Scheme, model: Model,
             steps: int, stride: int, tail: int, compare: bool, with_loss: bool,
             controller: StepSizeController) -> dict[str, Array]:
    """One configuration: :func:`jaxcfl.pde.solve` with records ending at ``steps``, then its summary."""
    save = _records(steps, stride)
    sol = solve(problem, init(kernel0), hyper, scheme=scheme, model=model, steps=steps, save=save,
                pair_k=compare_k if compare else None, tail=tail, with_loss=with_loss, controller=controller)
    rec, state = sol.diagnostics, sol.state
    n_records = steps // stride

    it = rec.iteration.astype(kernel0.dtype)
    second_half = jnp.arange(n_records) >= n_records // 2
    # Growth of the deviation over the second half of the run's finite part
    # (a run that overflows is measured before it does; exact zeros are floored).
    log_u = jnp.log(jnp.maximum(rec.update_norm, jnp.finfo(kernel0.dtype).tiny))
    valid = rec.finite & jnp.isfinite(log_u)
    last_valid = jnp.max(jnp.where(valid, it, 0))
    slope, stderr = _fit_slope(it, log_u, valid & (it >= last_valid / 2))
    loss_half = jnp.where(second_half, rec.loss, 0.0)
    diffs = jnp.where(second_half[1:] & second_half[:-1], jnp.diff(loss_half), 0.0)
    mean_loss = jnp.sum(loss_half) / jnp.maximum(jnp.sum(second_half), 1)
    oscillation = (jnp.sum(jnp.abs(diffs)) - jnp.abs(jnp.sum(diffs))) / (jnp.abs(mean_loss) + jnp.finfo(kernel0.dtype).tiny)
    finite = jnp.all(rec.finite) & jnp.all(jnp.isfinite(state.kernel))
    first_bad = jnp.where(jnp.any(~rec.finite), rec.iteration[jnp.argmax(~rec.finite)], -1)
    guarded = {}
    if rec.curvature is not None:
        guarded = dict(guard_lambda=rec.curvature[-1], guard_lr=rec.step_size[-1], guard_lr_min=jnp.min(rec.step_size))
    return dict(**guarded,
        finite=finite,
        first_nonfinite=first_bad,
        final_loss=rec.loss[-1],
        growth_rate=slope,
        growth_stderr=stderr,
        final_update=rec.update_norm[-1],
        final_norm=rec.kernel_norm[-1],
        max_abs_kernel=jnp.where(jnp.all(rec.finite), jnp.max(rec.kernel_max), jnp.inf),
        loss_oscillation=oscillation,
        divergence=sol.tail_divergence / tail if compare else jnp.full((), jnp.nan, kernel0.dtype),
        curve_loss=rec.loss,
        curve_update_norm=rec.update_norm,
        curve_divergence=sol.divergence if compare else jnp.full_like(rec.loss, jnp.nan),
        record_iterations=rec.iteration,
    )


@functools.partial(jax.jit, static_argnames=("scheme", "model", "steps", "stride", "tail", "compare", "with_loss", "groups",
                                             "map_batch", "controller"))
def _run_batch(problem, kernel0, hypers, compare_k, *, scheme, model, steps, stride, tail, compare, with_loss, groups, map_batch,
               controller):
    run = functools.partial(_run_one, problem, kernel0, scheme=scheme, model=model, steps=steps, stride=stride, tail=tail,
                            compare=compare, with_loss=with_loss, controller=controller)
    return map_configs(lambda args: run(*args), (hypers, compare_k), groups=groups, map_batch=map_batch)


# --- results ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """Everything that defines a sweep's runs (besides the grid): the manifest of its result folder.

    ``image`` and ``kernel`` are :func:`jaxcfl.fingerprint` digests; ``lr`` and
    ``alpha`` are the grid axes (``None`` for a flat batch, as in
    :func:`jaxcfl.empirical_bounds`). :meth:`to_dict` is the JSON form (the
    ``spec`` of ``result.json`` and of the manifest), :meth:`from_dict` its inverse.
    """

    setup: Setup
    image: str
    image_shape: tuple[int, int]
    kernel_size: int
    kernel: str
    steps: int
    compare_k: float | None
    record_points: int
    chunk_size: int
    dtype: str
    operator: str
    lr: tuple[float, ...] | None = None
    alpha: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        s = self.setup
        out = dict(image=self.image, image_shape=list(self.image_shape), kernel_size=self.kernel_size, kernel=self.kernel,
                   scheme=s.scheme.name, model=s.model.name, pool=s.pool, beta=s.beta, a=s.a, label=s.label, bias=s.bias,
                   momentum=s.momentum, steps=self.steps, compare_k=self.compare_k, record_points=self.record_points,
                   chunk_size=self.chunk_size, dtype=self.dtype, operator=self.operator)
        if s.guarded:  # only then: an unguarded sweep keeps the manifest it had before the guard existed
            out.update({name: value for name, value in s.to_dict().items() if name not in out})
        if self.lr is not None:
            out.update(lr=list(self.lr), alpha=list(self.alpha))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SweepSpec":
        fields = {f.name for f in dataclasses.fields(cls)} - {"setup"}
        setup = Setup.from_dict(data)  # checks that data is a mapping
        missing = sorted(fields - {"lr", "alpha"} - set(data))
        if missing:
            raise ValueError(f"SweepSpec.from_dict: missing {', '.join(missing)}")
        kw = {k: data.get(k) for k in fields}
        kw["image_shape"] = tuple(data["image_shape"])
        for axis in ("lr", "alpha"):
            kw[axis] = None if data.get(axis) is None else tuple(data[axis])
        return cls(setup=setup, **kw)

    def with_grid(self, lr: np.ndarray, alpha: np.ndarray) -> "SweepSpec":
        return dataclasses.replace(self, lr=tuple(map(float, lr)), alpha=tuple(map(float, alpha)))


@dataclasses.dataclass
class SweepResult:
    """Statuses and diagnostics of an ``lr x alpha`` sweep.

    Attributes:
      lr, alpha: the grid axes.
      status: ``(len(lr), len(alpha))`` array of ``"stable"``, ``"restrained"``, ``"divergent"``.
      metrics: per-configuration arrays of the same shape (see :data:`SUMMARY_FIELDS`):
        ``final_loss``, ``growth_rate`` (per iteration, of the deviation
        ``||K^n - K^{n-1}||``), ``max_abs_kernel``, ``loss_oscillation``,
        ``divergence`` (NaN without ``compare_k``), ...
      curves: ``loss`` and ``update_norm`` at ``record_iterations``, and ``divergence`` (with
        ``compare_k``, else NaN): the divergence averaged over the iterations since the previous
        record (every iteration when ``record_points >= steps``), NaN once a copy is non-finite;
        shape ``(len(lr), len(alpha), R)``.
      spec: everything that defines the sweep (:class:`SweepSpec`; ``spec.to_dict()`` is its JSON form).
      rule: the classification thresholds used.
      chunks_reused: how many chunks were read back from ``out`` (committed and intact) rather
        than computed; a damaged chunk that was recomputed does not count.
    """

    lr: np.ndarray
    alpha: np.ndarray
    status: np.ndarray
    metrics: dict[str, np.ndarray]
    curves: dict[str, np.ndarray]
    record_iterations: np.ndarray
    spec: SweepSpec
    rule: Rule
    image: np.ndarray | None = dataclasses.field(default=None, repr=False)
    chunks_reused: int = dataclasses.field(default=0, compare=False)

    def reclassify(self, rule: Rule) -> "SweepResult":
        """The same runs under other thresholds (nothing is recomputed)."""
        return dataclasses.replace(self, status=classify_metrics(self.metrics, rule, self.spec), rule=rule)

    def counts(self) -> dict[str, int]:
        return {s: int(np.sum(self.status == s)) for s in STATUSES}

    def rows(self) -> list[dict[str, Any]]:
        """One dict per configuration: ``lr``, ``alpha``, ``status`` and the metrics."""
        out = []
        for i, lr in enumerate(self.lr):
            for j, alpha in enumerate(self.alpha):
                row = dict(lr=float(lr), alpha=float(alpha), status=str(self.status[i, j]))
                for name, arr in self.metrics.items():
                    value = arr[i, j]
                    row[name] = bool(value) if arr.dtype == bool else (int(value) if arr.dtype.kind == "i" else jsonable(float(value)))
                out.append(row)
        return out

    def to_csv(self, path: str | os.PathLike) -> Path:
        write_csv(path, self.rows())
        return Path(path)

    def to_dict(self) -> dict[str, Any]:
        return dict(spec=self.spec.to_dict(), rule=self.rule.to_dict(), counts=self.counts(), runs=self.rows())

    def to_json(self, path: str | os.PathLike) -> Path:
        """Strict JSON (non-finite numbers are ``null``)."""
        write_json(path, self.to_dict())
        return Path(path)


def classify_metrics(metrics: dict[str, np.ndarray], rule: Rule, spec: SweepSpec) -> np.ndarray:
    """The statuses of runs summarised by ``metrics`` under ``rule`` (:func:`jaxcfl._core.classify`)."""
    eps = np.finfo(np.dtype(spec.dtype)).eps
    with np.errstate(invalid="ignore"):
        at_rounding = np.isfinite(metrics["final_update"]) & (metrics["final_update"] <= rule.rounding * eps * metrics["final_norm"])
    return classify(
        metrics["finite"],
        metrics["growth_rate"],
        metrics["growth_stderr"],
        at_rounding,
        metrics["divergence"] if spec.compare_k is not None else None,
        rule,
    )


# --- persistence -------------------------------------------------------------------------------

def _chunk_name(index: int) -> str:
    return SWEEP_CHUNK.format(index=index)


def _load_chunk(folder: ResultFolder, index: int, names: Sequence[str], rows: int,
                iterations: np.ndarray) -> dict[str, np.ndarray] | None:
    """A committed chunk whose checksum matches and whose arrays have this sweep's layout, or
    ``None`` (never committed, lost, damaged or of another layout: recompute).

    The layout: every array holds ``rows`` configurations; the records (``curve_*`` and
    ``record_iterations``) hold one entry per recorded iteration, and those iterations are this
    sweep's. A chunk can pass its checksum and still fail here: a file written by another
    version, or a manifest rewritten by hand.
    """
    name = _chunk_name(index)
    data, state = folder.read(name)
    if data is None:
        if state in ("missing", "corrupt"):
            warnings.warn(f"{folder.label}={str(folder.path)!r}: {name} is {state} "
                          f"(its checksum is in the manifest); recomputing it", stacklevel=3)
        return None
    try:
        with np.load(io.BytesIO(data)) as arrays:
            chunk = {key: arrays[key] for key in names}
    except Exception:  # checksummed but unreadable (a writer's bug): recompute, never trust
        chunk, problem = None, "unreadable"
    else:
        problem = _layout_problem(chunk, rows, iterations)
    if problem is not None:
        warnings.warn(f"{folder.label}={str(folder.path)!r}: {name} passed its checksum but is {problem}; "
                      f"recomputing it", stacklevel=3)
        return None
    return chunk


def _layout_problem(chunk: dict[str, np.ndarray], rows: int, iterations: np.ndarray) -> str | None:
    """What is wrong with a loaded chunk's layout (``None``: nothing)."""
    records = (iterations.size,)
    for key, arr in chunk.items():
        want = (rows, *records) if key.startswith("curve_") or key == "record_iterations" else (rows,)
        if arr.shape != want:
            return f"of another layout ({key} has shape {arr.shape}, this sweep needs {want})"
        if arr.dtype.kind not in "biuf":
            return f"of another layout ({key} has dtype {arr.dtype})"
    if not np.array_equal(chunk["record_iterations"], np.broadcast_to(iterations, (rows, iterations.size))):
        return "of another record layout (its recorded iterations are not this sweep's)"
    return None


# --- the engine ---------------------------------------------------------------------------------

def _progress_bar(total: int, enabled: bool | None, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, disable=enabled is False if enabled is not None else None, desc=desc, unit="chunk", leave=False)


def run_configs(
    problem: Problem,
    kernel0: Array,
    hypers: Hyper,
    *,
    setup: Setup,
    steps: int,
    compare_k: float | None = None,
    record_points: int = 100,
    tail: int = 100,
    chunk_size: int = 256,
    mesh: Mesh | None = None,
    folder: ResultFolder | None = None,
    progress: bool | None = None,
    on_chunk: Callable[[int, int, bool], None] | None = None,
    with_loss: bool = True,
    width: int | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Run a flat batch of configurations (``hypers`` with a leading axis) in chunks.

    Returns the per-configuration arrays (summaries and ``curve_*``) and the
    record iterations. This is the engine behind :func:`sweep` and
    :func:`jaxcfl.empirical_bounds`. ``on_chunk(done, total, reused)`` is called after each
    chunk; ``reused`` says whether it was read back from ``folder`` rather than computed. ``with_loss=False`` skips the loss records
    (a correlation each), which the classification does not need.
    """
    n = int(hypers.lr.shape[0])
    stride = max(1, steps // max(1, record_points))
    tail = min(tail, steps)
    compare = compare_k is not None
    mesh = config_mesh() if mesh is None else mesh
    n_dev = mesh.devices.size
    # Chunk width: a multiple of the device count; a fixed `width` lets callers with
    # varying batch sizes (the bisection) reuse one compiled program.
    width = -(-max(min(chunk_size, n), width or 0) // n_dev) * n_dev
    hypers = jax.tree.map(np.asarray, hypers)  # gather chunks on the host: no per-shape device ops
    # The back-end says how a batch is best mapped (jaxcfl.pde._operators): one wide vmap, or groups.
    map_batch = problem.backend.map_batch(setup.model.linearised)
    map_batch = None if map_batch is None else min(map_batch, width // n_dev)
    n_chunks = -(-n // chunk_size)
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec("config"))
    problem_d = distributed.put_global(problem, replicated)
    kernel_d = distributed.put_global(kernel0, replicated)
    names = None
    results: list[dict[str, np.ndarray]] = []
    records = _records(steps, stride).iterations(steps)
    bar = _progress_bar(n_chunks, progress if distributed.is_leader() else False, "sweep")
    for index in range(n_chunks):
        lo, hi = index * chunk_size, min(n, (index + 1) * chunk_size)
        cached = (_load_chunk(folder, index, names or _output_names(setup), hi - lo, records)
                  if folder is not None else None)
        reused = cached is not None
        if cached is None:
            take = np.minimum(np.arange(width) + lo, hi - 1)  # pad with the chunk's last configuration
            hyp = distributed.put_global(jax.tree.map(lambda x: x[take], hypers), sharded)
            ck = distributed.put_global(np.full(width, 1.0 if compare_k is None else compare_k, kernel0.dtype), sharded)
            res = _run_batch(problem_d, kernel_d, hyp, ck, scheme=setup.scheme, model=setup.model, steps=steps, stride=stride, tail=tail,
                             compare=compare, with_loss=with_loss, groups=n_dev, map_batch=map_batch,
                             controller=setup.controller)
            res = {k: np.asarray(val)[: hi - lo] for k, val in distributed.gather(res).items()}
            if folder is not None:
                folder.commit(_chunk_name(index), npz_bytes(res))
            cached = res
        names = list(cached)
        results.append(cached)
        if bar is not None:
            bar.update(1)
        if on_chunk is not None:
            on_chunk(index + 1, n_chunks, reused)
    if bar is not None:
        bar.close()
    merged = {k: np.concatenate([r[k] for r in results]) for k in results[0]}
    iterations = merged.pop("record_iterations")[0]
    return merged, iterations


def _output_names(setup: Setup) -> list[str]:
    guard = list(GUARD_FIELDS) if setup.guarded else []
    return [*SUMMARY_FIELDS, *guard, *(f"curve_{c}" for c in CURVE_FIELDS), "record_iterations"]


def _grid(name: str, values: ArrayLike) -> np.ndarray:
    try:
        arr = np.atleast_1d(np.asarray(values, dtype=np.float64))
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number or a 1-D array of numbers, got {values!r:.80}") from None
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a scalar or a 1-D array, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty; give at least one value")
    return arr


def sweep(
    image: ArrayLike,
    kernel_size: int,
    lr: ArrayLike,
    alpha: ArrayLike,
    *,
    setup: Setup | None = None,
    scheme: str | Scheme | None = None,
    model: str | Model | None = None,
    pool: str | None = None,
    beta: float | None = None,
    a: float | None = None,
    label: float | None = None,
    bias: float | None = None,
    momentum: float | None = None,
    safety: float | None = None,
    guard: GuardSchedule | None = None,
    steps: int = 1000,
    compare_k: float | None = None,
    key: Array | None = None,
    kernel: ArrayLike | None = None,
    record_points: int = 100,
    chunk_size: int = 256,
    mesh: Mesh | None = None,
    out: str | os.PathLike | None = None,
    progress: bool | None = None,
    rule: Rule = Rule(),
    operator: str = "auto",
) -> SweepResult:
    """Run the full ``lr x alpha`` grid and classify every configuration.

    Args:
      image, kernel_size: the problem (:func:`jaxcfl.make_problem`).
      lr, alpha: scalars or 1-D arrays; the grid is their outer product.
      setup: the right-hand side, the scheme and the model's constants, a
        :class:`jaxcfl.Setup`. Or, instead, the fields of one as keywords (each ``None``:
        ``Setup``'s default); both at once is a ``TypeError``:
      scheme: a :class:`~jaxcfl.pde.Scheme` or its name: ``"gd"`` (default), ``"nesterov"``
        (``lr`` is ``dt``; ``momentum`` is ``mu``) or ``"guarded_gd"``: forward Euler under the
        CFL guard, ``dt_n = min(lr, safety 2 / lambda_n)`` with ``lambda_n`` the top eigenvalue of
        the Jacobian of the gradient at the current kernel (:class:`~jaxcfl.pde.CFLController`).
        A guarded scheme's metrics add ``guard_lambda``, ``guard_lr`` (the last ``lambda_n`` and
        ``dt_n``) and ``guard_lr_min`` (the smallest recorded ``dt_n``).
      model: a :class:`~jaxcfl.pde.Model` or its name: ``"linear"`` (default), ``"nonconstant"``,
        ``"activated"`` or ``"nonlinear"``.
      pool: ``"sum"`` (default) or ``"mean"``.
      beta, a, label, bias, momentum: the model's constants and Nesterov's ``mu`` (defaults
        1, -0.5, 1, 0, 0.9).
      safety: the guard's margin in ``(0, 1]`` (default 0.9; guarded schemes only).
      guard: the guard's :class:`~jaxcfl.GuardSchedule` (guarded schemes only; default
        a refresh every 10 iterations with 4 warm-started Lanczos iterations, 30 at first).
      steps: iterations per run.
      compare_k: also run each configuration with perturbation factor ``k`` in
        the same program; ``metrics["divergence"]`` is then the paper's
        ``2 mean(|w1 - w2| / (|w1| + |w2|))`` averaged over the last 100 iterations,
        and ``curves["divergence"]`` its curve (per record interval); both are NaN once
        a copy is non-finite.
      key: PRNG key of the initial kernel, drawn N(0, 1) (the paper's
        initialisation); default ``jax.random.key(0)``. Ignored if ``kernel`` is given.
      kernel: an explicit initial kernel.
      record_points: samples of the loss, deviation and divergence curves per run
        (``steps`` or more: every iteration).
      chunk_size: configurations per compiled call (bounds memory).
      mesh: a 1-D :class:`jax.sharding.Mesh` named ``"config"``; default all devices.
      out: directory for incremental, resumable results.
      progress: show a progress bar (``None``: only on a terminal).
      rule: classification thresholds (:class:`jaxcfl.Rule`).
      operator: how correlations (and the linearised models' ``W C^T C W``) are
        applied: ``"fft"`` (FFT correlations, any image), ``"separable"``
        (products with the Toeplitz matrices of a low-rank image's factors, see
        :func:`jaxcfl.make_problem`), ``"dense"`` (linearised models only: an
        assembled ``w^2 x w^2`` matrix, one GEMM for a whole chunk), or
        ``"auto"``: separable when the image has cheap separable factors (the
        checkerboard has rank 1) unless the dense matrix is cheaper still, else
        dense for linearised models with ``w <= 64``, else FFT. Same scheme,
        different rounding; ``spec.operator`` records the choice.

    Returns:
      :class:`SweepResult`.
    """
    lr_grid = _grid("lr", lr)
    alpha_grid = _grid("alpha", alpha)
    _check_rule(rule)
    v.check_positive("lr", lr_grid)
    v.check_nonnegative("alpha", alpha_grid)
    setup = setup_from(setup, "sweep", model=model, scheme=scheme, pool=pool, beta=beta, a=a, label=label, bias=bias,
                       momentum=momentum, safety=safety, guard=check_guard(guard))
    problem, kernel0, spec = prepare(image, kernel_size, setup, steps=steps, compare_k=compare_k, key=key, kernel=kernel,
                                     record_points=record_points, chunk_size=chunk_size, operator=operator)
    spec = spec.with_grid(lr_grid, alpha_grid)
    # What the host holds per configuration (grid, settings, summaries and curves), before any of it is allocated.
    records = spec.steps // max(1, spec.steps // record_points) + 1
    per_config = 56 + 18 * np.dtype(problem.dtype).itemsize + 16 * (len(SUMMARY_FIELDS) + len(GUARD_FIELDS)
                                                                      + len(CURVE_FIELDS) * records)
    v.check_memory("lr x alpha", lr_grid.size * alpha_grid.size * per_config,
                   f"a sweep of {lr_grid.size} x {alpha_grid.size} configurations with {records}-point curves",
                   hint="sweep a coarser grid (or record fewer points)")
    hypers = setup.hyper(np.repeat(lr_grid, alpha_grid.size), np.tile(alpha_grid, lr_grid.size), dtype=problem.dtype)
    folder = None if out is None else ResultFolder(out, kind="sweep", settings=spec.to_dict()).open()
    try:
        reused: list[bool] = []
        flat, iterations = run_configs(
            problem, kernel0, hypers, setup=setup, steps=spec.steps, compare_k=compare_k, record_points=record_points,
            chunk_size=chunk_size, mesh=mesh, folder=folder, progress=progress,
            on_chunk=lambda done, total, was_reused: reused.append(was_reused),
        )
        shape = (lr_grid.size, alpha_grid.size)
        metrics = {k: flat[k].reshape(shape) for k in (*SUMMARY_FIELDS, *GUARD_FIELDS) if k in flat}
        curves = {c: flat[f"curve_{c}"].reshape(*shape, -1) for c in CURVE_FIELDS}
        result = SweepResult(lr_grid, alpha_grid, classify_metrics(metrics, rule, spec), metrics, curves, iterations,
                             spec, rule, image=np.asarray(problem.image), chunks_reused=sum(reused))
        if folder is not None:
            folder.commit("result.json", json_text(result.to_dict()).encode())
            folder.commit("result.csv", csv_text(result.rows()).encode())
    finally:  # on success and on any failure: the folder's lock is released
        if folder is not None:
            folder.close()
    return result


def _check_rule(rule: Any) -> None:
    if not isinstance(rule, Rule):
        raise TypeError(f"rule must be a jaxcfl.Rule (e.g. jaxcfl.Rule(z=4.0)), got {type(rule).__name__} {rule!r:.60}")


def prepare(image: ArrayLike, kernel_size: int, setup: Setup, *, steps: int, compare_k: float | None = None,
            key: Array | None = None, kernel: ArrayLike | None = None, record_points: int = 100, chunk_size: int = 256,
            operator: str = "auto") -> tuple[Problem, Array, SweepSpec]:
    """Validate a sweep's arguments; build its problem, initial kernel and :class:`SweepSpec` (without the grid)."""
    v.check_choice("operator", operator, OPERATORS)
    steps = v.check_int("steps", steps, minimum=1)
    if steps < MIN_STEPS:
        warnings.warn(f"steps={steps}: a classification from fewer than {MIN_STEPS} iterations means little (the "
                      f"growth rate is fitted over the second half of the run); statuses other than 'divergent' "
                      f"are undecided", stacklevel=3)
    v.check_int("record_points", record_points, minimum=3)
    v.check_int("chunk_size", chunk_size, minimum=1)
    if compare_k is not None:
        v.check_perturbation("compare_k", compare_k)  # k and 1/k normal in the working dtype, before any work
    problem = make_problem(image, kernel_size, pool=setup.pool, operator=operator, model=setup.model)
    if kernel is None:
        key = jax.random.key(0) if key is None else key
        kernel0 = jax.random.normal(key, problem.kernel_shape, problem.dtype)
    else:
        kernel0 = jnp.asarray(kernel, problem.dtype)
        if kernel0.shape != problem.kernel_shape:
            raise ValueError(f"kernel must have shape {problem.kernel_shape}, got {kernel0.shape}")
        v.check_finite("kernel", kernel0)
    spec = SweepSpec(
        setup=setup, image=fingerprint(problem.image), image_shape=problem.image_shape, kernel_size=problem.kernel_size,
        kernel=fingerprint(kernel0), steps=steps, compare_k=None if compare_k is None else float(compare_k),
        record_points=record_points, chunk_size=chunk_size, dtype=str(np.dtype(problem.dtype)), operator=problem.operator,
    )
    return problem, kernel0, spec
