"""The nondeterminism protocol on any training: which source of variation moves the result, and how much.

Summers and Dinneen (ICML 2021, "Nondeterminism and Instability in Neural Network
Optimization") vary **one source at a time**, everything else fixed, and measure how far
apart the resulting runs end. :func:`sensitivity` does that on a user's own model,
optimiser and data, with the paper's last-bit perturbation as one more source:

* ``numerics``: the last-bit update perturbation ``k`` (1, 3, 5, ...; Section 4 of Sun et al.);
* ``init-bit``: one initial weight moved by one ulp (Summers and Dinneen's one-bit change);
* ``order``: the batch order;
* ``init``: the initialisation seed;
* ``augmentation`` and ``dropout``: their seeds, where the training has them.

Each source is one lockstep run of ``runs`` copies (:class:`jaxcfl.Lockstep`): copy 0 is the
baseline, the others differ from it in that source only. For each source the report gives the
std of the final metric and of the final loss with bootstrap 95% intervals, the pairwise
churn (disagreement of predicted classes), the mean pairwise correlation of the outputs, the
ensemble's gain over the mean single run, the weight divergence from copy 0 after every step
(its first crossings of 1e-3, 1e-2 and 1e-1, its growth rate per step with standard error,
and whether it was amplified beyond what re-injected rounding builds up:
:func:`jaxcfl.statistics.amplification`), and a plain verdict against ``order``.

The **determinism checks** repeat the baseline: in this process (bit-identical or not, and if
not, the first step and parameter that differ, from per-step checksums), in two fresh
processes when the training is given as an importable spec, and ``k = 2^n`` against ``k = 1``
(bit-identical for every optimiser: the perturbation is exact for powers of two).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxcfl._core import validate as v
from jaxcfl._core import statistics as st
__all__ = ["SOURCES", "DeterminismCheck", "SensitivityReport", "SourceResult", "Training", "load_training",
           "sensitivity"]

SOURCES = ("numerics", "init-bit", "order", "init", "augmentation", "dropout")
"""The sources of variation, one at a time (Summers and Dinneen's, plus the paper's ``k``)."""

REFERENCE = "order"
"""The source every other is compared with: the batch order, the variation every practitioner knows."""

SMALL_SOURCES = ("numerics", "init-bit")
"""Sources whose runs start one rounding apart: only their divergence can be judged amplified
(fig2's criterion compares it with what re-injected rounding builds up)."""

LEVELS = (1e-3, 1e-2, 1e-1)
"""Weight-divergence levels whose first crossing is reported."""

POWERS = (1.0, 2.0, 4.0, 1024.0)
"""The ``k`` of the determinism check: powers of two, which must leave every bit unchanged."""


@dataclasses.dataclass(frozen=True)
class Training:
    """What :func:`sensitivity` measures, as a user's spec function returns it.

    Attributes:
      model: an NNX module, a factory ``key -> nnx.Module``, or ``(init, apply)`` pure functions.
      optimizer: an ``optax.GradientTransformation`` (or a factory of one).
      data: ``(x, y)`` training arrays, or a function ``(seed, epoch) -> iterable of (x, y)``.
      test: ``(x, y)`` test arrays.
      loss, metric: ``(outputs, labels) -> per-example values`` (``None``: cross-entropy, accuracy).
      augment: ``(x, key) -> x``, a JAX augmentation run in the step (``None``: none).
      batch_size: for array data (``None``: the caller's).
      stability: the optimiser's stability threshold (:mod:`jaxcfl.limits`, e.g. ``Adam(lr=1e-3)``):
        the baseline's (preconditioned) sharpness is measured against it after every epoch.
    """

    model: Any
    optimizer: Any
    data: Any
    test: Any = None
    loss: Callable | None = None
    metric: Callable | None = None
    augment: Callable | None = None
    batch_size: int | None = None
    stability: Any = None


_TRAINING_FIELDS = tuple(f.name for f in dataclasses.fields(Training))


def as_training(value: Any, *, where: str = "the spec") -> Training:
    """A :class:`Training` from a dict with the keys ``model``, ``optimizer``, ``data`` (and
    optionally the other fields) or from any dataclass with those fields."""
    if isinstance(value, Training):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if not isinstance(value, Mapping):
        raise TypeError(f"{where} must return a dict with the keys model, optimizer, data (and optionally test) "
                        f"or a dataclass with those fields, got {type(value).__name__}")
    missing = [k for k in ("model", "optimizer", "data") if k not in value]
    if missing:
        raise ValueError(f"{where} returned no {', '.join(missing)} (it needs model, optimizer and data)")
    unknown = [k for k in value if k not in _TRAINING_FIELDS]
    if unknown:
        raise ValueError(f"{where} returned unknown keys {unknown}; known: {list(_TRAINING_FIELDS)}")
    return Training(**{k: value[k] for k in _TRAINING_FIELDS if k in value})


def load_training(spec: str) -> Training:
    """Call ``FUNCTION()`` of ``PATH.py:FUNCTION`` or ``module:FUNCTION`` and check what it returns.

    Raises:
      ValueError: a spec without ``:``, a missing file or module, a missing function, or a
        function that returns the wrong thing (each named).
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"spec must be PATH.py:FUNCTION or module:FUNCTION, got {spec!r}")
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ValueError(f"spec must be PATH.py:FUNCTION or module:FUNCTION, got {spec!r}")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ValueError(f"spec: no file {where!r}")
        module_name = f"_jaxcfl_spec_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
        loader = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[module_name] = module
        try:
            loader.loader.exec_module(module)
        except Exception as err:
            del sys.modules[module_name]
            raise ValueError(f"spec: {where} failed to import: {type(err).__name__}: {err}") from err
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise ValueError(f"spec: no module {where!r} ({err})") from err
    fn = getattr(module, name, None)
    if fn is None or not callable(fn):
        raise ValueError(f"spec: {where} has no function {name!r}")
    return as_training(fn(), where=f"{name}()")


# --- results ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SourceResult:
    """The runs that differ in one source only, and how far apart they ended."""

    source: str
    runs: int
    final_metric: tuple[float, ...]
    final_loss: tuple[float, ...]
    metric_std: st.Interval | None
    loss_std: st.Interval | None
    diverged: int
    churn: st.PairwiseSummary | None
    correlation: st.PairwiseSummary | None
    ensemble: st.EnsembleGain | None
    divergence: st.DivergenceSummary
    divergence_curve: np.ndarray = dataclasses.field(repr=False)
    verdict: str | None = None  # against REFERENCE: "same size", "smaller", "larger"
    loss_verdict: str | None = None
    sentence: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = lambda x: None if x is None else x.to_dict()
        return {"source": self.source, "runs": self.runs, "final_metric": list(self.final_metric),
                "final_loss": list(self.final_loss), "metric_std": d(self.metric_std), "loss_std": d(self.loss_std),
                "diverged": self.diverged, "churn": d(self.churn), "correlation": d(self.correlation),
                "ensemble": d(self.ensemble), "divergence": self.divergence.to_dict(), "verdict": self.verdict,
                "loss_verdict": self.loss_verdict, "sentence": self.sentence, "seconds": self.seconds}


@dataclasses.dataclass(frozen=True)
class DeterminismCheck:
    """The baseline repeated: in this process, in fresh processes, and with ``k = 2^n``."""

    repeat_identical: bool
    first_difference: dict[str, Any] | None  # {"step": 1-based, "parameter": path} of the repeat
    powers_identical: bool
    powers: tuple[float, ...]
    powers_difference: dict[str, Any] | None
    processes: dict[str, Any] | None  # run_in_processes' result, or {"skipped": why}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"powers": list(self.powers)}


@dataclasses.dataclass(frozen=True)
class SensitivityReport:
    """What :func:`sensitivity` found; :meth:`to_dict` is strict JSON, :meth:`plot` a figure."""

    sources: dict[str, SourceResult]
    skipped: dict[str, str]
    determinism: DeterminismCheck | None
    settings: dict[str, Any]
    seconds: float
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    curvature: dict[str, Any] | None = None  # the baseline's sharpness per epoch against its threshold

    def answer(self) -> str:
        """Plain words: each source against ``order``, and the determinism checks."""
        lines = []
        ref = self.sources.get(REFERENCE)
        for name, r in self.sources.items():
            if r.metric_std is None:
                lines.append(f"{name}: fewer than two finite runs ({r.diverged} diverged): no spread.")
                continue
            spread = (f"std of the final metric {_fmt(r.metric_std)}, of the final loss {_fmt(r.loss_std)}; "
                      f"churn {_pct(r.churn)}, output correlation {_num(r.correlation)}")
            if name == REFERENCE or ref is None or r.verdict is None:
                lines.append(f"{name}: {spread}.")
            else:
                lines.append(f"{name} against {REFERENCE}: {r.verdict.upper()} for the metric, "
                             f"{(r.loss_verdict or 'n/a').upper()} for the loss ({spread}).")
            amp = r.divergence
            if name not in SMALL_SOURCES:
                amplified = "amplification not judged (the runs differ by more than rounding from the start)"
            else:
                amplified = (f"{'AMPLIFIED' if amp.amplified else 'not amplified'} beyond re-injected rounding "
                             f"(peak {amp.max:.3g}, {amp.ratio_to_bound:.3g} x the accumulation bound)")
            crossing = ", ".join(f"{lvl:g} at step {s}" if s is not None else f"{lvl:g} never"
                                 for lvl, s in amp.first_step.items())
            growth = ("n/a" if amp.growth is None else f"{amp.growth.slope:.3g} +- {amp.growth.stderr:.2g} per step")
            lines.append(f"    weight divergence from copy 0: {crossing}; growth {growth}; {amplified}.")
        for name, why in self.skipped.items():
            lines.append(f"{name}: not measured ({why}).")
        c = self.curvature
        if c is not None and c["records"]:
            kind = "preconditioned sharpness" if c["preconditioned"] else "sharpness"
            peak = max(c["records"], key=lambda r: r["ratio"])
            lines.append(f"Curvature: the baseline's {kind} peaked at {peak['sharpness']:.4g} (epoch {peak['epoch']}), "
                         f"{100 * peak['ratio']:.1f}% of the {c['limit']['optimizer']} threshold "
                         f"{c['limit']['description']} = {c['limit']['threshold']:.4g}: "
                         + ("AT OR BEYOND the edge of stability." if peak["ratio"] >= 1 else
                            "below the edge of stability." if peak["ratio"] < 0.9 else "near the edge of stability."))
        d = self.determinism
        if d is not None:
            rep = "bit-identical" if d.repeat_identical else f"NOT bit-identical ({_where(d.first_difference)})"
            pw = ("bit-identical" if d.powers_identical
                  else f"NOT bit-identical ({_where(d.powers_difference)})")
            lines.append(f"Determinism: the baseline repeated in this process is {rep}; "
                         f"k = {', '.join(f'{k:g}' for k in d.powers[1:])} against k = 1: {pw}.")
            if d.processes is not None:
                if "skipped" in d.processes:
                    lines.append(f"Two processes: not run ({d.processes['skipped']}).")
                else:
                    lines.append("Two processes: " + ("bit-identical" if d.processes["identical"] else
                                                      "NOT bit-identical") + ", and "
                                 + ("the same bytes as this process" if d.processes.get("matches_this_process")
                                    else "NOT the bytes of this process") + ".")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        from jaxcfl._core.results import strict_payload

        return strict_payload({
            "settings": self.settings, "sources": {n: r.to_dict() for n, r in self.sources.items()},
            "skipped": dict(self.skipped),
            "determinism": None if self.determinism is None else self.determinism.to_dict(),
            "curvature": self.curvature, "answer": self.answer(), "seconds": self.seconds,
            "files": dict(self.files)})

    def plot(self, path: str | Path | None = None):
        """Three panels: the spread of the final metric per source (95% intervals), the weight
        divergence from copy 0 along the run, and churn and output correlation per source."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        names = list(self.sources)
        curv = self.curvature if self.curvature and self.curvature["records"] else None
        fig, axes = plt.subplots(1, 4 if curv else 3, figsize=(20 if curv else 15, 4.2))
        ax = axes[0]
        for i, n in enumerate(names):
            r = self.sources[n].metric_std
            if r is not None:
                ax.errorbar(i, r.estimate, yerr=[[r.estimate - r.low], [r.high - r.estimate]], fmt="o", capsize=4,
                            color="C3" if n == REFERENCE else "C0")
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set_ylabel("std of the final metric over runs")
        ax.set_title("Spread by source (bootstrap 95%)")
        ax = axes[1]
        for i, n in enumerate(names):
            curve = np.asarray(self.sources[n].divergence_curve, np.float64)
            steps = np.arange(1, curve.size + 1)
            keep = curve > 0
            if keep.any():
                ax.semilogy(steps[keep], curve[keep], label=n, color=f"C{i}")
        ax.set_xlabel("step")
        ax.set_ylabel("weight divergence from copy 0 (mean over copies)")
        ax.set_title("Divergence along the run")
        if any(np.any(np.asarray(self.sources[n].divergence_curve) > 0) for n in names):
            ax.legend(fontsize=8)
        ax = axes[2]
        width = 0.38
        churn = [0.0 if self.sources[n].churn is None else self.sources[n].churn.mean for n in names]
        corr = [np.nan if self.sources[n].correlation is None else self.sources[n].correlation.mean for n in names]
        ax.bar(np.arange(len(names)) - width / 2, churn, width, label="churn (fraction of test examples)")
        ax.bar(np.arange(len(names)) + width / 2, 1 - np.asarray(corr), width, label="1 - output correlation")
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set_title("Disagreement between runs")
        ax.legend(fontsize=8)
        if curv:
            ax = axes[3]
            epochs = [r["epoch"] for r in curv["records"]]
            ax.plot(epochs, [r["sharpness"] for r in curv["records"]], "o-",
                    label=("preconditioned " if curv["preconditioned"] else "") + "sharpness")
            ax.axhline(curv["limit"]["threshold"], color="C3", ls="--", label=curv["limit"]["description"])
            ax.set_yscale("log")
            ax.set_xlabel("epoch")
            ax.set_title("Baseline curvature against its threshold")
            ax.legend(fontsize=8)
        missing = "; ".join(f"{n}: {why}" for n, why in self.skipped.items())
        fig.suptitle("jaxcfl sensitivity: one source of variation at a time"
                     + (f"\n(not measured: {missing})" if missing else ""), fontsize=10)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
            plt.close(fig)
        return fig


def _fmt(i: st.Interval | None) -> str:
    return "n/a" if i is None else f"{i.estimate:.3g} [{i.low:.3g}, {i.high:.3g}]"


def _pct(s: st.PairwiseSummary | None) -> str:
    return "n/a" if s is None else f"{100 * s.mean:.2f}%"


def _num(s: st.PairwiseSummary | None) -> str:
    return "n/a" if s is None else f"{s.mean:.4f}"


def _where(diff: dict[str, Any] | None) -> str:
    if not diff:
        return "the final weights differ"
    return f"first at step {diff['step']}, parameter {diff['parameter']}"


# --- the protocol ----------------------------------------------------------------------------------

def _varied(runs: int, seed: int, first: Any = None) -> tuple:
    """One value per copy: ``first`` (default ``seed``) for copy 0, then ``seed + 1, seed + 2, ...``."""
    return (seed if first is None else first, *(seed + i for i in range(1, runs)))


_VARIED: dict[str, Callable[[int, int], dict[str, Any]]] = {
    "numerics": lambda runs, seed: {"k": tuple(float(2 * i + 1) for i in range(runs))},
    "init-bit": lambda runs, seed: {"init_ulp": (None, *range(1, runs))},
    "order": lambda runs, seed: {"data_seed": _varied(runs, seed)},
    "init": lambda runs, seed: {"init_seed": _varied(runs, seed)},
    "augmentation": lambda runs, seed: {"augment_seed": _varied(runs, seed)},
    "dropout": lambda runs, seed: {"dropout_seed": (None, *range(1, runs))},
}
"""Per source, the :class:`jaxcfl.Copies` fields its copies differ in (copy 0 is the baseline)."""


def copies_for(source: str, runs: int, seed: int):
    """The :class:`jaxcfl.Copies` of ``source``: copy 0 the baseline, the others differ in ``source`` only."""
    from jaxcfl.nn._lockstep import Copies

    v.check_choice("sources", source, SOURCES)
    return Copies(**{"init_seed": seed, "data_seed": seed, "augment_seed": seed, **_VARIED[source](runs, seed)})


def _has_rng_state(engine) -> bool:
    import jax

    state = engine.model.init(jax.random.key(0))[1]
    return any(jax.numpy.issubdtype(a.dtype, jax.dtypes.prng_key) for a in jax.tree.leaves(state))


def _data_digest(data: Any) -> str:
    if callable(data) and not isinstance(data, (tuple, list)):
        return f"function {getattr(data, '__module__', '?')}.{getattr(data, '__qualname__', type(data).__name__)}"
    h = hashlib.sha256()
    for a in data:
        arr = np.ascontiguousarray(np.asarray(a))
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:16]


def _first_difference(a: np.ndarray, b: np.ndarray, paths: Sequence[str]) -> dict[str, Any] | None:
    """The first step (1-based) and parameter whose checksums differ between two ``(steps, leaves)`` tables."""
    if a.shape != b.shape:
        return {"step": None, "parameter": f"different shapes {a.shape} vs {b.shape}"}
    diff = np.argwhere(a != b)
    if diff.size == 0:
        return None
    step, leaf = diff[0]
    return {"step": int(step) + 1, "parameter": paths[leaf] if leaf < len(paths) else f"leaf {leaf}"}


def _summarise(source: str, result, test_y: np.ndarray | None, *, resamples: int, seconds: float) -> SourceResult:
    metric, loss = np.asarray(result.final_accuracy(), np.float64), np.asarray(result.final_loss(), np.float64)
    finite = np.isfinite(metric) & np.isfinite(loss)
    runs = len(metric)
    metric_std = loss_std = None
    if finite.sum() >= 2:
        metric_std = st.std_interval(metric[finite], resamples=resamples)
        loss_std = st.std_interval(loss[finite], resamples=resamples)
    churn = correlation = ensemble = None
    predictions = result.test_predictions
    if predictions is not None and predictions.size and predictions.shape[0] >= 2:
        churn = st.pairwise_disagreement(predictions)
    outputs = result.test_outputs
    if outputs is not None and outputs.size and outputs.shape[0] >= 2 and np.all(np.isfinite(outputs)):
        try:
            correlation = st.pairwise_correlation(outputs)
        except ValueError:  # a constant run: no correlation defined
            correlation = None
        if outputs.ndim == 3 and test_y is not None and np.issubdtype(np.asarray(test_y).dtype, np.integer):
            ensemble = st.ensemble_gain(outputs, test_y)
    steps = result.step_divergence
    curve = steps[:, 1:].mean(axis=1) if steps.shape[1] > 1 else np.zeros(steps.shape[0])
    return SourceResult(source, runs, tuple(metric.tolist()), tuple(loss.tolist()), metric_std, loss_std,
                        int(runs - finite.sum()), churn, correlation, ensemble,
                        st.divergence_summary(curve, levels=LEVELS), curve, seconds=seconds)


def _with_verdicts(results: dict[str, SourceResult], metric_name: str) -> dict[str, SourceResult]:
    ref = results.get(REFERENCE)
    if ref is None or ref.metric_std is None:
        return results
    out = {}
    for name, r in results.items():
        if name == REFERENCE or r.metric_std is None:
            out[name] = r
            continue
        out[name] = dataclasses.replace(
            r, verdict=st.compare_sources(r.metric_std, ref.metric_std),
            loss_verdict=st.compare_sources(r.loss_std, ref.loss_std),
            sentence=st.verdict_sentence(name, r.metric_std, ref.metric_std, metric_name))
    return out


def sensitivity(
    model: Any,
    optimizer: Any,
    data: Any,
    *,
    test: tuple[Any, Any],
    sources: Sequence[str] | None = None,
    runs: int = 5,
    epochs: int = 3,
    batch_size: int | None = 128,
    loss: Callable | None = None,
    metric: Callable | None = None,
    augment: Callable | None = None,
    seed: int = 0,
    determinism: bool = True,
    spec: str | None = None,
    out: str | Path | None = None,
    copies_mode: str = "auto",
    resamples: int = 2000,
    metric_name: str = "accuracy",
    stability: Any = None,
    curvature_examples: int = 256,
    curvature_iterations: int = 20,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> SensitivityReport:
    """Run the nondeterminism protocol on a training run: one source of variation at a time.

    Args:
      model: an NNX module, a factory ``key -> nnx.Module`` (needed for the ``init``
        source), or ``(init, apply)`` pure functions (:func:`jaxcfl.nn._lockstep.as_model`).
      optimizer: any ``optax.GradientTransformation``, or a factory of one.
      data: ``(x, y)`` training arrays or a function ``(seed, epoch) -> batches``.
      test: ``(x, y)`` test arrays.
      sources: a subset of :data:`SOURCES`; ``None``: every source the training has
        (``augmentation`` needs ``augment``, ``dropout`` an RNG stream in the model).
      runs: runs per source (``>= 2``; copy 0 is the baseline).
      epochs, batch_size: the training's length and batch (``batch_size`` for array data).
      loss, metric: ``(outputs, labels) -> per-example values`` (default cross-entropy, accuracy).
      augment: ``(x, key) -> x`` run in the step, keyed by each copy's augmentation seed.
      seed: the baseline's seed of everything (initialisation, order, augmentation).
      determinism: also run the determinism checks (the baseline repeated; ``k = 2^n``).
      spec: the training as ``PATH.py:FUNCTION`` / ``module:FUNCTION``, for the two-process
        check (objects cannot be sent to a fresh process); ``None``: that check is skipped.
      out: a result folder: each source's run is checkpointed and resumed after a kill;
        ``report.json`` and ``report.png`` at the end.
      copies_mode: ``"auto"``, ``"vmap"`` or ``"unroll"`` (:func:`jaxcfl.nn._lockstep.resolve_copies_mode`).
      resamples: bootstrap resamples of each interval.
      metric_name: what the metric is, for the report's sentences.
      stability: the optimiser's threshold (:mod:`jaxcfl.limits`: ``GradientDescent``, ``HeavyBall``,
        ``Nesterov``, ``Adam``); the baseline's sharpness (Adam: preconditioned) on the first
        ``curvature_examples`` training examples is measured after every epoch of the first
        source's run, by ``curvature_iterations`` Lanczos steps, and held against it.
      progress: progress bars (``None``: on a terminal).
      log: called with a line per finished source (``None``: silent).

    Returns:
      :class:`SensitivityReport`.
    """
    from jaxcfl._core.results import ResultDir
    from jaxcfl.nn._lockstep import Lockstep, accuracy, per_example_cross_entropy

    start = time.perf_counter()
    runs = v.check_int("runs", runs, minimum=2)
    epochs = v.check_int("epochs", epochs)
    seed = v.check_int("seed", seed, minimum=0)
    resamples = v.check_int("resamples", resamples, minimum=10)
    if batch_size is not None:
        batch_size = v.check_int("batch_size", batch_size)
    if sources is not None:
        if isinstance(sources, str):
            sources = [sources]
        sources = list(dict.fromkeys(sources))
        if not sources:
            raise ValueError("sources is empty; give at least one of " + ", ".join(SOURCES))
        for s in sources:
            v.check_choice("sources", s, SOURCES)
    if not (isinstance(test, (tuple, list)) and len(test) == 2):
        raise TypeError(f"test must be a pair (x, y) of arrays, got {type(test).__name__}")
    test_x, test_y = np.asarray(test[0]), np.asarray(test[1])
    if spec is not None and not isinstance(spec, str):
        raise TypeError(f"spec must be a 'PATH.py:FUNCTION' string or None, got {type(spec).__name__}")
    say = log or (lambda line: None)
    if stability is not None:
        from jaxcfl.nn._limits import Limit

        if not isinstance(stability, Limit):
            raise TypeError(f"stability must be a jaxcfl.limits object (GradientDescent, HeavyBall, Nesterov, Adam), "
                            f"got {type(stability).__name__}")
        curvature_examples = v.check_int("curvature_examples", curvature_examples)
        curvature_iterations = v.check_int("curvature_iterations", curvature_iterations)
    engine = Lockstep(model, optimizer, loss=loss or per_example_cross_entropy, metric=metric or accuracy,
                      augment=augment, copies_mode=copies_mode, keep_outputs=True, checksums=True)
    _check_shapes(engine, data, test_x, test_y, batch_size)
    skipped: dict[str, str] = {}
    wanted = list(SOURCES) if sources is None else list(sources)
    if "augmentation" in wanted and augment is None:
        skipped["augmentation"] = "the training has no augment function"
    if "dropout" in wanted and not _has_rng_state(engine):
        skipped["dropout"] = "the model has no RNG stream (no Dropout or other stochastic layer)"
    if "init" in wanted and not engine.model.seeded:
        skipped["init"] = "the model is a ready-built module; pass a factory key -> nnx.Module to vary the seed"
    if sources is not None and skipped:
        raise ValueError("sources: " + "; ".join(f"{n}: {why}" for n, why in skipped.items()))
    chosen = [s for s in wanted if s not in skipped]
    settings = {"model": engine.model.name, "optimizer": engine.optimizer.name, "data": _data_digest(data),
                "test": _data_digest((test_x, test_y)), "runs": runs, "epochs": epochs, "batch_size": batch_size,
                "seed": seed, "sources": chosen}
    folder = ResultDir(out, kind="sensitivity", identity={  # how it is computed or worded (copies_mode, resamples) is not
        **settings, "determinism": determinism, "spec": spec, "stability": None if stability is None else repr(stability),
        "curvature_examples": curvature_examples, "curvature_iterations": curvature_iterations})
    say(f"[sensitivity] {', '.join(chosen)}: {runs} runs each, {epochs} epochs"
        + (f"; not measured: {', '.join(skipped)}" if skipped else "") + " ...")
    fit = dict(epochs=epochs, batch_size=batch_size, test=(test_x, test_y), progress=progress)
    try:
        results: dict[str, SourceResult] = {}
        curvature = None
        if stability is not None:
            curvature = _Curvature(engine, stability, data, seed, batch_size, curvature_examples,
                                   curvature_iterations, folder)
        for name in chosen:
            t0 = time.perf_counter()
            copies = copies_for(name, runs, seed)
            run_out = folder.file(f"runs/{name}") if folder.writes else None
            hook = curvature.on_epoch if curvature is not None and name == chosen[0] else None
            res = engine.fit(data, copies, out=run_out, settings={**settings, "source": name,
                                                                    "copies": copies.to_dict()},
                             description=f"sensitivity: {name}", on_epoch=hook, **fit)
            results[name] = _summarise(name, res, test_y, resamples=resamples, seconds=time.perf_counter() - t0)
            say(f"[sensitivity] {name}: {runs} runs, metric std {_fmt(results[name].metric_std)}, churn "
                f"{_pct(results[name].churn)} [{time.perf_counter() - t0:.1f}s]")
        results = _with_verdicts(results, metric_name)
        check = None
        if determinism:
            check = _determinism(engine, data, fit, folder, settings, spec, seed, copies_mode, say)
        report = SensitivityReport(results, skipped, check, settings, time.perf_counter() - start,
                                   curvature=None if curvature is None else curvature.payload())
        if folder.writes:
            files = {"json": str(folder.path / "report.json"), "figure": str(folder.file("report.png"))}
            report.plot(folder.path / "report.png")
            report = dataclasses.replace(report, files=files, seconds=time.perf_counter() - start)
            folder.write_json("report.json", report.to_dict())
    finally:
        folder.close()
    return report


class _Curvature:
    """The baseline's (preconditioned) sharpness after every epoch, against the optimiser's threshold.

    Kept in ``curvature.json`` of the result folder as the epochs finish, so that a resumed run
    (whose finished epochs are not replayed) still reports every epoch."""

    def __init__(self, engine, limit, data, seed, batch_size, examples, iterations, folder):
        import jax
        import jax.numpy as jnp

        self.limit, self.iterations, self.folder = limit, iterations, folder
        if callable(data) and not isinstance(data, (tuple, list)):
            x, y = next(iter(data(seed, 0)))
        else:
            x, y = data
        self.x, self.y = jnp.asarray(np.asarray(x)[:examples]), jnp.asarray(np.asarray(y)[:examples])
        model, loss = engine.model, engine.loss

        def objective(params, state, x, y):
            return jnp.mean(loss(model.apply(params, state, x, True)[0], y))

        def preconditioned(q, scale, state, x, y):  # p = scale * q: the Hessian in q is S H S
            return objective(jax.tree.map(lambda a, b: a * b, q, scale), state, x, y)

        self.objective, self.preconditioned_objective = objective, preconditioned
        self.records: list[dict[str, Any]] = []
        if folder.writes and (folder.path / "curvature.json").exists():
            import json

            saved = json.loads((folder.path / "curvature.json").read_text())
            if saved.get("limit") == limit.to_dict():
                self.records = saved["records"]

    def on_epoch(self, epoch: int, partial) -> None:
        import jax

        from jaxcfl._core.curvature import sharpness

        first = partial.state.copy(0)
        scale = self.limit.scale(first.opt_state)
        iterations = min(self.iterations, sum(int(np.size(a)) for a in jax.tree.leaves(first.params)))
        if scale is None:
            lam = sharpness(self.objective, first.params, first.model_state, self.x, self.y, alpha=self.limit.alpha,
                            iterations=iterations)
        else:
            q = jax.tree.map(lambda p, s: p / s, first.params, scale)
            lam = sharpness(self.preconditioned_objective, q, scale, first.model_state, self.x, self.y,
                            iterations=iterations)
        self.records = [r for r in self.records if r["epoch"] < epoch]
        self.records.append({"epoch": epoch, "sharpness": float(lam), "threshold": self.limit.threshold,
                             "ratio": float(lam) / self.limit.threshold})
        if self.folder.writes:
            self.folder.write_json("curvature.json", self.payload())

    def payload(self) -> dict[str, Any]:
        return {"limit": self.limit.to_dict(), "preconditioned": self.limit.preconditioned,
                "examples": int(self.x.shape[0]), "iterations": self.iterations, "records": list(self.records)}


def _check_shapes(engine, data, test_x, test_y, batch_size) -> None:
    """Refuse, before any training, data whose shapes the model or the labels cannot take."""
    import jax

    if len(test_x) != len(test_y):
        raise ValueError(f"test: x and y hold different numbers of examples ({len(test_x)} vs {len(test_y)})")
    if not (callable(data) and not isinstance(data, (tuple, list))):
        if not (isinstance(data, (tuple, list)) and len(data) == 2):
            raise TypeError(f"data must be a pair (x, y) of arrays or a function (seed, epoch) -> batches, "
                            f"got {type(data).__name__}")
        x, y = np.asarray(data[0]), np.asarray(data[1])
        if len(x) != len(y):
            raise ValueError(f"data: x and y hold different numbers of examples ({len(x)} vs {len(y)})")
        if batch_size is None:
            raise ValueError("batch_size is needed for array data")
        if x.shape[1:] != test_x.shape[1:]:
            raise ValueError(f"data and test: examples of different shapes ({x.shape[1:]} vs {test_x.shape[1:]})")
    params, state = jax.eval_shape(engine.model.init, jax.random.key(0))
    sample = jax.ShapeDtypeStruct((2, *test_x.shape[1:]), test_x.dtype)
    try:
        outputs = jax.eval_shape(lambda p, s, x: engine.model.apply(p, s, x, False)[0], params, state, sample)
    except Exception as err:
        raise ValueError(f"the model cannot take test examples of shape {test_x.shape[1:]}: "
                         f"{type(err).__name__}: {str(err)[:300]}") from None
    labels = jax.ShapeDtypeStruct((2, *test_y.shape[1:]), test_y.dtype)
    try:
        jax.eval_shape(engine.loss, outputs, labels)
    except Exception as err:
        raise ValueError(f"the loss cannot take the model's outputs {outputs.shape} with labels of shape "
                         f"{test_y.shape[1:]}: {type(err).__name__}: {str(err)[:300]}") from None


def _determinism(engine, data, fit, folder, settings, spec, seed, copies_mode, say) -> DeterminismCheck:
    from jaxcfl._core.determinism import run_in_processes
    from jaxcfl.nn._lockstep import Copies

    copies = Copies(k=POWERS, init_seed=seed, data_seed=seed, augment_seed=seed)
    runs = []
    for rep in ("a", "b"):
        run_out = folder.file(f"runs/determinism-{rep}") if folder.writes else None
        runs.append(engine.fit(data, copies, out=run_out, settings={**settings, "source": f"determinism-{rep}",
                                                                      "copies": copies.to_dict()},
                               description=f"determinism {rep}", **fit))
    a, b = runs
    repeat = a.fingerprints == b.fingerprints
    first = None if repeat else _first_difference(a.checksums[:, 0], b.checksums[:, 0], a.leaf_paths)
    powers = all(f == a.fingerprints[0] for f in a.fingerprints[1:])
    powers_diff = None
    if not powers:
        for i in range(1, len(POWERS)):
            powers_diff = _first_difference(a.checksums[:, 0], a.checksums[:, i], a.leaf_paths)
            if powers_diff is not None:
                powers_diff["k"] = POWERS[i]
                break
    processes: dict[str, Any] | None
    if spec is None:
        processes = {"skipped": "the training was given as objects; give spec='PATH.py:FUNCTION' "
                                "(the CLI does) to repeat it in fresh processes"}
    else:
        check = run_in_processes("jaxcfl.nn._protocol:baseline_weights", 2,
                                 kwargs=dict(spec=_absolute(spec), epochs=fit["epochs"], batch_size=fit["batch_size"],
                                             seed=seed, copies_mode=copies_mode))
        from jaxcfl._core.determinism import fingerprint

        here = fingerprint(_host_params(a.state.copy(0).params))
        processes = check.to_dict() | {"matches_this_process": check.fingerprints[0] == here}
    say(f"[sensitivity] determinism: repeat {'identical' if repeat else 'DIFFERS'}, k = 2^n "
        f"{'identical' if powers else 'DIFFERS'}")
    return DeterminismCheck(repeat, first, powers, POWERS, powers_diff, processes)


def _absolute(spec: str) -> str:
    """``spec`` with its file made absolute, for a process started elsewhere."""
    where, _, name = spec.rpartition(":")
    return f"{Path(where).resolve()}:{name}" if where.endswith(".py") else spec


def _host_params(params: Any) -> Any:
    import jax

    return jax.tree.map(np.asarray, jax.device_get(params))


def baseline_weights(spec: str, epochs: int, batch_size: int | None, seed: int, copies_mode: str = "auto") -> Any:
    """The final weights of the determinism check's ``k = 1`` copy (copy 0) of the training in ``spec``:
    what the two-process check fingerprints in each fresh process."""
    from jaxcfl.nn._lockstep import Copies, Lockstep, accuracy, per_example_cross_entropy

    training = load_training(spec)
    engine = Lockstep(training.model, training.optimizer, loss=training.loss or per_example_cross_entropy,
                      metric=training.metric or accuracy, augment=training.augment, copies_mode=copies_mode,
                      keep_outputs=True, checksums=True)
    copies = Copies(k=POWERS, init_seed=seed, data_seed=seed, augment_seed=seed)
    res = engine.fit(training.data, copies, epochs=epochs, batch_size=training.batch_size or batch_size,
                     test=None, progress=False)
    return _host_params(res.state.copy(0).params)
