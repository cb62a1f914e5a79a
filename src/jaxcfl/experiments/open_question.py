"""The open question of appendix A (Sun et al., JMLR 2024): does keeping every step inside its local
stability limit remove the amplification of a last-bit perturbation, and its share of the
test-accuracy variance?

Three arms of the ``jaxcfl variance`` set-up (:mod:`jaxcfl.experiments.variance`: its
network, data, k x seed grid and statistics), each trained for the same epochs:

* ``baseline``: the variance defaults (Nesterov 0.9, weight decay 5e-4, lr divided by 10
  at 20/40/60/80% of the epochs);
* ``guarded``: the same optimiser under the CFL guard (:func:`jaxcfl.cfl_guard`), which caps
  every step's lr at ``safety * S(mu) / lambda_max`` (``docs/cfl_guard.md``);
* ``constant``: one constant lr (no decay), the largest that every guarded step allowed: the
  minimum over all steps, seeds and copies of ``min(lr, safety * S(mu) / lambda_max)`` along
  the guarded arm's sharpness estimates (the guarded arm's effective lr with the schedule's
  decay left out; :func:`jaxcfl.experiments.variance.guard_limit_lr`).

For each arm: mean test accuracy (bootstrap 95% interval over seeds), std over k and std
over seeds of the final accuracy and loss (bootstrap 95% intervals), churn, the median over
seeds of the first step at which the k[0] vs k[1] weight divergence passes 1e-2, its final
value, and the wall time. Each of ``guarded`` and ``constant`` is then compared with the
baseline, and the answer is written from the intervals: disjoint intervals read "smaller"
or "larger", overlapping ones "not distinguishable".

Each arm trains in its own resumable ``jaxcfl variance`` folder (``OUT/baseline``,
``OUT/guarded``, ``OUT/constant``); a finished arm's summary and curves are committed in
``OUT/arms``, so that a rerun of a finished experiment recomputes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np

from jaxcfl._core.results import ResultDir, stderr
from jaxcfl._core.text import table
from jaxcfl.experiments import _options, variance
from jaxcfl.experiments._options import COUNT, PERTURBATION, POSITIVE, SAFETY, SEED, option
from jaxcfl.nn._guard import DEFAULTS as GUARD_DEFAULTS

ARMS = ("baseline", "guarded", "constant")
"""The arms, in the order they run (``constant`` needs the guarded arm's sharpness)."""
LEVEL = 1e-2
"""The divergence level whose first crossing is compared."""
DEFAULT_OUT = "jaxcfl-open-question"

_CONSTANT_METHOD = ("minimum over all steps, seeds and copies of the guarded arm of min(lr, safety * S(mu) / "
                    "lambda_max), lambda_max being the guard's sharpness estimate in force at that step and S(mu) "
                    "the scheme's stability limit (jaxcfl.limits.momentum_limit): the largest constant lr that "
                    "every guarded step allowed. It equals the minimum of the guarded arm's effective lr with the "
                    "lr schedule's decay left out (that minimum itself, min_effective_lr, is at most the last, "
                    "decayed lr of the schedule).")


@dataclasses.dataclass(frozen=True)
class Options(variance.Options):
    """The options of ``jaxcfl reproduce open-question``: those of ``jaxcfl variance``
    (:class:`jaxcfl.experiments.variance.Options`), with at least two k and two seeds, and the guard's."""

    epochs: int = option(variance.DEFAULTS["epochs"], "epochs of every arm (default {default})", COUNT)
    ks: tuple[float, ...] = option(variance.DEFAULT_KS, "perturbation factors, at least two (default {default}); "
                                   "the first two are followed step by step", PERTURBATION, flag="--k", nargs="+")
    seeds: tuple[int, ...] = option(variance.DEFAULT_SEEDS, "batch-order seeds, at least two (default {default})",
                                    SEED, nargs="+")
    lr: float = option(_options.train_default("lr"), "base lr of the baseline and guarded arms (default {default})",
                       POSITIVE)
    safety: float = option(GUARD_DEFAULTS.safety, "the guard's margin in (0, 1]: lr_eff lambda_max <= safety S "
                           "(default {default})", SAFETY)
    every: int = option(GUARD_DEFAULTS.every, "steps between the guard's sharpness estimates (default {default})",
                        COUNT)
    iterations: int = option(GUARD_DEFAULTS.iterations, "Lanczos iterations per estimate (default {default})", COUNT)
    first_iterations: int = option(GUARD_DEFAULTS.first_iterations, "Lanczos iterations of the first estimate, "
                                   "from a random vector (default {default})", COUNT)

    def validate(self) -> None:
        super().validate()
        if len(self.ks) < 2 or len(self.seeds) < 2:
            raise ValueError(f"{self.spelled('ks')} and {self.spelled('seeds')} must each hold at least two values (the "
                             f"spreads over k and over seeds, and the k[0] vs k[1] divergence), got k={list(self.ks)} "
                             f"seeds={list(self.seeds)}")

    def guard(self) -> dict[str, Any]:
        """The guarded arm's :class:`jaxcfl.TrainConfig` fields."""
        return dict(guard=True, guard_safety=self.safety, guard_every=self.every, guard_iterations=self.iterations,
                    guard_first_iterations=self.first_iterations)


@_options.entry(Options)
def run(o: Options, *, out: str | Path | None = DEFAULT_OUT, progress: bool | None = None,
        log=stderr) -> dict[str, Any]:
    """Run the three arms; returns the JSON payload.

    Args:
      model, dataset, data_root, activation, beta, epochs, lr, batch_size, weight_decay, train_size, test_size:
        (the declared :class:`Options`, as every keyword below but ``out``, ``progress`` and ``log``)
        the training set-up of every arm (:class:`jaxcfl.TrainConfig`; the ``constant``
        arm replaces ``lr`` and has no decay).
      ks, seeds: the k x seed grid of each arm (at least two of each; the first two k are the
        pair whose divergence is followed).
      safety, every, iterations, first_iterations: the guard's (:func:`jaxcfl.cfl_guard`).
      copies_mode, last_epochs, trace_params, resamples: as :func:`jaxcfl.experiments.variance.run`.
      out: the result folder (``None``: nothing written, nothing reused).
      progress, log: tqdm bars and progress lines (stderr).

    Returns:
      ``settings``, ``constant_lr`` (the value and how it was found), ``arms`` (per arm: the
      statistics above and every run), ``comparisons`` (guarded and constant against the
      baseline, with verdicts), ``answer`` (plain words), ``files`` and ``seconds``.
    """
    from jaxcfl.nn._preset import TrainConfig

    ks, seeds, lr, resamples = o.ks, o.seeds, o.lr, o.resamples
    common = _options.train_config_kwargs(o)
    guard = o.guard()
    TrainConfig(**common, **guard)  # every number checked before anything trains
    results = ResultDir(out, kind="open-question", identity=o.identity())
    cache = results.row_cache(lambda s: s["arm"], folder="arms")
    shared = dict(ks=ks, seeds=seeds, copies_mode=o.copies_mode, last_epochs=o.last_epochs,
                  trace_params=o.trace_params, resamples=resamples, progress=progress, log=log)
    arms, curves = {}, {}
    arms["baseline"], curves["baseline"] = _arm("baseline", common, {}, results, cache, **shared)
    arms["guarded"], curves["guarded"] = _arm("guarded", common, guard, results, cache, **shared)
    gd = arms["guarded"]["guard"]
    constant = dict(lr=gd["limit_lr"], base_lr=float(lr), method=_CONSTANT_METHOD, safety=gd["safety"],
                    stability_limit=gd["stability_limit"], max_lambda=gd["max_lambda"], at=gd["limit_lr_at"],
                    min_effective_lr=gd["min_lr"], guard_clipped_fraction=gd["clipped_fraction"])
    log(f"[open-question] constant lr {constant['lr']:.6g}: the smallest limit the guard set "
        f"(lambda_max up to {gd['max_lambda'] or float('nan'):.4g}; base lr {lr:g})")
    arms["constant"], curves["constant"] = _arm("constant", common, dict(lr=constant["lr"], milestones=()), results,
                                                cache, **shared)
    payload: dict[str, Any] = dict(
        experiment="open-question",
        settings=o.settings(level=LEVEL),
        constant_lr=constant,
        arms=arms,
        comparisons={name: compare(arms[name], arms["baseline"], seeds, resamples=resamples)
                     for name in ("guarded", "constant")},
    )
    payload["answer"] = answer(payload)
    files: dict[str, str] = {}
    if results.writes:
        files["csv"] = results.write_csv("open_question.csv", _run_rows(arms), lineterminator="\n")
        files["summary_csv"] = results.write_csv("open_question_summary.csv", _summary_rows(arms),
                                                 lineterminator="\n")
        flat = {f"{arm}_{name}": c for arm, per in curves.items() for name, c in per.items()}
        if flat:
            files["curves"] = results.write_npz("open_question_curves.npz", flat)
        files["png"] = _plot(results.file("open_question.png"), payload, curves)
        files.update({arm: str(results.path / arm) for arm in ARMS})
    return results.finish(payload, "open_question.json", files)


def _arm(name, common, options, results: ResultDir, cache, *, ks, seeds, copies_mode, last_epochs, trace_params,
         resamples, progress, log) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One arm: its summary and curves from ``OUT/arms`` when it finished before, else from
    :func:`jaxcfl.experiments.variance.run` in ``OUT/<name>`` (which resumes its own checkpoints)."""
    from jaxcfl.nn._preset import TrainConfig

    train_options = {**common, **options}
    config = TrainConfig(**train_options)
    settings = {"arm": name, "config": config.to_dict(), "ks": list(ks), "seeds": list(seeds),
                "last_epochs": last_epochs, "trace_params": trace_params, "resamples": resamples}
    unit = f"arms/{name}_curves.npz"
    row = cache.load(settings)
    curves = _read_npz(results, unit) if row is not None else None
    if row is not None and curves is not None:
        log(f"[open-question] arm {name}: finished before, reused ({cache.path(settings)})")
        return row, curves
    sub = results.file(name) if results.writes else None
    resumed = sub is not None and sub.is_dir() and any(sub.iterdir())
    log(f"[open-question] arm {name}: lr {config.lr:.6g}, "
        f"{'constant' if not config.milestone_epochs else f'decay at epochs {list(config.milestone_epochs)}'}"
        f"{', CFL guard' if config.guard else ''}" + (f" (resuming {sub})" if resumed else "") + " ...")
    model, dataset, data_root, epochs = (train_options.pop(k) for k in ("model", "dataset", "data_root", "epochs"))
    payload = variance.run(model=model, dataset=dataset, data_root=data_root, epochs=epochs, ks=ks, seeds=seeds,
                           out=sub, progress=progress, copies_mode=copies_mode, last_epochs=last_epochs,
                           trace_params=trace_params, resamples=resamples, log=log, **train_options)
    summary = {**settings, **summarise_arm(name, payload, seeds, resamples=resamples), "resumed": bool(resumed),
               "folder": None if sub is None else str(sub)}
    curves = _arm_curves(sub)
    if results.writes:
        results.write_npz(unit, curves)  # the curves first: the row is the arm's commit
        cache.save(settings, summary)
    return summary, curves


def _read_npz(results: ResultDir, unit: str) -> dict[str, np.ndarray] | None:
    if results.folder is None:
        return None
    data, _ = results.folder.read(unit)
    if data is None:
        return None
    with np.load(io.BytesIO(data)) as z:
        return {name: z[name] for name in z.files}


def _arm_curves(sub: Path | None) -> dict[str, np.ndarray]:
    """``k_seed<s>`` (the k[0] vs k[1] divergence after every step) and, for the guarded arm,
    ``lr_seed<s>`` / ``lambda_seed<s>`` (the guard's, per copy), from the arm's variance folder."""
    curves: dict[str, np.ndarray] = {}
    if sub is None:
        return curves
    for name, keep in (("divergence.npz", lambda k: k.startswith("k_seed")), ("guard.npz", lambda k: True)):
        if (sub / name).is_file():
            with np.load(sub / name) as z:
                curves.update({k: z[k] for k in z.files if keep(k)})
    return curves


def _interval(estimate: float, samples: np.ndarray, level: float = 0.95) -> dict[str, float]:
    low, high = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return {"estimate": float(estimate), "ci_low": float(low), "ci_high": float(high), "level": level}


def bootstrap(values, statistic=np.mean, *, resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """``statistic`` of ``values`` (one per seed) with a percentile-bootstrap 95% interval: the seeds
    are drawn with replacement ``resamples`` times (reproducible: ``seed``)."""
    values = np.asarray(values, np.float64)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(values), size=(resamples, len(values)))
    samples = np.array([statistic(values[p]) for p in pick])
    return _interval(statistic(values), samples)


def summarise_arm(name: str, payload: dict[str, Any], seeds, *, resamples: int = 2000) -> dict[str, Any]:
    """An arm's statistics from its :func:`jaxcfl.experiments.variance.run` payload."""
    cfg = payload["config"]
    per_seed = np.array([np.mean([r["final_accuracy"] for r in payload["runs"] if r["seed"] == s]) for s in seeds])
    g = payload["divergence"]
    first = g["first_step_above"][f"{LEVEL:g}"]
    steps = [first[str(s)] for s in seeds]
    final = np.array([g["final"][str(s)] for s in seeds])
    return {
        "lr": float(cfg["lr"]),
        "milestones": list(cfg["milestones"]),
        "guarded": bool(cfg.get("guard", False)),
        "config": cfg,
        "mean_accuracy": bootstrap(per_seed, resamples=resamples),
        "seed_accuracy": {str(s): float(a) for s, a in zip(seeds, per_seed)},
        "spread": payload["spread"],
        "mean_std_over_k": payload["mean_std_over_k"],
        "mean_std_over_seeds": payload["mean_std_over_seeds"],
        "churn": payload["churn"],
        "divergence": {
            "reference_k": g["reference_k"], "compared_k": g["compared_k"], "level": LEVEL, "steps": g["steps"],
            "first_step_above": {str(s): x for s, x in zip(seeds, steps)},
            "crossed": sum(x is not None for x in steps),
            "median_first_step_above": _median_step(steps),
            "first_step_above_all_levels": g["median_first_step_above"],
            "final": {str(s): float(x) for s, x in zip(seeds, final)},
            "final_median": bootstrap(final, np.median, resamples=resamples),
        },
        "runs": payload["runs"],
        "guard": payload.get("guard"),
        "seconds": float(payload["seconds"]),
        "compile_seconds": payload.get("compile_seconds"),
        "variance_answer": payload["answer"],
    }


def _median_step(steps: list[int | None]) -> float | None:
    """The median over seeds of a first crossing; a seed that never crosses counts as later than any
    step, and a median that falls on such a seed is ``None`` (never)."""
    m = float(np.median([np.inf if x is None else x for x in steps]))
    return m if np.isfinite(m) else None


def _versus(a: dict[str, float], b: dict[str, float]) -> str:
    """``"smaller"`` / ``"larger"`` when the intervals are disjoint, else ``"not distinguishable"``."""
    if a["ci_high"] < b["ci_low"]:
        return "smaller"
    if a["ci_low"] > b["ci_high"]:
        return "larger"
    return "not distinguishable"


def compare(arm: dict[str, Any], base: dict[str, Any], seeds, *, resamples: int = 2000) -> dict[str, Any]:
    """``arm`` against the baseline: divergence crossings and final values, std over k and over
    seeds, accuracy (a paired bootstrap over seeds of the difference) and time."""
    da, db = arm["divergence"], base["divergence"]
    step = lambda x: np.inf if x is None else x
    pairs = [(step(da["first_step_above"][str(s)]), step(db["first_step_above"][str(s)])) for s in seeds]
    ma, mb = (np.inf if d["median_first_step_above"] is None else d["median_first_step_above"] for d in (da, db))
    crossing = ("never, in both" if ma == mb == np.inf else "later" if ma > mb else "earlier" if ma < mb
                else "at the same step")
    spread = {name: {side: {"arm": arm["spread"][name][side], "baseline": base["spread"][name][side],
                            "verdict": _versus(arm["spread"][name][side], base["spread"][name][side])}
                     for side in ("over_k", "over_seeds")} for name in ("accuracy", "loss")}
    diff = np.array([arm["seed_accuracy"][str(s)] - base["seed_accuracy"][str(s)] for s in seeds])
    d = bootstrap(diff, resamples=resamples)
    fa, fb = da["final_median"], db["final_median"]
    return {
        "divergence": {
            "median_first_step_above": {"arm": da["median_first_step_above"], "baseline": db["median_first_step_above"]},
            "crossed": {"arm": da["crossed"], "baseline": db["crossed"], "seeds": len(seeds)},
            "crossing": crossing,
            "seeds_later": sum(a > b for a, b in pairs), "seeds_earlier": sum(a < b for a, b in pairs),
            "seeds_same": sum(a == b for a, b in pairs),
            "final_median": {"arm": fa, "baseline": fb,
                             "verdict": _versus({"ci_low": fa["ci_low"], "ci_high": fa["ci_high"]},
                                                {"ci_low": fb["ci_low"], "ci_high": fb["ci_high"]})},
        },
        "spread": spread,
        "accuracy_difference": d | {"verdict": "lower" if d["ci_high"] < 0 else "higher" if d["ci_low"] > 0
                                    else "not distinguishable"},
        "seconds": {"arm": arm["seconds"], "baseline": base["seconds"],
                    "ratio": arm["seconds"] / base["seconds"] if base["seconds"] > 0 else None},
    }


def _ci(d: dict[str, float], key: str = "estimate", digits: str = ".3g") -> str:
    return f"{d[key]:{digits}} [{d['ci_low']:{digits}}, {d['ci_high']:{digits}}]"


def _step(x: float | None) -> str:
    return "never" if x is None else f"{x:g}"


def _at(x: float | None) -> str:
    return "never" if x is None else f"at step {x:g}"


def _describe(name: str, arm: dict[str, Any], payload: dict[str, Any]) -> str:
    s = payload["settings"]
    if name == "guarded":
        return f"the guarded arm (the baseline under the CFL guard, safety {s['safety']:g}, every {s['every']} steps)"
    if name == "constant":
        return f"the constant arm (lr {arm['lr']:.4g} throughout, no decay)"
    return f"the baseline (lr {arm['lr']:g}, divided by 10 at epochs {arm['milestones']})"


_SPREAD_WORDS = {"smaller": "SMALLER THAN", "larger": "LARGER THAN", "not distinguishable": "NOT DISTINGUISHABLE FROM"}


def answer(payload: dict[str, Any]) -> str:
    """The answer in plain words, every sentence read off the numbers and their intervals."""
    arms, s = payload["arms"], payload["settings"]
    base = arms["baseline"]
    g = base["divergence"]
    pair = f"k = {g['reference_k']:g} vs k = {g['compared_k']:g}"
    n = len(s["seeds"])
    c = payload["constant_lr"]
    lines = [
        f"Three arms, k in {{{', '.join(f'{k:g}' for k in s['ks'])}}} x seeds {s['seeds']}, {s['epochs']} epoch(s) "
        f"each: {_describe('baseline', base, payload)}; {_describe('guarded', arms['guarded'], payload)}; "
        f"{_describe('constant', arms['constant'], payload)}, the smallest lr limit the guard set over every step, "
        f"seed and copy (base lr {c['base_lr']:g}; the guard lowered "
        f"{100 * c['guard_clipped_fraction']:.1f}% of its step-copies).",
    ]
    for name in ("guarded", "constant"):
        arm, cmp = arms[name], payload["comparisons"][name]
        dv, sp, acc = cmp["divergence"], cmp["spread"], cmp["accuracy_difference"]
        m = dv["median_first_step_above"]
        lines += [
            "",
            f"{name.upper()} against the baseline.",
            f"Amplification: the {pair} divergence of the weights first passes {LEVEL:g} {_at(m['arm'])} in this "
            f"arm and {_at(m['baseline'])} in the baseline (median over seeds; {dv['crossed']['arm']} and "
            f"{dv['crossed']['baseline']} of {n} seeds pass it): {dv['crossing'].upper()}; later in "
            f"{dv['seeds_later']}, earlier in {dv['seeds_earlier']}, at the same step in {dv['seeds_same']} of the "
            f"{n} seeds. Its final value (median over seeds) is {_ci(dv['final_median']['arm'])} against "
            f"{_ci(dv['final_median']['baseline'])}: {dv['final_median']['verdict'].upper()}.",
            f"Variance: std over k of the test accuracy {_ci(sp['accuracy']['over_k']['arm'], 'std')} against "
            f"{_ci(sp['accuracy']['over_k']['baseline'], 'std')} points: "
            f"{sp['accuracy']['over_k']['verdict'].upper()}; of the test loss "
            f"{_ci(sp['loss']['over_k']['arm'], 'std')} against {_ci(sp['loss']['over_k']['baseline'], 'std')}: "
            f"{sp['loss']['over_k']['verdict'].upper()}. Std over seeds of the accuracy "
            f"{_ci(sp['accuracy']['over_seeds']['arm'], 'std')} against "
            f"{_ci(sp['accuracy']['over_seeds']['baseline'], 'std')}: "
            f"{sp['accuracy']['over_seeds']['verdict'].upper()}. Within the arm, the spread over k is "
            f"{_verdict_words(arm['spread']['accuracy']['verdict'])} the spread over seeds "
            f"(the baseline's: {_verdict_words(base['spread']['accuracy']['verdict'])}).",
            f"Cost: mean test accuracy {_ci(arm['mean_accuracy'], digits='.2f')}% against "
            f"{_ci(base['mean_accuracy'], digits='.2f')}%; the paired difference {_ci(acc, digits='+.2f')} points is "
            f"{acc['verdict'].upper()}; wall time {arm['seconds']:.1f}s against {base['seconds']:.1f}s"
            + (f" ({cmp['seconds']['ratio']:.2f}x)" if cmp["seconds"]["ratio"] is not None else "")
            + (f"; the first step, which compiles, took {arm['compile_seconds']:.1f}s and "
               f"{base['compile_seconds']:.1f}s of them."
               if arm.get("compile_seconds") is not None and base.get("compile_seconds") is not None else "."),
        ]
    lines += ["", "ANSWER: " + _conclusion(payload)]
    notes = []
    if c["guard_clipped_fraction"] == 0:
        notes.append("The guard never lowered a step's lr: the guarded arm took the baseline's steps.")
    if min(len(s["ks"]), n) < 3:
        notes.append("With fewer than 3 k or 3 seeds the bootstrap intervals are very wide (with 2 seeds an "
                     "interval over seeds spans the two values); the default grid is 6 k x 5 seeds.")
    resumed = [name for name in ARMS if arms[name].get("resumed")]
    if resumed:
        notes.append(f"Resumed after an interruption: {', '.join(resumed)}; their wall time counts only the part "
                     f"that ran after the resume.")
    notes.append("The constant lr keeps every step stable against the sharpness the guarded arm met; the constant "
                 "arm's own sharpness is not measured.")
    lines += ["", "Notes: " + " ".join(notes)]
    return "\n".join(lines)


def _verdict_words(verdict: str | None) -> str:
    return {"same size": "of the same size as", "smaller": "smaller than", "larger": "larger than"}.get(
        verdict, "not comparable with")


def _conclusion(payload: dict[str, Any]) -> str:
    parts = []
    for name, how in (("guarded", "Keeping every step stable with the guard"),
                      ("constant", "A constant lr at the smallest limit the guard set")):
        cmp = payload["comparisons"][name]
        dv, sp, acc = cmp["divergence"], cmp["spread"], cmp["accuracy_difference"]
        if dv["crossed"]["arm"] == 0 and dv["crossed"]["baseline"] > 0:
            amp = f"removes the amplification up to {LEVEL:g} (no seed's divergence reaches it; the baseline's does)"
        elif dv["crossing"] == "never, in both":
            amp = f"leaves the divergence below {LEVEL:g} as the baseline does"
        elif dv["crossing"] == "later":
            amp = f"delays the amplification (the divergence passes {LEVEL:g} later) but does not remove it"
        elif dv["crossing"] == "earlier":
            amp = f"does not delay the amplification (the divergence passes {LEVEL:g} earlier)"
        else:
            amp = f"does not delay the amplification (the divergence passes {LEVEL:g} at the same step)"
        final = {"smaller": "a smaller final divergence than the baseline",
                 "larger": "a larger final divergence than the baseline",
                 "not distinguishable": "a final divergence not distinguishable from the baseline's"}
        variance_share = {"smaller": "reduces", "larger": "increases",
                          "not distinguishable": "does not measurably change"}[sp["accuracy"]["over_k"]["verdict"]]
        cost = {"lower": "costs accuracy", "higher": "gains accuracy",
                "not distinguishable": "changes the accuracy by an amount not distinguishable from 0"}[acc["verdict"]]
        ratio = cmp["seconds"]["ratio"]
        parts.append(
            f"{how} ({name}) {amp}, and ends with {final[dv['final_median']['verdict']]}; it "
            f"{variance_share} the perturbation's share of the variance (std over k of the accuracy "
            f"{sp['accuracy']['over_k']['arm']['std']:.3g} against {sp['accuracy']['over_k']['baseline']['std']:.3g}, "
            f"intervals {'overlapping' if sp['accuracy']['over_k']['verdict'] == 'not distinguishable' else 'disjoint'})"
            f"; it {cost} ({acc['estimate']:+.2f} points, interval [{acc['ci_low']:+.2f}, {acc['ci_high']:+.2f}])"
            + (f" and takes {ratio:.2f}x the baseline's wall time." if ratio is not None else "."))
    return " ".join(parts)


def _run_rows(arms: dict[str, Any]) -> list[dict[str, Any]]:
    return [dict(arm=name, k=f"{r['k']:g}", seed=r["seed"], lr=f"{arm['lr']:.8g}", guard=int(arm["guarded"]),
                 milestones=" ".join(map(str, arm["milestones"])), final_accuracy=f"{r['final_accuracy']:.6f}",
                 final_loss=f"{r['final_loss']:.8g}")
            for name, arm in arms.items() for r in arm["runs"]]


def _summary_rows(arms: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, arm in arms.items():
        row = dict(arm=name, lr=f"{arm['lr']:.8g}", guard=int(arm["guarded"]),
                   milestones=" ".join(map(str, arm["milestones"])),
                   mean_accuracy=arm["mean_accuracy"]["estimate"], mean_accuracy_ci_low=arm["mean_accuracy"]["ci_low"],
                   mean_accuracy_ci_high=arm["mean_accuracy"]["ci_high"])
        for quantity in ("accuracy", "loss"):
            for side in ("over_k", "over_seeds"):
                d = arm["spread"][quantity][side]
                row.update({f"{quantity}_std_{side}": d["std"], f"{quantity}_std_{side}_ci_low": d["ci_low"],
                            f"{quantity}_std_{side}_ci_high": d["ci_high"]})
        dv = arm["divergence"]
        row.update(churn_over_k=arm["churn"]["over_k"]["mean"], churn_over_seeds=arm["churn"]["over_seeds"]["mean"],
                   median_first_step_above_1e_2=("never" if dv["median_first_step_above"] is None
                                                 else dv["median_first_step_above"]),
                   seeds_crossed=dv["crossed"], final_divergence_median=dv["final_median"]["estimate"],
                   final_divergence_ci_low=dv["final_median"]["ci_low"],
                   final_divergence_ci_high=dv["final_median"]["ci_high"], seconds=arm["seconds"],
                   compile_seconds=arm.get("compile_seconds"))
        rows.append(row)
    return rows


_STYLES = (("-", "o", 12), ("--", "s", 6), ("-.", "^", 6))
"""Line style, marker and marker size of each arm: arms that coincide (a guard that never acts) stay visible."""


def _plot(path: Path, payload: dict[str, Any], curves: dict[str, dict[str, np.ndarray]]) -> str:
    from jaxcfl.plot import panels, save

    fig, (left, right) = panels(2, width=6.0, height=4.6)
    arms = payload["arms"]
    g = arms["baseline"]["divergence"]
    positive = lambda y: np.where(y > 0, y, np.nan)  # identical copies cannot show on a log axis
    for i, name in enumerate(ARMS):
        ks = [c for key, c in sorted(curves.get(name, {}).items()) if key.startswith("k_seed")]
        if not ks:
            continue
        steps = np.arange(1, len(ks[0]) + 1)
        for c in ks:
            left.plot(steps, positive(c), color=f"C{i}", lw=0.5, alpha=0.3)
        left.plot(steps, positive(np.median(ks, axis=0)), color=f"C{i}", lw=2, ls=_STYLES[i][0],
                  label=f"{name} (lr {arms[name]['lr']:.3g}), median over seeds")
    left.axhline(LEVEL, color="0.5", lw=0.8, ls=":", label=f"{LEVEL:g}")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set(xlabel="step", ylabel="divergence 2 mean(|w1-w2|/(|w1|+|w2|)) of the weights",
             title=f"k = {g['reference_k']:g} vs k = {g['compared_k']:g}, each arm")
    left.legend(fontsize=7)
    for i, name in enumerate(ARMS):
        sd, acc = arms[name]["spread"]["accuracy"]["over_k"], arms[name]["mean_accuracy"]
        right.errorbar([sd["std"]], [acc["estimate"]], xerr=[[sd["std"] - sd["ci_low"]], [sd["ci_high"] - sd["std"]]],
                       yerr=[[acc["estimate"] - acc["ci_low"]], [acc["ci_high"] - acc["estimate"]]],
                       fmt=_STYLES[i][1], ms=_STYLES[i][2], mfc="none" if i == 0 else f"C{i}", capsize=5 + 3 * (i == 0),
                       ls="none", elinewidth=2.5 if i == 0 else 1.2, color=f"C{i}", label=name)
    right.set(xlabel="std over k of the final test accuracy (points), 95% interval",
              ylabel="mean final test accuracy (%), 95% interval over seeds",
              title="accuracy against the perturbation's spread")
    right.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def render(payload: dict[str, Any]) -> str:
    """Two tables (spreads; divergence and time), the constant lr, then the answer."""
    arms, s = payload["arms"], payload["settings"]
    cell = lambda d, key="std": f"{d[key]:.3g} [{d['ci_low']:.3g}, {d['ci_high']:.3g}]"
    spreads = [[name, f"{arm['lr']:.4g}" + (" (guard)" if arm["guarded"] else "") + ("" if arm["milestones"] else " const"),
                f"{arm['mean_accuracy']['estimate']:.2f} [{arm['mean_accuracy']['ci_low']:.2f}, "
                f"{arm['mean_accuracy']['ci_high']:.2f}]",
                cell(arm["spread"]["accuracy"]["over_k"]), cell(arm["spread"]["accuracy"]["over_seeds"]),
                cell(arm["spread"]["loss"]["over_k"]), cell(arm["spread"]["loss"]["over_seeds"])]
               for name, arm in arms.items()]
    g = arms["baseline"]["divergence"]
    growth = [[name, f"{100 * arm['churn']['over_k']['mean']:.2f}", f"{100 * arm['churn']['over_seeds']['mean']:.2f}",
               f"{_step(arm['divergence']['median_first_step_above'])} ({arm['divergence']['crossed']}/{len(s['seeds'])})",
               cell(arm["divergence"]["final_median"], "estimate"),
               f"{arm['seconds']:.1f}" + ("" if arm.get("compile_seconds") is None else f" ({arm['compile_seconds']:.1f})")]
              for name, arm in arms.items()]
    c = payload["constant_lr"]
    text = [f"Open question (appendix A): {s['model']} on {s['dataset']}, {s['epochs']} epoch(s), batch {s['batch_size']}, "
            f"k = {[f'{k:g}' for k in s['ks']]}, seeds {s['seeds']}; 95% bootstrap intervals in brackets",
            table(spreads, ["arm", "lr", "mean acc. (%)", "acc. std over k", "acc. std over seeds",
                            "loss std over k", "loss std over seeds"]),
            "",
            table(growth, ["arm", "churn over k (%)", "churn over seeds (%)",
                           f"step > {LEVEL:g}, k={g['reference_k']:g} vs {g['compared_k']:g} (median, crossed)",
                           "final divergence (median)", "seconds (first step)"]),
            "",
            f"constant lr {c['lr']:.6g} = min over steps, seeds and copies of min(lr, {c['safety']:g} * "
            f"{c['stability_limit']:.4g} / lambda_max) along the guarded arm (largest lambda_max {c['max_lambda'] or float('nan'):.4g}; "
            f"at seed {c['at']['seed']}, step {c['at']['step']}); the guarded arm's effective lr, decay included, "
            f"went down to {c['min_effective_lr']:.3g}",
            "",
            payload["answer"],
            f"[{payload['seconds']:.1f}s]"]
    if payload.get("files"):
        text.append("files: " + ", ".join(payload["files"].values()))
    return "\n".join(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    Options.add_arguments(parser)
    _options.add_out(parser, DEFAULT_OUT, f"output directory (default ./{DEFAULT_OUT}); each arm trains in its own "
                     "sub-folder, and finished epochs and arms are reused")


def main(args: argparse.Namespace) -> dict[str, Any]:
    return run.call(Options.from_args(args), out=args.out)
