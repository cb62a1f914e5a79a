"""Section 4, Figure 2: the learning rate against the amplification of a last-bit perturbation.

Set-up (Sun et al., JMLR 25(174) 2024, Section 4, Figure 2): a Swish (beta = 5)
ResNet-56 on CIFAR-10, plain SGD without momentum, weight decay 5e-4, batch
128, no lr decay; lr = 0.1 / n trained for n epochs, so lr x iterations is the
same for every n (n in {2, 4, 8, 16, 32, 320, 3200, 32000}). Two copies, k = 1
and k = 3 of perturbed SGD, train in lockstep from one initialisation on the
same batches. The figure plots the divergence ``2 mean(|w1 - w2| / (|w1| + |w2|))``
of one conv layer's weights between the copies against the *scaled* iteration
``iteration / n``, one curve per n (log y). The paper's reading: the smaller the
lr, the less the perturbation is amplified per unit of scaled iteration, and at
lr = 3.125e-6 (n = 32000) it is not amplified at all (the CFL condition holds;
appendix, Section 4.2).

Each n is one :func:`jaxcfl.train.train` run with ``ks = (1, k)`` for ``n * E``
epochs, written to ``OUT/n{n}`` (checkpoint after every epoch, a snapshot of
copy 0 once per scaled epoch): a rerun resumes, and finished runs are not
trained again. Beside the curves it reports each run's growth rate per scaled
iteration with its standard error, whether the perturbation was amplified
beyond what re-injected rounding builds up, the lr threshold between the two,
the sharpness along every run (``2 / sharpness``: the CFL limit of gradient
descent) and :func:`jaxcfl.max_stable_lr` from the initialisation.

The default trains the small ``cnn`` (Swish, beta 5) on all built-in digits at
batch 16, lr = 0.3 / n for 4 n epochs, n in {1, 4, 16, 64, 256} (n = 1 reaches
93% test accuracy): about 25 minutes of training and 15 of analysis on a 2-core
CPU (docs/fig2.md). ``--model cnn_avg`` (average pools: no discrete choice in
the forward pass) is the variant in which the amplification stops where the CFL
condition starts to hold. ``--model resnet56 --dataset cifar10 --data-root DIR
--batch-size 128 --base-lr 0.1 --epochs-per-n 1 --augment --n 2 4 8 16 32 320
3200 32000`` is the paper's set-up.
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

from jaxcfl._core import validate as v
from jaxcfl.nn import _data as datasets
from jaxcfl._core import statistics as st
from jaxcfl._core.statistics import BEYOND_ACCUMULATION, SATURATION
from jaxcfl import plot
from jaxcfl._core.results import ResultDir, Stopwatch, read_json, stderr, write_json, write_npz
from jaxcfl._core.text import table
from jaxcfl.nn._preset import TrainConfig, TrainResult, init_lockstep, probe_mask, train
from jaxcfl.experiments import _options
from jaxcfl.experiments._options import BOOL, COUNT, COUNT0, NONNEGATIVE, PERTURBATION, POSITIVE, SEED, option

PAPER_N = (2, 4, 8, 16, 32, 320, 3200, 32000)
DEFAULT_N = (1, 4, 16, 64, 256)
BASE_LR = 0.3
PAPER_BASE_LR = 0.1
EPOCHS_PER_N = 4
PAPER_BETA = 5.0
DEFAULT_OUT = "jaxcfl-fig2"


def probe_path(config: TrainConfig) -> str:
    """The parameter path(s) the trainer's probe (``config.probe``) selects, e.g. ``['features'][0]['conv']['kernel']``."""
    in_channels = datasets.info(config.dataset).image_shape[-1]
    _, state = init_lockstep(config, (1.0,), in_channels, datasets.info(config.dataset).num_classes)
    params = state.copy(0).params
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return ", ".join(p for p, keep in zip(paths, probe_mask(params, config.probe)) if keep)


@dataclasses.dataclass(frozen=True)
class Options(_options.Options):
    """``jaxcfl reproduce fig2``'s options (defaults: the small ``cnn`` on the built-in digits; the paper's
    values in the help)."""

    n: tuple[int, ...] = option(DEFAULT_N, "lr = base-lr / n, trained n * epochs-per-n epochs (default {default}; "
                                "the paper's: " + " ".join(map(str, PAPER_N)) + ")", COUNT, nargs="+")
    base_lr: float = option(BASE_LR, f"lr of n = 1 (default {{default}}; the paper's: {PAPER_BASE_LR:g})", POSITIVE)
    epochs_per_n: int = option(EPOCHS_PER_N, "E: run n trains n * E epochs (default {default}; the paper's: 1)",
                               COUNT)
    k: float = option(3.0, "perturbation factor compared with k = 1 (default {default})", PERTURBATION)
    model: str = _options.network("cnn", "network (default {default}; the paper's: resnet56)")
    dataset: str = _options.dataset("dataset (default {default}; the paper's: cifar10)")
    data_root: str | None = _options.data_root("folder of the dataset's files (see jaxcfl.data.load)", settings=False)
    train_size: int | None = _options.split_size("training", "first N training images (default: all)")
    test_size: int | None = _options.split_size("test", "first N test images (default all)")
    batch_size: int = option(16, "batch (default {default}; the paper's: 128)", COUNT)
    activation: str = _options.activation("swish", "default {default}, as the paper")
    beta: float = option(PAPER_BETA, "Swish beta (default {default}, the paper's)", POSITIVE)
    weight_decay: float = option(_options.train_default("weight_decay"), "default {default}", NONNEGATIVE)
    augment: bool = option(False, "random crops (pad 4), and flips for CIFAR-10 / Fashion-MNIST (default off; the "
                           "paper's: on)", BOOL, action=argparse.BooleanOptionalAction)
    probe: str | None = option(None, "substring of the path of the conv weights whose divergence is plotted "
                               "(default: the trainer's, its first conv kernel)")
    seed: int = option(1, "batch order and augmentation (default {default})", SEED)
    init_seed: int = option(0, "the shared initialisation (default {default})", SEED)
    window: int = option(0, "moving average over this many scaled iterations (default 0: none)", COUNT0,
                         identity=False)  # the curves' smoothing only
    copies_mode: str = _options.copies_mode("trainer: vmap or unroll the two copies (default auto: unroll on CPU)")
    with_sharpness: bool = option(True, "skip the sharpness along the runs and max_stable_lr", BOOL,
                                  flag="--no-sharpness", action="store_false", identity=False)

    def validate(self) -> None:
        _options.refuse_unused_beta(self)
        _options.clamp_sizes(self, self.dataset)
        # the compared copy's step, at the largest lr: fl(lr k) and fl(d / k) must be normal numbers
        _options.refuse_reference_k(self, "k")
        v.check_perturbation(self.spelled("k"), self.k, lr=self.base_lr)

    def configs(self) -> dict[int, TrainConfig]:
        """Run n's :class:`jaxcfl.TrainConfig`: plain SGD at ``base_lr / n`` for ``n * epochs_per_n`` epochs."""
        return {m: TrainConfig(**_options.train_config_kwargs(
            self, epochs=m * self.epochs_per_n, lr=self.base_lr / m, momentum=0.0, nesterov=False, milestones=()))
            for m in self.n}


@_options.entry(Options)
def run(o: Options, *, out: str | Path | None = DEFAULT_OUT, progress: bool | None = None,
        log: Callable[[str], None] = stderr) -> dict[str, Any]:
    """Run Figure 2; returns ``{"rows": [...], "files": {...}, ...}`` (JSON-able).

    Args:
      n: lr = ``base_lr / n``, trained for ``n * epochs_per_n`` epochs (one lockstep run per n).
      base_lr: the lr of n = 1 (the paper's 0.1).
      epochs_per_n: E, the epochs of run n = 1 (the paper's 1).
      k: perturbation factor of the second copy (k = 1 is the first).
      model, dataset, data_root, train_size, test_size, batch_size: what is trained
        on what (:class:`jaxcfl.TrainConfig`).
      activation, beta: ``"swish"`` with beta 5 in the paper.
      weight_decay: 5e-4 in the paper. The optimiser is plain SGD (no momentum), constant lr.
      augment: random crop (pad 4), with flips for CIFAR-10 and Fashion-MNIST.
      probe: substring of the parameter path of the conv layer whose divergence is
        plotted (``None``: the trainer's default, its first convolution kernel).
      seed, init_seed: batch order and augmentation; the shared initialisation.
      window: moving average of each curve over ``window`` scaled iterations
        (``window * n`` iterations of run n); 0: none.
      copies_mode: how the trainer runs the two copies (:func:`jaxcfl.nn._preset.resolve_copies_mode`).
      with_sharpness: measure the sharpness along every run (:func:`sharpness_along`, needs
        ``out``) and :func:`initial_max_stable_lr`, to compare with the threshold lr.
      out: directory: ``n{n}/`` per run (the trainer's checkpoints and metrics),
        ``fig2.png``, ``fig2.csv``, ``fig2.json``, ``fig2_curves.npz``. ``None``:
        nothing written and nothing resumed.
      progress: the trainer's progress bar (``None``: only on a terminal).
      log: where progress lines go (default stderr).

    Each row: ``n``, ``lr``, ``epochs``, ``steps``, ``probe_divergence`` and
    ``divergence`` (all parameters) between the copies at the end,
    ``probe_divergence_max``, the final test accuracy of each copy, the epochs
    trained by this call (0 when the run was already finished in ``out``) and seconds.
    """
    clock = Stopwatch()
    ns, k, base_lr, epochs_per_n = list(o.n), o.k, o.base_lr, o.epochs_per_n
    configs = o.configs()
    probed = probe_path(configs[ns[0]])
    results_dir = ResultDir(out, kind="fig2", clock=clock, identity=o.identity())
    out = results_dir.path
    log(f"[fig2] {o.activation} {o.model} on {o.dataset}, plain SGD (wd {o.weight_decay:g}), lr = {base_lr:g}/n for "
        f"{epochs_per_n} n epochs, "
        f"n in {ns}, k = 1 vs {k:g}; probe {probed}")
    results: dict[int, TrainResult] = {}
    rows = []
    for m in ns:
        trained: list[int] = []
        run_clock = Stopwatch()
        run_dir = results_dir.file(f"n{m}") if results_dir.writes else None

        def on_epoch(epoch: int, partial: TrainResult, m=m, run_dir=run_dir, trained=trained) -> None:
            trained.append(epoch)
            if run_dir is not None and epoch % m == 0:  # one snapshot per scaled epoch, for the sharpness
                save_snapshot(run_dir / "snapshots" / f"epoch{epoch}.npz", partial.state)

        result = train(configs[m], ks=(1.0, k), seed=o.seed, out=run_dir, progress=progress, on_epoch=on_epoch,
                       copies_mode=o.copies_mode)
        results[m] = result
        resumed = configs[m].epochs - len(trained)
        rows.append(_row(m, result, len(trained), run_clock.seconds()))
        log(f"[fig2]   n = {m:<6d} lr {base_lr / m:<10.4g} {result.probe_divergence.shape[0]} steps: probe divergence "
            f"{rows[-1]['probe_divergence']:.3g}, all parameters {rows[-1]['divergence']:.3g}"
            + (f"; {resumed} of {configs[m].epochs} epochs resumed from {out / f'n{m}'}" if resumed else "")
            + f"; {len(trained)} epochs trained")
    steps_per_epoch = results[ns[0]].probe_divergence.shape[0] // configs[ns[0]].epochs
    curves = _curves(results, o.window)
    threshold = amplification_threshold(rows)
    sharp = sharpness_along(results, out, log=log) if o.with_sharpness else {}
    for row in rows:
        records = sharp.get(row["n"], [])
        row["sharpness_max"] = max((r["sharpness"] for r in records), default=None)
        row["two_over_sharpness"] = None if row["sharpness_max"] is None else 2.0 / row["sharpness_max"]
        row["cfl_holds"] = None if row["sharpness_max"] is None else bool(row["lr"] < row["two_over_sharpness"])
    if o.with_sharpness:
        log("[fig2] max_stable_lr of full-batch gradient descent from the initialisation ...")
    stable = initial_max_stable_lr(configs[ns[0]]) if o.with_sharpness else None
    payload: dict[str, Any] = dict(
        experiment="fig2",
        settings=o.settings(momentum=0.0, nesterov=False, milestones=[], probe_path=probed),
        steps_per_epoch=steps_per_epoch,
        rows=rows,
        threshold=threshold,
        sharpness={str(n): records for n, records in sharp.items()},
        max_stable_lr=stable,
    )
    payload["answer"] = answer(payload)
    files = {} if out is None else dict(  # the numbers first, then the figure
        csv=results_dir.write_csv("fig2.csv", rows), npz=results_dir.write_npz("fig2_curves.npz", _curve_arrays(curves, rows)),
        runs=str(out / "n{n}"))
    if out is not None:
        png = _options.figure_file(results_dir.file("fig2.png"), lambda: figure(curves, payload), log)
        files.update({"png": png} if png else {})
    return results_dir.finish(payload, "fig2.json", files)


def save_snapshot(path: Path, state: Any) -> None:
    """Copy 0's parameters and batch statistics, as ``leaf_<i>`` arrays (read by :func:`load_snapshot`)."""
    first = state.copy(0)
    leaves = jax.tree.leaves(jax.device_get((first.params, first.model_state)))
    write_npz(path, {f"leaf_{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)})


def load_snapshot(path: Path, template: Any) -> Any:
    """The ``(params, batch_stats)`` of :func:`save_snapshot`, in the structure of ``template``."""
    leaves, treedef = jax.tree.flatten(template)
    with np.load(path) as z:
        return jax.tree.unflatten(treedef, [jnp.asarray(z[f"leaf_{i}"]) for i in range(len(leaves))])


def _row(n: int, result: TrainResult, epochs_trained: int, seconds: float) -> dict[str, Any]:
    probe = result.probe_divergence[:, 1]
    acc = result.test_accuracy[-1]
    return dict(n=n, lr=result.config.lr, epochs=result.epochs_done, steps=int(probe.size),
                probe_divergence=float(probe[-1]), divergence=float(result.step_divergence[-1, 1]),
                probe_divergence_max=float(probe.max()), test_accuracy_k1=float(acc[0]),
                test_accuracy_k=float(acc[1]), epochs_trained=epochs_trained, seconds=seconds,
                compile_seconds=result.compile_seconds, **amplification(result.step_divergence[:, 1], n),
                divergence_at=divergence_at(result.step_divergence[:, 1], n, result.config.epochs // n))


SCALED_EPOCHS = (0.25, 1.0)
"""Scaled epochs (epochs / n) at which every run's divergence is reported, beside the end."""


def divergence_at(curve: np.ndarray, n: int, scaled_epochs: int) -> dict[str, float]:
    """The all-weights divergence at :data:`SCALED_EPOCHS` and at the end, keyed by the scaled epoch.

    Figure 2's reading at equal scaled time: every run has then taken the same lr x iterations.
    """
    per_epoch = curve.size / (n * scaled_epochs)
    marks = [e for e in SCALED_EPOCHS if e < scaled_epochs] + [float(scaled_epochs)]
    return {f"{e:g}": float(curve[max(0, int(round(e * n * per_epoch)) - 1)]) for e in marks}


def amplification(curve: np.ndarray, n: int) -> dict[str, Any]:
    """:func:`jaxcfl.statistics.amplification` of run n's divergence ``curve``, its slope per scaled
    iteration (``iteration / n``); with :data:`SATURATION` and :data:`BEYOND_ACCUMULATION` it lives there."""
    return st.amplification(curve, scale=n)


def amplification_threshold(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The lr below which the perturbation is no longer amplified, bracketed by the runs.

    ``bracket = (largest lr not amplified, smallest lr amplified)`` when every amplified
    lr lies above every non-amplified one (``ordered``); ``lr``: their geometric mean.
    """
    amp = sorted(r["lr"] for r in rows if r["amplified"])
    calm = sorted(r["lr"] for r in rows if not r["amplified"])
    ordered = not amp or not calm or max(calm) < min(amp)
    out: dict[str, Any] = dict(ordered=ordered, amplified_lrs=amp, not_amplified_lrs=calm, bracket=None, lr=None)
    if ordered and amp and calm:
        out["bracket"] = [max(calm), min(amp)]
        out["lr"] = float(np.sqrt(max(calm) * min(amp)))
    if not calm:
        out["note"] = f"amplified at every lr down to {min(amp):.3g}: the threshold lies below"
    elif not amp:
        out["note"] = f"not amplified at any lr up to {max(calm):.3g}: the threshold lies above"
    elif not ordered:
        out["note"] = "amplified and non-amplified lrs interleave: no single threshold"
    return out


def sharpness_along(results: dict[int, TrainResult], out: Path | None, *, batch: int = 256,
                    iterations: int = 20, log: Callable[[str], None] = stderr) -> dict[int, list[dict[str, float]]]:
    """Sharpness of the training loss (plus weight decay) at the initialisation and every scaled epoch of each run.

    The loss is the cross-entropy on the first ``batch`` training images, BatchNorm in
    training mode (:func:`jaxcfl.train.network_loss`), plus ``weight_decay / 2 ||p||^2``;
    its top Hessian eigenvalue comes from :func:`jaxcfl.sharpness` (Lanczos, ``iterations``
    steps). The weights are copy 0's snapshots (:func:`save_snapshot`, written by
    :func:`run` once per scaled epoch), so this needs ``out``; values are cached in
    ``OUT/n{n}/sharpness.json``.
    """
    from jaxcfl._core.curvature import sharpness
    from jaxcfl.nn._preset import load_data, network_loss

    if out is None or not results:
        return {}
    first = next(iter(results.values()))
    x_train, y_train, _, _, meta = load_data(first.config)
    x = jnp.asarray(datasets.normalize(x_train[:batch], meta.mean, meta.std))
    y = jnp.asarray(y_train[:batch])
    graphdef, init = init_lockstep(first.config, (1.0,), meta.image_shape[-1], meta.num_classes)
    first = init.copy(0)
    template = (first.params, first.model_state)
    loss_fn = network_loss(graphdef)
    table: dict[int, list[dict[str, float]]] = {}
    for n, result in results.items():
        cache = out / f"n{n}" / "sharpness.json"
        settings = dict(batch=batch, iterations=iterations, weight_decay=result.config.weight_decay)
        saved = read_json(cache) or {}
        if saved.get("settings") == settings and len(saved.get("records", [])) == result.config.epochs // n + 1:
            table[n] = saved["records"]
            continue
        records = []
        for e in range(0, result.config.epochs + 1, n):
            snap = out / f"n{n}" / "snapshots" / f"epoch{e}.npz"
            if e and not snap.exists():
                continue
            params, stats = template if e == 0 else load_snapshot(snap, template)
            lam = sharpness(loss_fn, params, stats, x, y, alpha=result.config.weight_decay, iterations=iterations)
            records.append(dict(scaled_epoch=e // n, epoch=e, sharpness=float(lam), stable_lr=2.0 / float(lam)))
        log(f"[fig2]   n = {n}: sharpness " + ", ".join(f"{r['sharpness']:.3g}" for r in records)
            + f" at scaled epochs {[r['scaled_epoch'] for r in records]}")
        write_json(cache, dict(settings=settings, records=records), strict=False)
        table[n] = records
    return table


def initial_max_stable_lr(config: TrainConfig, *, batch: int = 64, steps: int = 20) -> dict[str, Any]:
    """:func:`jaxcfl.max_stable_lr` of full-batch gradient descent from the shared initialisation.

    On the first ``batch`` training images (BatchNorm in training mode), weight decay
    included, ``steps`` steps per candidate lr (stable: every loss finite and the final
    objective not above the initial one).
    """
    from jaxcfl._core.curvature import max_stable_lr
    from jaxcfl.nn._preset import load_data, network_loss

    x_train, y_train, _, _, meta = load_data(config)
    x = jnp.asarray(datasets.normalize(x_train[:batch], meta.mean, meta.std))
    graphdef, init = init_lockstep(config, (1.0,), meta.image_shape[-1], meta.num_classes)
    params, stats = init.copy(0).params, init.copy(0).model_state
    res = max_stable_lr(network_loss(graphdef), params, stats, x, jnp.asarray(y_train[:batch]),
                        alpha=config.weight_decay, steps=steps, lr_range=(1e-3, 1e2), rtol=0.05,
                        initial_points=6, candidates=2)
    return dict(max_lr=res.max_lr if res.found else None, status=res.status, bracket=res.bracket, batch=batch,
                steps=steps, seconds=res.seconds, notes=res.notes)


def _curves(results: dict[int, TrainResult], window: int) -> dict[int, dict[str, np.ndarray]]:
    """Per n: the probe and all-parameter divergence (k = 1 vs k) after every step, against scaled iteration."""
    curves = {}
    for n, result in results.items():
        probe = result.probe_divergence[:, 1]
        scaled = np.arange(1, probe.size + 1) / n
        w = window * n
        curves[n] = dict(scaled_iteration=scaled, probe=probe, divergence=result.step_divergence[:, 1],
                         smoothed_iteration=scaled[w - 1:] if w else scaled,
                         smoothed=plot.moving_average(probe, w) if w else probe)
    return curves


def answer(payload: dict[str, Any]) -> str:
    """Plain words: does a smaller lr amplify less per scaled iteration, and where does amplification stop?"""
    rows = sorted(payload["rows"], key=lambda r: -r["lr"])
    slopes = [(r["lr"], r["slope"], r["slope_stderr"]) for r in rows]
    known = [sl for _, sl, _ in slopes if sl is not None]
    monotone = all(a >= b for a, b in zip(known, known[1:]))
    lines = ["Growth of the k = 1 vs k divergence per scaled iteration (slope of ln divergence, +- standard error), "
             "from the largest lr to the smallest: "
             + "; ".join(f"lr {lr:.3g}: " + ("n/a" if sl is None else f"{sl:.3g} +- {se:.2g}") for lr, sl, se in slopes)
             + ". " + ("It falls with the lr, as the paper says." if monotone and len(known) > 1 else
                       "It does NOT fall monotonically with the lr." if len(known) > 1 else "")]
    for mark in rows[0]["divergence_at"] if rows else ():
        levels = [r["divergence_at"].get(mark) for r in rows]
        if None not in levels and len(levels) > 1:
            ordered = all(a >= b for a, b in zip(levels, levels[1:]))
            lines.append(f"At scaled epoch {mark} (equal lr x iterations) the divergence is "
                         + ", ".join(f"{d:.3g}" for d in levels) + " from the largest lr to the smallest: "
                         + ("ordered by lr." if ordered else "NOT ordered by lr."))
    t = payload["threshold"]
    if t["lr"] is not None:
        lines.append(f"Amplified at lr >= {t['bracket'][1]:.3g}, not amplified at lr <= {t['bracket'][0]:.3g}: "
                     f"the threshold lies near lr = {t['lr']:.3g}.")
    else:
        lines.append(t.get("note", ""))
    with_sharp = [r for r in rows if r.get("two_over_sharpness") is not None]
    if with_sharp:
        lines.append("2 / (largest sharpness along the run), the CFL limit of gradient descent: "
                     + "; ".join(f"lr {r['lr']:.3g}: {r['two_over_sharpness']:.3g} "
                                 f"({'lr below: CFL holds' if r['cfl_holds'] else 'lr above: CFL broken'})"
                                 for r in with_sharp) + ".")
    stable = payload.get("max_stable_lr")
    if stable is not None:
        lines.append("max_stable_lr of full-batch gradient descent from the initialisation: "
                     + (f"{stable['max_lr']:.3g}" if stable["max_lr"] is not None else f"not found ({stable['status']})")
                     + ".")
    return "\n".join(lines)


def figure(curves: dict[int, dict[str, np.ndarray]], payload: dict[str, Any]):
    """Figure 2 (the probed layer's divergence, k = 1 vs k, against iteration / n, one curve per n,
    log y), the same for all weights, and the growth rate per scaled iteration against the lr
    beside the threshold, 2 / sharpness and max_stable_lr."""
    s = payload["settings"]
    fig, (probe_ax, all_ax, rate_ax) = plot.panels(3, width=5.2, height=4.4)
    import matplotlib  # loaded by plot.panels

    colours = matplotlib.colormaps["viridis"]
    for i, (n, c) in enumerate(curves.items()):
        colour = colours(i / max(1, len(curves) - 1))
        for ax, x, y in ((probe_ax, c["smoothed_iteration"], c["smoothed"]),
                         (all_ax, c["scaled_iteration"], c["divergence"])):
            note = "" if np.any(y > 0) else ", = 0 throughout"  # identical copies cannot show on a log axis
            ax.plot(x, np.where(y > 0, y, np.nan), lw=1.0, color=colour, marker="." if y.size <= 64 else None,
                    label=f"n = {n}, lr = {s['base_lr'] / n:.3g}{note}")
    xlabel = f"scaled iteration = iteration / n  ({payload['steps_per_epoch']} per epoch)"
    smooth = f", moving average of {s['window']} scaled it." if s["window"] else ""
    probe_ax.set(yscale="log", xlabel=xlabel, title=f"Figure 2: {s['probe_path']}{smooth}")
    probe_ax.set_ylabel(f"divergence, k = 1 vs k = {s['k']:g}")
    all_ax.set(yscale="log", xlabel=xlabel, title="all weights")
    all_ax.axhline(SATURATION, color="0.6", lw=0.6, ls=":")
    probe_ax.title.set_fontsize(8)
    probe_ax.legend(fontsize=7)
    rows = [r for r in payload["rows"] if r["slope"] is not None]
    rate_ax.errorbar([r["lr"] for r in rows], [r["slope"] for r in rows], yerr=[2 * r["slope_stderr"] for r in rows],
                     fmt="o-", capsize=4, color="k", label="growth of ln divergence per scaled it. (+- 2 s.e.)")
    for r in rows:
        rate_ax.annotate("amplified" if r["amplified"] else "not amplified", (r["lr"], r["slope"]), fontsize=6,
                         textcoords="offset points", xytext=(4, 4))
    t = payload["threshold"]
    if t["lr"] is not None:
        rate_ax.axvspan(*t["bracket"], color="C2", alpha=0.2, label="amplification stops here")
    for r in payload["rows"]:
        if r.get("two_over_sharpness") is not None:
            rate_ax.axvline(r["two_over_sharpness"], color="C3", lw=0.8, ls="--", alpha=0.7,
                            label="2 / max sharpness along each run" if r is payload["rows"][0] else None)
    stable = payload.get("max_stable_lr")
    if stable is not None and stable["max_lr"] is not None:
        rate_ax.axvline(stable["max_lr"], color="C0", lw=1.2, label="max_stable_lr at the initialisation")
    rate_ax.axhline(0, color="0.6", lw=0.6)
    rate_ax.set(xscale="log", xlabel="learning rate", ylabel="growth rate per scaled iteration",
                title="amplification against lr")
    rate_ax.legend(fontsize=6)
    fig.suptitle(f"{s['activation']} {s['model']} ({s['dataset']}), plain SGD, lr = {s['base_lr']:g}/n for "
                 f"{s['epochs_per_n']} n epochs", fontsize=9)
    fig.tight_layout()
    return fig


def _curve_arrays(curves: dict[int, dict[str, np.ndarray]], rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """The contents of ``fig2_curves.npz``: ``n``, ``lr`` and every curve of run n as ``n{n}_<name>``."""
    arrays = {f"n{n}_{name}": value for n, c in curves.items() for name, value in c.items()}
    return dict(n=np.array([r["n"] for r in rows]), lr=np.array([r["lr"] for r in rows]), **arrays)


def render(payload: dict[str, Any]) -> str:
    """One line per n (lr, steps, divergences, growth rate, sharpness, accuracies), then the answer."""
    s = payload["settings"]
    opt = lambda x, fmt: "n/a" if x is None else format(x, fmt)
    body = [[str(r["n"]), f"{r['lr']:.4g}", str(r["epochs"]), str(r["steps"]), f"{r['probe_divergence']:.3g}",
             " / ".join(f"{d:.2g}" for d in r["divergence_at"].values()), opt(r["peak_divergence"], ".3g"),
             f"{r['accumulation_bound']:.3g}",
             "n/a" if r["slope"] is None else f"{r['slope']:.3g} +- {r['slope_stderr']:.2g}",
             "yes" if r["amplified"] else "no", opt(r.get("two_over_sharpness"), ".3g"),
             f"{r['test_accuracy_k1']:.4f}", f"{r['test_accuracy_k']:.4f}", str(r["epochs_trained"])]
            for r in payload["rows"]]
    marks = "/".join(payload["rows"][0]["divergence_at"]) if payload["rows"] else ""
    header = ["n", "lr", "epochs", "steps", "probe div", f"all div at scaled epoch {marks}", "peak", "accum. bound", "growth / scaled it.",
              "amplified", "2/sharpness", "acc k=1", f"acc k={s['k']:g}", "trained"]
    lines = [
        f"Figure 2: {s['activation']} (beta {s['beta']:g}) {s['model']} on {s['dataset']} (train {s['train_size']}), "
        f"plain SGD, wd {s['weight_decay']:g}, batch {s['batch_size']}, lr = {s['base_lr']:g}/n for "
        f"{s['epochs_per_n']} n epochs ({payload['steps_per_epoch']} steps per epoch), k = 1 vs k = {s['k']:g}",
        "",
        table(body, header),
        "",
        f"div = 2 mean(|w1-w2|/(|w1|+|w2|)) between the copies after the last step (the same scaled iteration for "
        f"every n); probe: {s['probe_path']}; 'all', 'peak' and the growth rate: all weights. 'accum. bound': what "
        f"the injected rounding alone can build up (first divergence x steps); 'amplified': the peak exceeds it "
        f"{BEYOND_ACCUMULATION:g}-fold. 2/sharpness: at the largest sharpness along the run. 'trained': epochs run by "
        f"this call (the rest resumed).",
        "",
        payload["answer"],
    ]
    if payload.get("files"):
        lines.append("files: " + ", ".join(payload["files"].values()))
    lines.append(f"total {payload['seconds']:.0f}s")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    Options.add_arguments(parser)
    _options.add_out(parser, DEFAULT_OUT, f"output directory (default ./{DEFAULT_OUT}); finished runs in OUT/n{{n}} "
                     "are reused")


def main(args: argparse.Namespace) -> dict[str, Any]:
    return run.call(Options.from_args(args), out=args.out)
