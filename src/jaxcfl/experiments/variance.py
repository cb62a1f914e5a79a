"""Appendix C (Tables 3 and 4): test-accuracy spread from last-bit perturbations against
the spread from the batch order.

For every seed (the batch order and augmentation), the perturbed copies
``k = 1, 3, 5, ...`` train in lockstep from one initialisation on the same
batches (:func:`jaxcfl.train.train`). A run's final accuracy is its mean test
accuracy over the last 5% of the epochs (the paper's 10 of 200;
:func:`jaxcfl.nn._preset.final_epochs`). The table holds one row per ``k`` and one
column per seed; "std over k" is the population standard deviation down each
column (the perturbation's effect at a fixed batch order), "std over seeds"
along each row (the batch order's effect at a fixed perturbation). The paper
finds the two of the same size: a last-bit change of the update is amplified as
much as a different batch order. Accuracies are in percent.

Beside the table the command reports what a small test set can carry
(:mod:`jaxcfl.statistics`): both stds with bootstrap 95% intervals, for the
accuracy and for the final test loss; the churn (fraction of test images whose
predicted class differs) between pairs of k and pairs of seeds; and how fast the
perturbation grows: the divergence of all weights between the first two copies
(k = 1 and k = 3 by default) after every step, the first steps at which it
passes 1e-3, 1e-2 and 1e-1, and, for comparison, the divergence between the
seeds' k = 1 copies (estimated on a fixed random subset of the weights,
``trace_params``).

The default trains the small ``cnn`` (three conv-BN-ReLU blocks, 24k weights)
on the built-in digits for 15 epochs at batch 32, with the paper's optimiser
(Nesterov 0.9, weight decay 5e-4, lr 0.1 divided by 10 at 20/40/60/80% of the
epochs), k in {1, 3, ..., 11} crossed with seeds 1..5.

Each seed's run checkpoints under ``OUT/seed<seed>`` after every epoch; a killed
command resumes where it stopped.

Started as N processes (:mod:`jaxcfl.distributed`), the seeds are dealt round-robin
(process ``p`` trains ``seeds[p::N]``, each in its own ``OUT/seed<seed>``); the finished
runs are gathered on every process and process 0 writes the table and the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from jaxcfl._core import distributed as distributed
from jaxcfl._core import statistics as st
from jaxcfl._core.results import ResultDir, stderr
from jaxcfl._core.text import table
from jaxcfl.experiments import _options
from jaxcfl.experiments._options import COUNT, COUNT0, NONNEGATIVE, PERTURBATION, POSITIVE, SEED, option

DEFAULT_OUT = "jaxcfl-variance"
DEFAULT_KS = (1.0, 3.0, 5.0, 7.0, 9.0, 11.0)
DEFAULT_SEEDS = (1, 2, 3, 4, 5)
DEFAULTS = dict(model="cnn", epochs=15, batch_size=32)
"""The default run: it trains (about 97% test accuracy) in minutes on a 2-core CPU (docs/training.md)."""
LEVELS = (1e-3, 1e-2, 1e-1)
"""Divergence levels whose first crossing is reported."""
TRACE_PARAMS = 4096


@dataclasses.dataclass(frozen=True)
class Options(_options.Options):
    """``jaxcfl variance``'s options: the network, the data, the optimiser (:class:`jaxcfl.TrainConfig`'s
    fields, the paper's by default) and the k x seed grid."""

    model: str = _options.network(DEFAULTS["model"], "network (default {default}: three conv-BN-ReLU blocks; "
                                  "the paper: resnet56)")
    dataset: str = _options.dataset()
    data_root: str | None = _options.data_root()
    epochs: int = option(DEFAULTS["epochs"], "epochs (default {default}; the paper: 200)", COUNT)
    ks: tuple[float, ...] = option(DEFAULT_KS, "perturbation factors (default {default}, the paper's); the first "
                                   "two are followed step by step", PERTURBATION, flag="--k", nargs="+")
    seeds: tuple[int, ...] = option(DEFAULT_SEEDS, "batch-order seeds (default {default}; the paper: 1..6)", SEED,
                                    nargs="+")
    activation: str = _options.activation()
    beta: float = option(_options.train_default("beta"), "Swish beta (the paper: 5)", POSITIVE)
    lr: float = option(_options.train_default("lr"), "base lr, divided by 10 at 20/40/60/80%% of the epochs "
                       "(default {default})", POSITIVE)
    batch_size: int = option(DEFAULTS["batch_size"], "default {default} (the paper: 128, on 50000 images)", COUNT)
    weight_decay: float = option(_options.train_default("weight_decay"), "default {default}", NONNEGATIVE)
    train_size: int | None = _options.split_size("training")
    test_size: int | None = _options.split_size("test")
    last_epochs: int | None = option(None, "epochs averaged into the final accuracy and loss (default 5%% of them, "
                                     ">= 1; the paper: 10 of 200)", COUNT)
    trace_params: int = option(TRACE_PARAMS, "weights recorded every step to follow the seeds' divergence "
                               "(default {default}; 0: off)", COUNT0)
    resamples: int = option(2000, "bootstrap resamples (default {default})", COUNT, identity=False)
    copies_mode: str = _options.copies_mode()

    def validate(self) -> None:
        _options.refuse_unused_beta(self)
        _options.clamp_sizes(self, self.dataset)


@_options.entry(Options)
def run(o: Options, *, out: str | Path | None = DEFAULT_OUT, progress: bool | None = None, log=stderr,
        **train_options: Any) -> dict[str, Any]:
    """Run the k x seed grid; returns the JSON payload.

    Args:
      model, dataset, data_root, epochs, activation, beta, lr, batch_size, weight_decay, train_size,
        test_size: what is trained (:class:`jaxcfl.TrainConfig`); the declared :class:`Options`.
      ks: perturbation factors (one lockstep copy each). The first two are the
        pair whose divergence is followed step by step.
      seeds: batch-order seeds (one lockstep run each).
      copies_mode: see :func:`jaxcfl.nn._preset.resolve_copies_mode`.
      last_epochs: epochs averaged into the final accuracy and loss (``None``:
        :func:`jaxcfl.nn._preset.final_epochs`, 5% of them).
      trace_params: weights of the first copy recorded after every step, to follow
        the divergence between seeds (0: not followed).
      resamples: bootstrap resamples of each interval.
      out: output directory (``None``: keep nothing on disk).
      progress: tqdm bars.
      log: progress messages (stderr by default).
      **train_options: other :class:`~jaxcfl.TrainConfig` fields (``momentum``, ``milestones``,
        ``guard``, ...).

    Returns:
      ``settings`` (the options), ``runs`` (k, seed, final accuracy and loss), ``std_over_k`` /
      ``std_over_seeds`` (per seed / per k), ``spread`` (the mean stds with intervals and the verdict,
      for accuracy and loss), ``churn``, ``divergence`` (first crossings), ``not_measured``
      (:func:`not_measured`: what one k or one seed leaves out, whose values are ``None``),
      ``answer``, ``fingerprints``, ``files`` and ``seconds``; with ``guard=True`` also ``guard``
      (:func:`guard_summary`), and the file ``guard.npz`` (:func:`guard_curves`).
    """
    from jaxcfl.nn._preset import TrainConfig, train

    model, dataset, epochs, ks, seeds = o.model, o.dataset, o.epochs, o.ks, o.seeds
    config = TrainConfig(**_options.train_config_kwargs(o, **train_options))
    folder = ResultDir(out, kind="variance", identity={**o.identity(), **train_options}, grows=("seeds",))
    if folder.writes and tuple(folder.identity["seeds"]) != tuple(seeds):  # a rerun adds seeds to the folder's grid
        seeds = tuple(folder.identity["seeds"])
        log(f"[variance] {out} holds other seeds too: the summary covers seeds {list(seeds)}")
    results = {}
    for seed in distributed.local_share(seeds):
        log(f"[variance] {model} on {dataset}, seed {seed}: {len(ks)} copies k={[f'{k:g}' for k in ks]}, "
            f"{epochs} epoch(s) ...")
        with distributed.process_local():  # a seed's checkpoints belong to the process that trains it
            res = train(config, ks, seed=seed, out=folder.file(f"seed{seed}") if folder.writes else None,
                        progress=progress, copies_mode=o.copies_mode, trace_params=o.trace_params)
        results[seed] = res
        log(f"[variance]   final accuracy {np.array2string(100 * res.final_accuracy(o.last_epochs), precision=2)}"
            f"  [{res.seconds:.1f}s]")
    results = _gather_runs(seeds, results)
    curves = divergence_curves(ks, seeds, results)
    payload = {"settings": o.settings(seeds=list(seeds)),
               **summarise(config, ks, seeds, results, curves, last_epochs=o.last_epochs, resamples=o.resamples)}
    payload["seconds"] = folder.seconds()
    payload["compile_seconds"] = float(sum(r.compile_seconds for r in results.values()))  # of the seconds above
    payload["files"] = {}
    if folder.writes:
        payload["files"] = _write_outputs(folder, payload, curves, guard_curves(seeds, results))
    return payload


def _gather_runs(seeds, results: dict[int, Any]) -> dict[int, Any]:
    """Every process's finished runs (without their final states), by seed in ``seeds`` order; one process:
    ``results``."""
    if not distributed.is_multiprocess():
        return results
    merged: dict[int, Any] = {}
    for part in distributed.gather_objects({s: dataclasses.replace(r, state=None) for s, r in results.items()}):
        merged.update(part)
    return {s: merged[s] for s in seeds}


def summarise(config, ks, seeds, results, curves: dict[str, np.ndarray], *, last_epochs: int | None = None,
              resamples: int = 2000) -> dict[str, Any]:
    """The JSON payload of finished runs (``results[seed]``: a :class:`~jaxcfl.TrainResult` of all ``ks``;
    ``curves``: their :func:`divergence_curves`)."""
    from jaxcfl.nn._preset import final_epochs

    accuracy = 100.0 * np.stack([results[s].final_accuracy(last_epochs) for s in seeds], axis=1)  # (k, seed)
    loss = np.stack([results[s].final_loss(last_epochs) for s in seeds], axis=1)
    predictions = np.stack([results[s].test_predictions for s in seeds], axis=1)  # (k, seed, images)
    # A std over one value is not a measured 0: with one k (one seed) everything over k (over seeds) is None,
    # and "not_measured" says why.
    several_k, several_seeds = len(ks) > 1, len(seeds) > 1
    std_over_k = accuracy.std(axis=0) if several_k else None
    std_over_seeds = accuracy.std(axis=1) if several_seeds else None
    spread = {}
    for name, values in (("accuracy", accuracy), ("loss", loss)):
        over_k = st.bootstrap_spread(values, 0, resamples=resamples) if several_k else None
        over_seeds = st.bootstrap_spread(values, 1, resamples=resamples) if several_seeds else None
        spread[name] = {"over_k": over_k and over_k.to_dict(), "over_seeds": over_seeds and over_seeds.to_dict(),
                        "ratio": (over_k.estimate / over_seeds.estimate if over_k and over_seeds
                                  and over_seeds.estimate > 0 else None),
                        "verdict": st.compare_spreads(over_k, over_seeds) if over_k and over_seeds else None}
    churn = {"over_k": st.pairwise_churn(predictions, 0).to_dict() if several_k else None,
             "over_seeds": st.pairwise_churn(predictions, 1).to_dict() if several_seeds else None,
             "test_images": int(predictions.shape[2])}
    payload = {
        "config": config.to_dict(),
        "ks": [float(k) for k in ks],
        "seeds": [int(s) for s in seeds],
        "final_epochs": int(last_epochs or final_epochs(config.epochs)),
        "mean_accuracy": float(accuracy.mean()),
        "runs": [{"k": float(k), "seed": int(s), "final_accuracy": float(accuracy[i, j]), "final_loss": float(loss[i, j])}
                 for j, s in enumerate(seeds) for i, k in enumerate(ks)],
        "std_over_k": None if std_over_k is None else {str(s): float(std_over_k[j]) for j, s in enumerate(seeds)},
        "std_over_seeds": None if std_over_seeds is None else {f"{k:g}": float(std_over_seeds[i])
                                                               for i, k in enumerate(ks)},
        "mean_std_over_k": None if std_over_k is None else float(std_over_k.mean()),
        "mean_std_over_seeds": None if std_over_seeds is None else float(std_over_seeds.mean()),
        "spread": spread,
        "churn": churn,
        "divergence": _growth(ks, seeds, results, curves.get("seed_pairs")),
        "not_measured": not_measured(ks, seeds, "seed_pairs" in curves),
        "fingerprints": {str(s): list(r.fingerprints) for s, r in results.items()},
    }
    if config.guard:
        payload["guard"] = guard_summary(config, seeds, results)
    payload["answer"] = answer(payload)
    return payload


def guard_curves(seeds, results) -> dict[str, np.ndarray]:
    """The CFL guard's per-step curves, ``(steps, copies)`` each: ``lr_seed<s>`` (the effective lr) and
    ``lambda_seed<s>`` (the sharpness estimate); empty without the guard."""
    curves = {}
    for s in seeds:
        if results[s].guard_lr is not None:
            curves[f"lr_seed{s}"] = np.asarray(results[s].guard_lr, np.float64)
            curves[f"lambda_seed{s}"] = np.asarray(results[s].guard_lambda, np.float64)
    return curves


def guard_limit_lr(config, guard_lambda: np.ndarray) -> np.ndarray:
    """``min(lr, safety S(mu) / lambda_max)`` at every entry of ``guard_lambda``: the largest lr the
    guard allows at each step, at the *base* lr (the schedule's decay left out); ``lr`` where
    ``lambda_max`` is not a finite positive number (as :func:`jaxcfl.nn.guarded_lr`)."""
    from jaxcfl._core.stability import momentum_limit

    lam = np.asarray(guard_lambda, np.float64)
    known = np.isfinite(lam) & (lam > 0)
    limit = config.guard_safety * float(momentum_limit(config.momentum, config.nesterov)) / np.where(known, lam, 1.0)
    return np.where(known, np.minimum(config.lr, limit), config.lr)


def guard_summary(config, seeds, results) -> dict[str, Any]:
    """What the CFL guard did over all steps, seeds and copies (``config.guard`` runs).

    ``min_lr`` / ``median_lr``: of the effective lr (the schedule's decay included);
    ``limit_lr``: the minimum of :func:`guard_limit_lr`, the largest constant lr that every
    guarded step allowed; ``clipped_fraction``: the share of step-copies whose lr the guard
    lowered below the schedule's; ``max_lambda``: the largest sharpness estimate.
    """
    from jaxcfl._core.stability import momentum_limit
    from jaxcfl.nn._preset import step_decay

    lr = np.stack([results[s].guard_lr for s in seeds])  # (seeds, steps, copies)
    lam = np.stack([results[s].guard_lambda for s in seeds])
    steps = lr.shape[1]
    per_epoch = max(1, steps // max(1, results[seeds[0]].epochs_done))
    decay = step_decay(np.float32(config.lr), np.float32(config.gamma),
                       [m * per_epoch for m in config.milestone_epochs], xp=np)  # the optimiser's, in float32
    schedule = np.array([decay(step) for step in range(steps)], np.float32)
    clipped = lr < schedule[None, :, None] * (1 - 1e-6)  # an ulp of float32 is not a clip
    limit = guard_limit_lr(config, lam)
    where = np.unravel_index(int(np.argmin(limit)), limit.shape)
    finite = lam[np.isfinite(lam)]
    return {
        "safety": float(config.guard_safety),
        "stability_limit": float(momentum_limit(config.momentum, config.nesterov)),
        "every": int(config.guard_every), "iterations": int(config.guard_iterations),
        "min_lr": float(lr.min()), "median_lr": float(np.median(lr)), "max_lr": float(lr.max()),
        "limit_lr": float(limit.min()),
        "limit_lr_at": {"seed": int(seeds[where[0]]), "step": int(where[1]), "copy": int(where[2])},
        "clipped_fraction": float(clipped.mean()),
        "max_lambda": float(finite.max()) if finite.size else None,
        "median_lambda": float(np.median(finite)) if finite.size else None,
        "steps": int(steps),
    }


def _growth(ks, seeds, results, seed_pairs: np.ndarray | None) -> dict[str, Any] | None:
    """First steps at which the k[0]-vs-k[1] divergence passes :data:`LEVELS`, per seed and as a median."""
    if len(ks) < 2:
        return None
    steps = int(results[seeds[0]].step_divergence.shape[0])
    first = {f"{level:g}": {} for level in LEVELS}
    for s in seeds:
        for level, step in st.first_crossing(results[s].step_divergence[:, 1], LEVELS).items():
            first[f"{level:g}"][str(s)] = step
    median = {name: (float(np.median([x for x in per.values() if x is not None]))
                     if any(x is not None for x in per.values()) else None) for name, per in first.items()}
    return {"reference_k": float(ks[0]), "compared_k": float(ks[1]), "steps": steps, "levels": list(LEVELS),
            "first_step_above": first, "median_first_step_above": median,
            "final": {str(s): float(results[s].step_divergence[-1, 1]) for s in seeds},
            "seeds_final_median": None if seed_pairs is None else float(np.median(seed_pairs[:, -1])),
            "seeds_first_step_above": None if seed_pairs is None else {
                f"{level:g}": step for level, step in st.first_crossing(np.median(seed_pairs, axis=0), LEVELS).items()},
            "traced_weights": int(results[seeds[0]].param_trace.shape[1]) if results[seeds[0]].param_trace.size else 0}


def divergence_curves(ks, seeds, results) -> dict[str, np.ndarray]:
    """The divergence after every step: ``k_seed<s>``, the first two copies of seed s (with two k or
    more); ``seed_pairs``, ``(pairs, steps)``, the first copies of every pair of seeds (with two seeds
    or more and a parameter trace)."""
    curves = {f"k_seed{s}": results[s].step_divergence[:, 1] for s in seeds} if len(ks) > 1 else {}
    traces = [results[s].param_trace for s in seeds]
    if len(seeds) > 1 and traces[0].size:
        curves["seed_pairs"] = np.stack([st.divergence_curve(traces[i], traces[j])
                                         for i, j in combinations(range(len(seeds)), 2)])
    return curves


def not_measured(ks, seeds, seed_pairs: bool) -> dict[str, str]:
    """What a grid this small cannot measure, and why; empty for two k and two seeds (or more) with the
    seeds' weights traced. The payload's values for these are ``None`` (strict JSON: never NaN).

    Keys: ``over_k`` (one k), ``over_seeds`` (one seed), ``verdict`` (either), ``seed_divergence``
    (several seeds whose weights were not traced, ``trace_params=0``).
    """
    out = {}
    if len(ks) < 2:
        out["over_k"] = (f"one k ({ks[0]:g}): no pair of k, so no std over k, no churn over k and no divergence "
                         f"between two k")
    if len(seeds) < 2:
        out["over_seeds"] = (f"one seed ({seeds[0]}): no pair of seeds, so no std over seeds, no churn over seeds "
                             f"and no seed-vs-seed divergence")
    if out:
        out["verdict"] = "the spreads over k and over seeds are compared only with at least two k and two seeds"
    elif not seed_pairs:
        out["seed_divergence"] = ("the seeds' weights were not traced (trace_params=0): no seed-vs-seed "
                                  "divergence")
    return out


def answer(payload: dict[str, Any]) -> str:
    """Plain words: is the perturbation's spread of the same size as the seeds' spread here?"""
    acc, loss = payload["spread"]["accuracy"], payload["spread"]["loss"]
    fmt = lambda d: f"{d['std']:.3g} [{d['ci_low']:.3g}, {d['ci_high']:.3g}]"
    churn = payload["churn"]
    # (the missing verdict is the first line's)
    missing = [f"Not measured: {why}." for key, why in payload.get("not_measured", {}).items() if key != "verdict"]
    if acc["verdict"] is None:
        lines = ["Needs at least two k and two seeds to compare the spreads."]
        for side, label in (("over_k", "over k (perturbation)"), ("over_seeds", "over seeds (batch order)")):
            if acc[side] is not None:
                lines.append(f"Measured {label}: test accuracy std {fmt(acc[side])} accuracy points, test loss std "
                             f"{fmt(loss[side])}; churn {100 * churn[side]['mean']:.2f}% of the "
                             f"{churn['test_images']} test images.")
        return "\n".join(lines + missing)
    words = {"same size": "OF THE SAME SIZE AS", "smaller": "SMALLER THAN", "larger": "LARGER THAN"}
    lines = [
        f"Test accuracy: the spread over k is {words[acc['verdict']]} the spread over seeds: "
        f"std over k {fmt(acc['over_k'])} against std over seeds {fmt(acc['over_seeds'])} accuracy points "
        f"(means over the table, bootstrap 95% intervals).",
        f"Test loss: the spread over k is {words[loss['verdict']]} the spread over seeds: std over k "
        f"{fmt(loss['over_k'])} against std over seeds {fmt(loss['over_seeds'])}.",
        f"Churn: {100 * churn['over_k']['mean']:.2f}% of the {churn['test_images']} test images change class between "
        f"two k, {100 * churn['over_seeds']['mean']:.2f}% between two seeds.",
    ]
    if min(len(payload["ks"]), len(payload["seeds"])) < 3:
        lines.append("Caveat: with fewer than 3 k or 3 seeds a bootstrap interval of a std reaches down to 0, "
                     "so the intervals can hardly separate; use the paper's 6 x 6 or the default 6 x 5 grid.")
    return "\n".join(lines + missing)


def _write_outputs(out: ResultDir, payload: dict[str, Any], curves: dict[str, np.ndarray],
                   guard: dict[str, np.ndarray] | None = None) -> dict[str, str]:
    runs = [dict(k=f"{r['k']:g}", seed=r["seed"], final_accuracy=f"{r['final_accuracy']:.6f}",
                 final_loss=f"{r['final_loss']:.8g}") for r in payload["runs"]]
    files = {"csv": out.write_csv("variance.csv", runs, lineterminator="\n"), "json": str(out.file("variance.json"))}
    # Every process calls the folder's writers together (process 0 writes); figures are drawn by process 0 alone.
    files["plot"] = distributed.on_leader(lambda: _plot(out.file("variance.png"), payload))
    if curves:
        files["divergence"] = out.write_npz("divergence.npz", curves)
        files["divergence_plot"] = distributed.on_leader(
            lambda: _plot_divergence(out.file("divergence.png"), payload, curves))
    if guard:
        files["guard"] = out.write_npz("guard.npz", guard)
    out.write_json("variance.json", {**payload, "files": files})
    out.close()
    return files


def _plot(path: Path, payload: dict[str, Any]) -> str:
    from jaxcfl.plot import panels, save

    fig, (left, middle, right) = panels(3, width=4.4, height=4.0)
    seeds, ks = payload["seeds"], payload["ks"]
    acc = {(r["k"], r["seed"]): r["final_accuracy"] for r in payload["runs"]}
    for k in ks:
        left.plot(range(len(seeds)), [acc[(k, s)] for s in seeds], "o", label=f"k={k:g}", alpha=0.8)
    left.set_xticks(range(len(seeds)), [str(s) for s in seeds])
    left.set(xlabel="seed (batch order)", ylabel="final test accuracy (%)", title="every run")
    left.legend(fontsize=7)
    sides = (("over_k", "over k\n(perturbation)"), ("over_seeds", "over seeds\n(batch order)"))
    why = {"over_k": f"one k ({ks[0]:g})", "over_seeds": f"one seed ({seeds[0]})"}
    for ax, name, unit in ((middle, "accuracy", "accuracy points"), (right, "loss", "cross-entropy")):
        for x, (key, _) in enumerate(sides):
            d = payload["spread"][name][key]
            if d is not None:
                ax.errorbar([x], [d["std"]], yerr=[[d["std"] - d["ci_low"]], [d["ci_high"] - d["std"]]], fmt="o",
                            capsize=6, color=f"C{x}")
            else:  # one k or one seed: nothing to draw, and the panel says so
                ax.text(x, 0.5, f"not measured:\n{why[key]}", transform=ax.get_xaxis_transform(), ha="center",
                        va="center", fontsize=8, color="0.4")
        ax.set_xticks([0, 1], [label for _, label in sides])
        ax.set_xlim(-0.6, 1.6)
        ax.set(ylabel=f"mean population std ({unit})", title=f"test {name}: std, 95% bootstrap interval")
    fig.tight_layout()
    return save(fig, path)


def _plot_divergence(path: Path, payload: dict[str, Any], curves: dict[str, np.ndarray]) -> str:
    from jaxcfl.plot import panels, save

    fig, (ax,) = panels(1, width=7.5, height=4.6)
    ks = payload["ks"]
    positive = lambda y: np.where(y > 0, y, np.nan)  # identical copies cannot show on a log axis
    k_curves = [c for name, c in curves.items() if name.startswith("k_seed")]
    steps = np.arange(1, len(k_curves[0]) + 1) if k_curves else np.arange(1, curves["seed_pairs"].shape[1] + 1)
    shown = []  # what is drawn, for the log axes' limits
    for i, c in enumerate(k_curves):
        shown.append(positive(c))
        ax.plot(steps, shown[-1], color="C3", lw=0.6, alpha=0.35, label=None if i else
                f"k = {ks[0]:g} vs k = {ks[1]:g}, each seed")
    if len(k_curves) > 1:
        ax.plot(steps, positive(np.median(k_curves, axis=0)), color="C3", lw=2, label="  median over seeds")
    if "seed_pairs" in curves:
        pairs = curves["seed_pairs"]
        for i, c in enumerate(pairs):
            shown.append(positive(c))
            ax.plot(steps, shown[-1], color="C0", lw=0.6, alpha=0.25,
                    label=None if i else f"seed vs seed at k = {ks[0]:g}, each pair")
        ax.plot(steps, positive(np.median(pairs, axis=0)), color="C0", lw=2, label="  median over pairs")
    for level in LEVELS:
        ax.axhline(level, color="0.6", lw=0.6, ls=":")
    # What is not drawn, and why: a pair that never diverged (no positive value), and what the grid lacks.
    notes = [f"k = {ks[0]:g} vs k = {ks[1]:g}: identical weights at every step (divergence 0, off the log axis)"
             ] if k_curves and not np.any(np.isfinite(np.concatenate(shown[:len(k_curves)]))) else []
    notes += [f"not measured: {why}" for key, why in payload.get("not_measured", {}).items() if key != "verdict"]
    if notes:
        ax.text(0.02, 0.98, "\n".join(notes), transform=ax.transAxes, ha="left", va="top", fontsize=7, wrap=True,
                bbox=dict(boxstyle="round", facecolor="white", edgecolor="0.7"))
    ax.set_xscale("log")
    ax.set_yscale("log")
    if not any(np.any(np.isfinite(c)) for c in shown):  # nothing on the axes: fixed limits around the levels
        ax.set_xlim(1, max(2, steps[-1]))
        ax.set_ylim(LEVELS[0] / 10, 1.0)
    ax.set(xlabel="step", ylabel="divergence 2 mean(|w1-w2|/(|w1|+|w2|)) of the weights",
           title="how fast a last-bit change grows, against a different batch order")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, path)


def render(payload: dict[str, Any]) -> str:
    """The Table 3/4 layout (k rows, seed columns, stds in the margins), then the statistics."""
    seeds, ks = payload["seeds"], payload["ks"]
    acc = {(r["k"], r["seed"]): r["final_accuracy"] for r in payload["runs"]}
    header = ["k \\ seed"] + [str(s) for s in seeds] + ["std over seeds"]
    std = lambda d, key: "-" if d is None else f"{d[key]:.3f}"  # "-": not measured (one k or one seed)
    rows = [[f"{k:g}"] + [f"{acc[(k, s)]:.2f}" for s in seeds] + [std(payload["std_over_seeds"], f"{k:g}")]
            for k in ks]
    rows.append(["std over k"] + [std(payload["std_over_k"], str(s)) for s in seeds] + [""])
    cfg = payload["config"]
    mean = lambda x: "not measured" if x is None else f"{x:.3f}"
    text = [f"{cfg['model']} on {cfg['dataset']}, {cfg['epochs']} epoch(s), batch {cfg['batch_size']}; final accuracy (%) "
            f"= mean test accuracy over the last {payload['final_epochs']} epoch(s); mean {payload['mean_accuracy']:.2f}%",
            table(rows, header),
            f"mean std over k (perturbation): {mean(payload['mean_std_over_k'])}   "
            f"mean std over seeds (batch order): {mean(payload['mean_std_over_seeds'])}"]
    if payload["spread"]["accuracy"]["verdict"] is not None:
        cell = lambda d: f"{d['std']:.3g} [{d['ci_low']:.3g}, {d['ci_high']:.3g}]"
        churn = payload["churn"]
        body = [[f"test {name}", cell(payload["spread"][name]["over_k"]), cell(payload["spread"][name]["over_seeds"]),
                 payload["spread"][name]["verdict"]] for name in ("accuracy", "loss")]
        body.append(["churn (% of images)", *(f"{100 * churn[a]['mean']:.2f} ({100 * churn[a]['min']:.2f}-"
                                              f"{100 * churn[a]['max']:.2f}), {churn[a]['pairs']} pairs"
                                              for a in ("over_k", "over_seeds")), ""])
        text += ["", table(body, ["", "over k (perturbation)", "over seeds (batch order)", "verdict"])]
    g = payload["divergence"]
    if g is not None:
        step = lambda x: "never" if x is None else str(x)
        cross = [[f"k = {g['reference_k']:g} vs {g['compared_k']:g}, seed {s}"]
                 + [step(g["first_step_above"][f"{lv:g}"][str(s)]) for lv in g["levels"]] + [f"{g['final'][str(s)]:.3g}"]
                 for s in seeds]
        if g["seeds_first_step_above"] is not None:
            cross.append([f"seed vs seed at k = {g['reference_k']:g} (median of pairs)"]
                         + [step(g["seeds_first_step_above"][f"{lv:g}"]) for lv in g["levels"]]
                         + [f"{g['seeds_final_median']:.3g}"])
        text += ["", f"divergence of the weights: first step above each level ({g['steps']} steps)",
                 table(cross, ["", *(f"> {lv:g}" for lv in g["levels"]), "at the end"])]
    if payload.get("guard"):
        gd = payload["guard"]
        text += ["", f"CFL guard (safety {gd['safety']:g}): effective lr {gd['min_lr']:.3g} to {gd['max_lr']:.3g} "
                     f"(median {gd['median_lr']:.3g}); lowered on {100 * gd['clipped_fraction']:.1f}% of the "
                     f"step-copies; largest sharpness estimate {gd['max_lambda'] or float('nan'):.3g}; largest constant lr every "
                     f"guarded step allowed {gd['limit_lr']:.3g}"]
    text += ["", payload["answer"], f"[{payload['seconds']:.1f}s]"]
    if payload["files"]:
        text.append("files: " + ", ".join(payload["files"].values()))
    return "\n".join(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    Options.add_arguments(parser)
    _options.add_out(parser, DEFAULT_OUT, f"output directory (default ./{DEFAULT_OUT}); finished epochs are reused")


def main(args: argparse.Namespace) -> dict[str, Any]:
    return run.call(Options.from_args(args), out=args.out)
