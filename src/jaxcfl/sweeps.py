"""The sweep engine: many configurations of one problem in one vmapped, sharded program.

A *sweep* runs the scheme for every ``(lr, alpha)`` pair of a grid (or any flat
list of configurations), each optionally paired with a copy whose update is
perturbed by ``compare_k`` (paper-notes section 2), and classifies every run as
stable, restrained or divergent (:mod:`jaxcfl.classify`).

* **One program.** Configurations are a batch axis: ``jax.vmap`` over
  :class:`~jaxcfl.problem.Hyper`, compiled once per chunk shape. Hyperparameters
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

import csv
import dataclasses
import functools
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.typing import ArrayLike

from jaxcfl._version import __version__
from jaxcfl import _validate as v
from jaxcfl.classify import STATUSES, Rule, classify
from jaxcfl._io import atomic_open as _atomic_open
from jaxcfl.determinism import divergence, fingerprint
from jaxcfl.integration import diagnose, map_configs
from jaxcfl.problem import MODELS, Hyper, Problem, gradient_fn, make_hyper, make_problem, with_dense_operator
from jaxcfl.schemes import canonical_scheme, get_scheme, init

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
MANIFEST = "manifest.json"


def config_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``"config"`` over ``devices`` (default: all devices)."""
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


def _run_one(problem: Problem, kernel0: Array, hyper: Hyper, compare_k: Array, *, scheme: str, model: str,
             steps: int, stride: int, tail: int, compare: bool, with_loss: bool) -> dict[str, Array]:
    step = get_scheme(scheme).step
    grad = gradient_fn(model)
    grad_fn = lambda kernel, hyp: grad(problem, kernel, hyp)
    copies = 2 if compare else 1
    ks = jnp.stack([hyper.k, compare_k])[:copies]
    hyps = jax.tree.map(lambda x: jnp.broadcast_to(x, (copies,)), hyper)
    hyps = dataclasses.replace(hyps, k=ks)
    state0 = jax.tree.map(lambda x: jnp.broadcast_to(x, (copies, *x.shape)), init(kernel0))
    paired_step = jax.vmap(lambda s, h: step(s, grad_fn, h))

    zero = jnp.zeros((), kernel0.dtype)

    def body(_, carry):
        state, div_sum, block_sum = carry
        state = paired_step(state, hyps)
        if compare:
            # NaN once a copy is non-finite (`divergence` itself counts NaN entries as 0), so that
            # neither the tail mean nor the recorded curve reads a blown-up run as converged.
            div = jnp.where(jnp.all(jnp.isfinite(state.kernel)), divergence(state.kernel[0], state.kernel[1]), jnp.nan)
            in_tail = state.iteration[0] > steps - tail
            div_sum = div_sum + jnp.where(in_tail, div, 0.0)
            block_sum = block_sum + div
        return state, div_sum, block_sum

    def advance(carry, n):
        return lax.fori_loop(0, n, body, carry)

    def chunk(carry, _):
        state, div_sum, block_sum = advance((*carry, zero), stride)
        first = jax.tree.map(lambda x: x[0], state)
        # Divergence curve: the mean over the `stride` iterations since the previous record, so that a
        # moving average over a multiple of `stride` iterations is exact at every record.
        return (state, div_sum), (diagnose(problem, first, hyper, with_loss=with_loss), block_sum / stride)

    n_records, rest = divmod(steps, stride)
    carry = (state0, zero)
    if rest:
        carry = advance((*carry, zero), rest)[:2]
    carry, (rec, div_curve) = lax.scan(chunk, carry, None, length=n_records)
    state, div_sum = carry

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
    return dict(
        finite=finite,
        first_nonfinite=first_bad,
        final_loss=rec.loss[-1],
        growth_rate=slope,
        growth_stderr=stderr,
        final_update=rec.update_norm[-1],
        final_norm=rec.kernel_norm[-1],
        max_abs_kernel=jnp.where(jnp.all(rec.finite), jnp.max(rec.kernel_max), jnp.inf),
        loss_oscillation=oscillation,
        divergence=div_sum / tail if compare else jnp.full((), jnp.nan, kernel0.dtype),
        curve_loss=rec.loss,
        curve_update_norm=rec.update_norm,
        curve_divergence=div_curve if compare else jnp.full_like(rec.loss, jnp.nan),
        record_iterations=rec.iteration,
    )


@functools.partial(jax.jit, static_argnames=("scheme", "model", "steps", "stride", "tail", "compare", "with_loss", "groups", "map_batch"))
def _run_batch(problem, kernel0, hypers, compare_k, *, scheme, model, steps, stride, tail, compare, with_loss, groups, map_batch):
    run = functools.partial(_run_one, problem, kernel0, scheme=scheme, model=model, steps=steps, stride=stride, tail=tail,
                            compare=compare, with_loss=with_loss)
    return map_configs(lambda args: run(*args), (hypers, compare_k), groups=groups, map_batch=map_batch)


FFT_MAP_BATCH = 8  # configurations per vmapped group when a step is correlation-bound (FFT or separable)


# --- results ---------------------------------------------------------------------------------

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
      spec: everything that defines the sweep (JSON-serialisable).
      rule: the classification thresholds used.
    """

    lr: np.ndarray
    alpha: np.ndarray
    status: np.ndarray
    metrics: dict[str, np.ndarray]
    curves: dict[str, np.ndarray]
    record_iterations: np.ndarray
    spec: dict[str, Any]
    rule: Rule
    image: np.ndarray | None = dataclasses.field(default=None, repr=False)

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
                    row[name] = bool(value) if arr.dtype == bool else (int(value) if arr.dtype.kind == "i" else _json_float(value))
                out.append(row)
        return out

    def to_csv(self, path: str | os.PathLike) -> Path:
        rows = self.rows()
        path = Path(path)
        with _atomic_open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return path

    def to_dict(self) -> dict[str, Any]:
        return dict(spec=self.spec, rule=self.rule.to_dict(), counts=self.counts(), runs=self.rows())

    def to_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        with _atomic_open(path, "w") as fh:
            json.dump(self.to_dict(), fh, indent=1)
        return path


def _json_float(value) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def classify_metrics(metrics: dict[str, np.ndarray], rule: Rule, spec: dict[str, Any]) -> np.ndarray:
    eps = np.finfo(np.dtype(spec["dtype"])).eps
    with np.errstate(invalid="ignore"):
        at_rounding = np.isfinite(metrics["final_update"]) & (metrics["final_update"] <= rule.rounding * eps * metrics["final_norm"])
    return classify(
        metrics["finite"],
        metrics["growth_rate"],
        metrics["growth_stderr"],
        at_rounding,
        metrics["divergence"] if spec["compare_k"] is not None else None,
        rule,
    )


# --- persistence -------------------------------------------------------------------------------

def _chunk_path(out: Path, index: int) -> Path:
    return out / f"chunk_{index:05d}.npz"


def _save_chunk(out: Path, index: int, arrays: dict[str, np.ndarray]) -> None:
    with _atomic_open(_chunk_path(out, index), "wb") as fh:
        np.savez(fh, **arrays)


def _load_chunk(out: Path, index: int, names: Sequence[str]) -> dict[str, np.ndarray] | None:
    path = _chunk_path(out, index)
    if not path.exists():
        return None
    try:
        with np.load(path) as data:
            return {name: data[name] for name in names}
    except Exception:  # a damaged file is recomputed, never trusted
        return None


def _prepare_out(out: Path, spec: dict[str, Any]) -> None:
    manifest = out / MANIFEST
    if manifest.exists():
        try:
            stored = json.loads(manifest.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"out={str(out)!r}: its {MANIFEST} is unreadable ({err}); use an empty directory") from None
        if stored.get("spec") != json.loads(json.dumps(spec)):
            diff = sorted(k for k in set(stored.get("spec", {})) | set(spec) if stored.get("spec", {}).get(k) != json.loads(json.dumps(spec)).get(k))
            raise ValueError(f"out={str(out)!r} holds a different sweep (differs in: {', '.join(diff)}); use another directory")
        return
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"out={str(out)!r} is not empty and holds no jaxcfl sweep manifest; use an empty or new directory")
    with _atomic_open(manifest, "w") as fh:
        json.dump(dict(jaxcfl=__version__, spec=spec), fh, indent=1)


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
    scheme: str,
    model: str,
    steps: int,
    compare_k: float | None = None,
    record_points: int = 100,
    tail: int = 100,
    chunk_size: int = 256,
    mesh: Mesh | None = None,
    out: Path | None = None,
    spec: dict[str, Any] | None = None,
    progress: bool | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
    with_loss: bool = True,
    width: int | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Run a flat batch of configurations (``hypers`` with a leading axis) in chunks.

    Returns the per-configuration arrays (summaries and ``curve_*``) and the
    record iterations. This is the engine behind :func:`sweep` and
    :func:`jaxcfl.empirical_bounds`. ``with_loss=False`` skips the loss records
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
    # A linearised step by matrix products (dense or separable normal operator) is best as one
    # wide vmap; correlation-bound steps run FFT_MAP_BATCH configurations at a time.
    by_products = model != "nonlinear" and (problem.normal_matrix is not None or problem.gram is not None)
    map_batch = None if by_products else min(FFT_MAP_BATCH, width // n_dev)
    n_chunks = -(-n // chunk_size)
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec("config"))
    problem_d = jax.device_put(problem, replicated)
    kernel_d = jax.device_put(kernel0, replicated)
    names = None
    results: list[dict[str, np.ndarray]] = []
    bar = _progress_bar(n_chunks, progress, "sweep")
    for index in range(n_chunks):
        lo, hi = index * chunk_size, min(n, (index + 1) * chunk_size)
        cached = _load_chunk(out, index, names or _output_names()) if out is not None else None
        if cached is None:
            take = np.minimum(np.arange(width) + lo, hi - 1)  # pad with the chunk's last configuration
            hyp = jax.device_put(jax.tree.map(lambda x: x[take], hypers), sharded)
            ck = jax.device_put(np.full(width, 1.0 if compare_k is None else compare_k, kernel0.dtype), sharded)
            res = _run_batch(problem_d, kernel_d, hyp, ck, scheme=scheme, model=model, steps=steps, stride=stride, tail=tail,
                             compare=compare, with_loss=with_loss, groups=n_dev, map_batch=map_batch)
            res = {k: np.asarray(val)[: hi - lo] for k, val in jax.device_get(res).items()}
            if out is not None:
                _save_chunk(out, index, res)
            cached = res
        names = list(cached)
        results.append(cached)
        if bar is not None:
            bar.update(1)
        if on_chunk is not None:
            on_chunk(index + 1, n_chunks)
    if bar is not None:
        bar.close()
    merged = {k: np.concatenate([r[k] for r in results]) for k in results[0]}
    iterations = merged.pop("record_iterations")[0]
    return merged, iterations


def _output_names() -> list[str]:
    return [*SUMMARY_FIELDS, *(f"curve_{c}" for c in CURVE_FIELDS), "record_iterations"]


def _grid(name: str, values: ArrayLike) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(values, dtype=np.float64))
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
    scheme: str = "gd",
    model: str = "linear",
    pool: str = "sum",
    beta: float = 1.0,
    a: float = -0.5,
    label: float = 1.0,
    bias: float = 0.0,
    momentum: float = 0.9,
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
      image, kernel_size, pool: the problem (:func:`jaxcfl.make_problem`).
      lr, alpha: scalars or 1-D arrays; the grid is their outer product.
      scheme: ``"gd"`` or ``"nesterov"`` (``lr`` is ``dt``; ``momentum`` is ``mu``).
      model: ``"linear"``, ``"nonconstant"``, ``"activated"`` or ``"nonlinear"``.
      beta, a, label, bias: the model's constants.
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
      rule: classification thresholds (:class:`jaxcfl.classify.Rule`).
      operator: how correlations (and the linearised models' ``W C^T C W``) are
        applied: ``"fft"`` (FFT correlations, any image), ``"separable"``
        (products with the Toeplitz matrices of a low-rank image's factors, see
        :func:`jaxcfl.make_problem`), ``"dense"`` (linearised models only: an
        assembled ``w^2 x w^2`` matrix, one GEMM for a whole chunk), or
        ``"auto"``: separable when the image has cheap separable factors (the
        checkerboard has rank 1) unless the dense matrix is cheaper still, else
        dense for linearised models with ``w <= 64``, else FFT. Same scheme,
        different rounding; ``spec["operator"]`` records the choice.

    Returns:
      :class:`SweepResult`.
    """
    lr_grid = _grid("lr", lr)
    alpha_grid = _grid("alpha", alpha)
    v.check_positive("lr", lr_grid)
    v.check_nonnegative("alpha", alpha_grid)
    problem, kernel0, hypers, spec = setup_configs(
        image, kernel_size, np.repeat(lr_grid, alpha_grid.size), np.tile(alpha_grid, lr_grid.size),
        scheme=scheme, model=model, pool=pool, beta=beta, a=a, label=label, bias=bias, momentum=momentum,
        steps=steps, compare_k=compare_k, key=key, kernel=kernel, record_points=record_points, chunk_size=chunk_size,
        operator=operator,
    )
    spec.update(lr=lr_grid.tolist(), alpha=alpha_grid.tolist())
    out_path = None if out is None else Path(out)
    if out_path is not None:
        _prepare_out(out_path, spec)
    flat, iterations = run_configs(
        problem, kernel0, hypers, scheme=spec["scheme"], model=model, steps=spec["steps"], compare_k=compare_k,
        record_points=record_points, chunk_size=chunk_size, mesh=mesh, out=out_path, progress=progress,
    )
    shape = (lr_grid.size, alpha_grid.size)
    metrics = {k: flat[k].reshape(shape) for k in SUMMARY_FIELDS}
    curves = {c: flat[f"curve_{c}"].reshape(*shape, -1) for c in CURVE_FIELDS}
    result = SweepResult(lr_grid, alpha_grid, classify_metrics(metrics, rule, spec), metrics, curves, iterations, spec, rule,
                         image=np.asarray(problem.image))
    if out_path is not None:
        result.to_json(out_path / "result.json")
        result.to_csv(out_path / "result.csv")
    return result


OPERATORS = ("auto", "fft", "dense", "separable")
DENSE_LIMIT = 64 * 64  # largest w^2 for which "auto" assembles the dense operator


def _choose_operator(operator: str, image, kernel_size: int, pool: str, model: str) -> tuple[Problem, str]:
    """The problem with the correlation operator that ``operator`` names (resolving ``"auto"``)."""
    if operator == "dense" and model == "nonlinear":
        raise ValueError("operator='dense' applies to the linearised models only; the nonlinear model needs "
                         "operator='fft' or 'separable'")
    problem = make_problem(image, kernel_size, pool=pool, operator="fft" if operator == "dense" else operator)
    if operator == "auto":
        w2 = problem.kernel_size**2
        linear = model != "nonlinear" and w2 <= DENSE_LIMIT
        if problem.rank is not None:
            # Normal operator: 2 r^2 w^3 multiply-adds (separable) against w^4 (dense).
            operator = "dense" if linear and w2 < 2 * problem.rank**2 * problem.kernel_size else "separable"
        else:
            operator = "dense" if linear else "fft"
    if operator == "dense":
        problem = with_dense_operator(problem)
    return problem, operator


def setup_configs(image, kernel_size, lr_flat, alpha_flat, *, scheme, model, pool, beta, a, label, bias, momentum, steps,
           compare_k, key, kernel, record_points, chunk_size, operator="auto"):
    """Validate everything and build the problem, the initial kernel, the batched Hyper and the spec."""
    scheme = canonical_scheme(scheme)
    v.check_choice("operator", operator, OPERATORS)
    v.check_choice("model", model, MODELS)
    steps = v.check_int("steps", steps, minimum=1)
    v.check_int("record_points", record_points, minimum=3)
    v.check_int("chunk_size", chunk_size, minimum=1)
    if compare_k is not None:
        v.check_positive("compare_k", compare_k)
    v.check_unit_interval("momentum", momentum)
    problem, operator = _choose_operator(operator, image, kernel_size, pool, model)
    if kernel is None:
        key = jax.random.key(0) if key is None else key
        kernel0 = jax.random.normal(key, problem.kernel_shape, problem.dtype)
    else:
        kernel0 = jnp.asarray(kernel, problem.dtype)
        if kernel0.shape != problem.kernel_shape:
            raise ValueError(f"kernel must have shape {problem.kernel_shape}, got {kernel0.shape}")
        v.check_finite("kernel", kernel0)
    n = lr_flat.size
    hypers = make_hyper(
        jnp.asarray(lr_flat, problem.dtype), jnp.asarray(alpha_flat, problem.dtype),
        beta=jnp.full((n,), beta), a=jnp.full((n,), a), label=jnp.full((n,), label), bias=jnp.full((n,), bias),
        k=jnp.ones((n,)), mu=jnp.full((n,), momentum), dtype=problem.dtype,
    )
    spec = dict(
        image=fingerprint(problem.image), image_shape=list(problem.image_shape), kernel_size=problem.kernel_size,
        kernel=fingerprint(kernel0), scheme=scheme, model=model, pool=pool, beta=float(beta), a=float(a),
        label=float(label), bias=float(bias), momentum=float(momentum), steps=steps,
        compare_k=None if compare_k is None else float(compare_k), record_points=record_points,
        chunk_size=chunk_size, dtype=str(np.dtype(problem.dtype)), operator=operator,
    )
    return problem, kernel0, hypers, spec
