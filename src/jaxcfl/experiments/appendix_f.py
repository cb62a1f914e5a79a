"""Appendix F: the largest stable learning rate of multi-layer networks against ``2 / alpha``.

Sun et al. (JMLR 25(174) 2024, appendix F) linearise the gradient flow of any
network with weight decay, ``K_t = -grad l(K) - alpha K`` (eq 48). Von Neumann
analysis of forward Euler gives the amplifier ``A(w) = 1 - dt (alpha + F(w))``
(eq 49), so the step is stable for ``dt < min_w 2 / (alpha + F(w))`` (eq 50),
which tends to ``dt < 2 / alpha`` when the weight decay dominates (eq 51). The
paper's appendix figure plots, for standard networks, the empirically largest
stable learning rate divided by ``2 / alpha`` against ``alpha``: the ratio tends
to 1 as ``alpha`` grows.

Set-up here: full-batch gradient descent on ``cross-entropy + alpha/2 ||p||^2``
over a fixed subset of the built-in digits (:func:`jaxcfl.data.load`, the first
``train_size`` training images, normalised), from one seeded initialisation,
for three architectures:

* ``mlp``: 784-128-10, tanh;
* ``cnn``: two 3x3 conv-ReLU-avgpool blocks (8 and 16 channels) and a linear
  classifier. Its convolutions are 9 shifted slices and one matmul: XLA on CPU
  runs the weight gradient of ``lax.conv`` about 15x slower inside a loop
  (``lax.scan``, as :func:`jaxcfl.sharpness.max_stable_lr` runs the steps) than
  outside one (jax-ml/jax#12868), and turns a vmap over weights into grouped
  convolutions; matmuls have neither problem. (The slices are cheap at this size;
  ``jaxcfl.nn.nets``' own ``"cnn"`` keeps ``lax.conv`` and BatchNorm.)
* ``resnet20``: :func:`jaxcfl.nn.nets.create` (``in_channels=1``), BatchNorm in
  training mode on the fixed batch (the running statistics are an input only).
  It is slow on a CPU for the reason above, hence its tiny default batch.

For each ``(model, alpha)``, :func:`jaxcfl.sharpness.max_stable_lr` finds the
largest stable ``lr`` (``steps`` steps; stable: every loss finite and the final
objective not above the initial one), and the row reports
``ratio = max_lr / (2 / alpha)``. Beside it: the sharpness ``l_max`` of the data
loss at the initialisation (:func:`jaxcfl.sharpness.sharpness`, the same for every
``alpha``) and the quadratic prediction of eq 50 with ``F_max = l_max``,
``2 / (alpha + l_max)``, whose ratio is ``alpha / (alpha + l_max)``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from jaxcfl._core import validate as v
from jaxcfl import plot
from jaxcfl.nn import _data as data
from jaxcfl.nn import nets as nets
from jaxcfl.pde import _theory as theory
from jaxcfl._core.results import ResultDir, Stopwatch, stderr
from jaxcfl._core.text import table
from jaxcfl._core.curvature import BELOW_RANGE, FOUND, max_stable_lr, sharpness
from jaxcfl.nn._preset import cross_entropy, network_loss
from jaxcfl.experiments import _options
from jaxcfl.experiments._options import COUNT, POSITIVE, SEED, option

ARCHITECTURES = ("mlp", "cnn", "resnet20")
"""The networks whose largest stable lr is measured (not :data:`jaxcfl.MODELS`, the PDE's right-hand sides)."""
DEFAULT_ALPHAS = (1.0, 10.0, 100.0, 1000.0)
#: Per-model default ``(train_size, steps)``: sized so that the default command takes minutes on a 2-core CPU.
DEFAULT_WORKLOAD = {"mlp": (256, 100), "cnn": (64, 50), "resnet20": (2, 10)}
DEFAULT_RTOL = 0.05
SHARPNESS_ITERATIONS = 20  # Lanczos steps: the top eigenvalue converges first (its residual bound is reported)
SEARCH = dict(initial_points=2, candidates=2)  # two runs per compiled call: vmap width is costly for convolutions
ROW_KEYS = ("model", "alpha", "max_lr", "ratio")
DEFAULT_OUT = "jaxcfl-appendix-f"


# --- the models --------------------------------------------------------------------------------

# Initialisation: N(0, gain / fan_in) weights (LeCun for tanh, He for ReLU), zero biases, drawn with
# NumPy (eager jax.random compiles one program per shape: seconds on a busy CPU).

def _normal(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, gain: float) -> np.ndarray:
    return rng.standard_normal(shape) * np.sqrt(gain / fan_in)


def _mlp_init(rng: np.random.Generator, hidden: int = 128) -> dict[str, np.ndarray]:
    return dict(w1=_normal(rng, (784, hidden), 784, 1.0), b1=np.zeros(hidden),
                w2=_normal(rng, (hidden, 10), hidden, 1.0), b2=np.zeros(10))


def mlp_logits(p: dict[str, Array], x: Array) -> Array:
    """The 784-128-10 tanh MLP of ``workload("mlp")``: logits of the images ``x`` (N, 28, 28, 1)."""
    hidden = jnp.tanh(x.reshape(x.shape[0], -1) @ p["w1"] + p["b1"])
    return hidden @ p["w2"] + p["b2"]


def _mlp_loss(p: dict[str, Array], x: Array, y: Array) -> Array:
    return cross_entropy(mlp_logits(p, x), y)


def _conv3x3(x: Array, w: Array, b: Array) -> Array:
    """'Same' 3x3 cross-correlation (NHWC, HWIO) as 9 shifted slices and one matmul."""
    n, h, width, c = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate([padded[:, i:i + h, j:j + width] for i in range(3) for j in range(3)], axis=-1)
    return patches @ w.reshape(9 * c, -1) + b


def _avgpool2(x: Array) -> Array:
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _cnn_init(rng: np.random.Generator, channels: tuple[int, int] = (8, 16)) -> dict[str, np.ndarray]:
    c1, c2 = channels
    return dict(w1=_normal(rng, (3, 3, 1, c1), 9, 2.0), b1=np.zeros(c1),
                w2=_normal(rng, (3, 3, c1, c2), 9 * c1, 2.0), b2=np.zeros(c2),
                w3=_normal(rng, (7 * 7 * c2, 10), 7 * 7 * c2, 1.0), b3=np.zeros(10))


def cnn_logits(p: dict[str, Array], x: Array) -> Array:
    """The small CNN of ``workload("cnn")`` (two conv-ReLU-avgpool blocks, linear head): logits of ``x``."""
    x = _avgpool2(jax.nn.relu(_conv3x3(x, p["w1"], p["b1"])))
    x = _avgpool2(jax.nn.relu(_conv3x3(x, p["w2"], p["b2"])))
    return x.reshape(x.shape[0], -1) @ p["w3"] + p["b3"]


def _cnn_loss(p: dict[str, Array], x: Array, y: Array) -> Array:
    return cross_entropy(cnn_logits(p, x), y)


@dataclasses.dataclass(frozen=True)
class Workload:
    """One model on its fixed full batch: the objective is ``loss_fn(params, *args) + alpha/2 ||params||^2``."""

    model: str
    loss_fn: Callable[..., Array]
    params: Any
    args: tuple
    num_params: int


def workload(model: str, *, train_size: int | None = None, seed: int = 0) -> Workload:
    """Build ``model`` (one of :data:`ARCHITECTURES`) and its batch: the first ``train_size`` built-in training images.

    Args:
      model: ``"mlp"``, ``"cnn"`` or ``"resnet20"``.
      train_size: number of images (default: :data:`DEFAULT_WORKLOAD`'s for the model).
      seed: PRNG seed of the initialisation.

    Returns:
      :class:`Workload` (float32, or float64 under ``jax_enable_x64``).
    """
    v.check_choice("model", model, ARCHITECTURES)
    meta = data.info("builtin")
    train_size = DEFAULT_WORKLOAD[model][0] if train_size is None else train_size
    train_size = v.check_int("train_size", train_size, minimum=1)
    if train_size > meta.train_size:
        raise ValueError(f"train_size must be at most {meta.train_size} (the built-in training split), got {train_size}")
    x, y, _, _ = data.load("builtin")
    dtype = jnp.result_type(float)
    x = jnp.asarray(data.normalize(x[:train_size], meta.mean, meta.std), dtype)
    y = jnp.asarray(y[:train_size])
    if model == "resnet20":
        graphdef, params, batch_stats = nets.split(nets.create(model, in_channels=1, rngs=seed))
        loss_fn, args = network_loss(graphdef), (batch_stats, x, y)
    else:
        init, loss_fn = {"mlp": (_mlp_init, _mlp_loss), "cnn": (_cnn_init, _cnn_loss)}[model]
        params, args = init(np.random.default_rng(seed)), (x, y)
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    return Workload(model, loss_fn, params, args, nets.count_params(params))


# --- one measurement ---------------------------------------------------------------------------

def measure(
    loss_fn: Callable[..., Array],
    params: Any,
    *args: Any,
    alpha: float,
    steps: int,
    rtol: float = DEFAULT_RTOL,
    sharpness_max: float | None = None,
) -> dict[str, Any]:
    """The largest stable lr of gradient descent on ``loss_fn(params, *args) + alpha/2 ||params||^2``, against eq 51.

    Calls :func:`jaxcfl.sharpness.max_stable_lr` on ``lr_range = (guess / 2, 3 / alpha)``
    with ``guess`` the prediction of eq 50, ``2 / (alpha + sharpness_max)`` (``2 / alpha``
    without it); when even the low end is unstable, once more a hundred times lower.

    Args:
      loss_fn, params, *args: as in :func:`~jaxcfl.sharpness.max_stable_lr`.
      alpha: weight decay (> 0).
      steps: gradient-descent steps per run.
      rtol: relative width of the final bracket.
      sharpness_max: the largest Hessian eigenvalue of ``loss_fn`` at ``params`` (without
        ``alpha``), if known: it sets the search range and the predicted columns.

    Returns:
      ``{"alpha", "max_lr", "ratio", "bound", "predicted_lr", "predicted_ratio", "status",
      "bracket", "evaluations", "rounds", "seconds", "notes"}``; ``ratio = max_lr / (2 / alpha)``;
      ``max_lr``/``ratio`` are ``None`` unless ``status == "found"``.

    References:
      Sun et al., JMLR 25(174) 2024, appendix F, eqs 49-51.
    """
    bound = theory.multilayer_lr_bound(alpha)  # eq 51: 2 / alpha
    lam = None if sharpness_max is None else max(float(sharpness_max), 0.0)
    guess = bound if lam is None else theory.multilayer_lr_bound(alpha, lam)  # eq 50 with F_max = l_max
    lr_range = (guess / 2, 1.5 * bound)
    clock = Stopwatch()
    res = max_stable_lr(loss_fn, params, *args, alpha=alpha, steps=steps, rtol=rtol, lr_range=lr_range, **SEARCH)
    evaluations, rounds, notes = res.evaluations, res.rounds, list(res.notes)
    if res.status == BELOW_RANGE:
        res = max_stable_lr(loss_fn, params, *args, alpha=alpha, steps=steps, rtol=rtol,
                            lr_range=(lr_range[0] / 100, lr_range[0]), **SEARCH)
        evaluations, rounds, notes = evaluations + res.evaluations, rounds + res.rounds, notes + res.notes
    found = res.status == FOUND
    return dict(
        alpha=float(alpha),
        max_lr=res.max_lr if found else None,
        ratio=res.max_lr / bound if found else None,
        bound=bound,
        predicted_lr=None if lam is None else guess,
        predicted_ratio=None if lam is None else guess / bound,
        status=res.status,
        bracket=list(res.bracket) if found else None,
        evaluations=evaluations,
        rounds=rounds,
        seconds=clock.seconds(),
        notes=notes,
    )


def top_eigenvalue(work: Workload) -> tuple[float, float]:
    """``(l_max, residual bound)`` of the data loss's Hessian at the initialisation (no weight decay)."""
    ext = sharpness(work.loss_fn, work.params, *work.args, iterations=min(work.num_params, SHARPNESS_ITERATIONS),
                    return_extremes=True)
    return ext.maximum, ext.residual_max


# --- the experiment ----------------------------------------------------------------------------

def _alpha(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not (
            np.isfinite(value) and value > 0):
        raise ValueError(f"alpha must be a finite number > 0 (eq 51 divides by it), got {value!r}")
    return float(v.check_in_dtype(name, value, "positive"))


@dataclasses.dataclass(frozen=True)
class Options(_options.Options):
    """``jaxcfl reproduce appendix-f``'s options."""

    models: tuple[str, ...] = option(ARCHITECTURES, "architectures (default: {default})", nargs="+",
                                     choices=ARCHITECTURES,
                                     kind=_options.Kind(None, lambda name, x: v.check_choice("model", x, ARCHITECTURES)))
    alphas: tuple[float, ...] = option(DEFAULT_ALPHAS, "weight decays alpha > 0 (default {default})",
                                       _options.Kind(_options.POSITIVE.parse, _alpha), nargs="+")
    train_size: int | None = option(None, "images in the full batch, all models (default per model, images/steps: "
                                    + ", ".join(f"{m} {n}/{s}" for m, (n, s) in DEFAULT_WORKLOAD.items()) + ")",
                                    COUNT)
    steps: int | None = option(None, "gradient-descent steps per run, all models (default per model, see "
                               "--train-size)", COUNT)
    rtol: float = option(DEFAULT_RTOL, "relative precision of each max lr (default {default})", POSITIVE)
    seed: int = option(0, "initialisation seed (default {default})", SEED)

    def validate(self) -> None:
        _options.clamp_sizes(self, "builtin", (("train_size", "train"),))


@_options.entry(Options)
def run(o: Options, *, out: str | Path | None = None, log: Callable[[str], None] = stderr) -> list[dict[str, Any]]:
    """Run appendix F; returns one row per ``(model, alpha)`` (JSON-able), in the order given.

    Args:
      models: any of :data:`ARCHITECTURES`.
      alphas: weight decays (each > 0).
      train_size, steps: images in the full batch and gradient-descent steps per run;
        ``None``: each model's default (:data:`DEFAULT_WORKLOAD`).
      rtol: relative precision of each max lr.
      seed: initialisation seed.
      out: output directory: ``rows/`` (one JSON per finished row, reused when the
        settings match), ``appendix_f.csv``, ``appendix_f.json`` (the rows) and
        ``appendix_f.png``; ``None``: nothing written.
      log: where progress lines go (default stderr).

    Each row: ``model``, ``alpha``, ``max_lr``, ``ratio`` (``max_lr / (2/alpha)``), then
    the sharpness ``l_max`` of the loss at the start with its Lanczos residual bound,
    ``predicted_lr`` ``2/(alpha + l_max)``, ``predicted_ratio``, the search's ``status``,
    ``bracket``, counts and time, and the settings.

    Raises:
      ValueError: an unknown model, a non-positive alpha, steps or train_size.
    """
    models, alphas, train_size, steps, rtol, seed = o.models, list(o.alphas), o.train_size, o.steps, o.rtol, o.seed
    results = ResultDir(out, kind="appendix_f", identity=o.identity())
    cache = results.row_cache(lambda s: f"{s['model']}_alpha{s['alpha']:g}")
    dtype = str(jnp.dtype(jnp.result_type(float)))
    rows: list[dict[str, Any]] = []
    for name in models:
        size = DEFAULT_WORKLOAD[name][0] if train_size is None else v.check_int("train_size", train_size)
        n_steps = DEFAULT_WORKLOAD[name][1] if steps is None else v.check_int("steps", steps)
        common = dict(model=name, train_size=size, steps=n_steps, rtol=float(rtol), seed=seed, dtype=dtype)
        cached = {a: cache.load(dict(common, alpha=a)) for a in alphas}
        work, lam = None, None
        for a in alphas:
            if cached[a] is not None:
                log(f"[appendix-f] {name} alpha {a:g}: reusing {cache.path(dict(common, alpha=a))}")
                rows.append(cached[a])
                continue
            if work is None:
                work = workload(name, train_size=size, seed=seed)
                reuse = [r for r in cached.values() if r is not None]  # same settings: same start, same l_max
                if reuse:
                    lam = (reuse[0]["sharpness"], reuse[0]["sharpness_residual"])
                else:
                    log(f"[appendix-f] {name}: {work.num_params} parameters, {size} images; sharpness at the start ...")
                    lam = top_eigenvalue(work)
                    log(f"[appendix-f]   l_max = {lam[0]:.4g} (residual bound {lam[1]:.2g})")
            log(f"[appendix-f] {name} alpha {a:g}: searching the largest stable lr ({n_steps} gd steps per run) ...")
            found = measure(work.loss_fn, work.params, *work.args, alpha=a, steps=n_steps, rtol=rtol, sharpness_max=lam[0])
            row = (dict(model=name, alpha=a, max_lr=found["max_lr"], ratio=found["ratio"], sharpness=lam[0],
                        sharpness_residual=lam[1]) | found | common | dict(params=work.num_params))
            cache.save(common | dict(alpha=a), row)
            ratio = "-" if row["ratio"] is None else f"{row['ratio']:.3f}"
            log(f"[appendix-f]   {row['status']}: max lr {row['max_lr']}, ratio {ratio} "
                f"(quadratic prediction {row['predicted_ratio']:.3f}) [{row['seconds']:.1f}s, {row['evaluations']} runs]")
            rows.append(row)
    if results.writes:  # the numbers first, then the figure
        written = [results.write_csv("appendix_f.csv", rows, joins={"bracket": " ", "notes": "; "}),
                   results.write_json("appendix_f.json", rows)]
        written += [f for f in [_options.figure_file(results.file("appendix_f.png"),
                                                     lambda: plot.ratio_vs_alpha(rows), log)] if f]
        log(f"[appendix-f] wrote {', '.join(written)}")
        results.close()
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    """The rows as a table, with the claim of eq 51."""
    fmt = lambda x, spec=".4g": "-" if x is None else format(x, spec)
    header = ["model", "alpha", "max lr", "2/alpha", "ratio", "l_max", "2/(alpha+l_max)", "pred. ratio", "images",
              "steps", "time"]
    body = [[r["model"], f"{r['alpha']:g}", fmt(r["max_lr"]), f"{r['bound']:.4g}", fmt(r["ratio"], ".3f"),
             fmt(r["sharpness"]), fmt(r["predicted_lr"]), fmt(r["predicted_ratio"], ".3f"), str(r["train_size"]),
             str(r["steps"]), f"{r['seconds']:.0f}s"] for r in rows]
    lines = [table(body, header), "",
             "ratio = max lr / (2/alpha). Appendix F (eq 51): the ratio tends to 1 as alpha grows. l_max: sharpness of the",
             "loss at the start; 2/(alpha+l_max): eq 50 for a quadratic loss. max lr: full-batch gd on a fixed batch, stable",
             f"= finite and not above the initial objective after the steps (rtol {rows[0]['rtol'] if rows else '-'})."]
    for r in rows:
        for note in r["notes"]:
            lines.append(f"note ({r['model']}, alpha {r['alpha']:g}): {note}")
    lines.append(f"total search time {sum(r['seconds'] for r in rows):.0f}s")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    Options.add_arguments(parser)
    _options.add_out(parser, DEFAULT_OUT, f"output directory (default ./{DEFAULT_OUT}); finished rows are reused")


def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    return run.call(Options.from_args(args), out=args.out)
