"""``jaxcfl sensitivity [SPEC]``: the nondeterminism protocol on your own training.

SPEC is ``PATH.py:FUNCTION`` or ``module:FUNCTION``; ``FUNCTION()`` returns a dict with the keys
``model``, ``optimizer``, ``data`` and ``test`` (optionally ``loss``, ``metric``, ``augment``,
``batch_size``, and ``stability``: the optimiser's threshold from ``jaxcfl.limits``), or a
dataclass with those fields (see ``jaxcfl/examples/digits.py``). Without
SPEC the built-in example runs: an NNX network with BatchNorm and Dropout trained with AdamW on
the built-in digits.

One source of variation at a time (numerics: the last-bit perturbation k; init-bit: one ulp
of one initial weight; order; init; augmentation; dropout), each a lockstep run of --runs
copies that differ in that source only. The report gives, per source, the std of the final
metric and loss with bootstrap 95% intervals, churn, output correlation, the ensemble's gain,
the weight divergence along the run, and a verdict against the batch order; then whether the
training is bit-deterministic (repeated in this process and in two fresh processes) and
whether k = 2^n leaves every bit unchanged. Results go to --out as each source finishes; a
second run resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from jaxcfl._core.results import stderr
from jaxcfl.experiments import _options
from jaxcfl.experiments._options import BOOL, COUNT, SEED, option

DEFAULT_SPEC = "jaxcfl.examples.digits:training"
DEFAULT_OUT = "jaxcfl-sensitivity"


def _sources() -> tuple[str, ...]:
    from jaxcfl.nn._protocol import SOURCES

    return SOURCES


@dataclasses.dataclass(frozen=True)
class Options(_options.Options):
    """``jaxcfl sensitivity``'s options: the training (``spec``) and :func:`jaxcfl.sensitivity`'s own."""

    spec: str = option(DEFAULT_SPEC, "PATH.py:FUNCTION or module:FUNCTION returning the training (default {default})",
                       flag="spec", nargs="?")
    sources: tuple[str, ...] | None = option(None, "sources to vary, one at a time (default: every source the "
                                             "training has)", nargs="+", choices=_sources)
    runs: int = option(8, "runs per source, >= 2 (default {default})", _options.at_least(2))
    epochs: int = option(8, "epochs per run (default {default})", COUNT)
    batch_size: int | None = option(None, "batch size for array data (default: the spec's batch_size, else 128)",
                                    COUNT)
    seed: int = option(0, "the baseline's seed (default {default})", SEED)
    determinism: bool = option(True, "skip the determinism checks", BOOL, flag="--no-determinism",
                               action="store_false")
    copies_mode: str = _options.copies_mode("how the copies share one compiled step (default auto: unroll on CPU)")
    resamples: int = option(2000, "bootstrap resamples (default {default})", COUNT)
    progress: bool = option(False, "progress bars even when stderr is not a terminal", BOOL, action="store_true",
                            settings=False, identity=False)


@_options.entry(Options)
def run(o: Options, *, out: str | None = DEFAULT_OUT, log=stderr) -> dict[str, Any]:
    """:func:`jaxcfl.sensitivity` of the training that ``spec`` returns; the report as a JSON-able dict."""
    from jaxcfl.nn._protocol import load_training, sensitivity

    try:
        training = load_training(o.spec)
        report = sensitivity(training.model, training.optimizer, training.data, test=_test(training, o.spec),
                             sources=None if o.sources is None else list(o.sources), runs=o.runs, epochs=o.epochs,
                             batch_size=o.batch_size or training.batch_size or 128, loss=training.loss,
                             metric=training.metric, augment=training.augment, stability=training.stability,
                             seed=o.seed, determinism=o.determinism, spec=o.spec, out=out,
                             copies_mode=o.copies_mode, resamples=o.resamples,
                             progress=True if o.progress else None, log=log)
    except TypeError as err:  # a spec that returns the wrong kind of object: bad input, one line
        raise ValueError(str(err)) from None
    return report.to_dict()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    Options.add_arguments(parser)
    _options.add_out(parser, DEFAULT_OUT, f"output directory (default ./{DEFAULT_OUT})")


def main(args: argparse.Namespace) -> dict[str, Any]:
    return run.call(Options.from_args(args), out=args.out)


def _test(training, spec: str):
    if training.test is None:
        raise ValueError(f"{spec}: the training has no test data (return test=(x, y))")
    return training.test


def render(payload: dict[str, Any]) -> str:
    from jaxcfl._core.text import table

    rows = []
    for name, r in payload["sources"].items():
        ms, ls = r["metric_std"], r["loss_std"]
        fmt = lambda i: "n/a" if i is None else f"{i['std']:.4f} [{i['ci_low']:.4f}, {i['ci_high']:.4f}]"
        churn = "n/a" if r["churn"] is None else f"{100 * r['churn']['mean']:.2f}%"
        corr = "n/a" if r["correlation"] is None else f"{r['correlation']['mean']:.4f}"
        gain = "n/a" if r["ensemble"] is None else f"{100 * r['ensemble']['accuracy_gain']:+.2f}"
        rows.append([name, fmt(ms), fmt(ls), churn, corr, gain, r["verdict"] or ("reference" if name == "order"
                                                                                 else "n/a")])
    head = ["source", "std final metric [95%]", "std final loss [95%]", "churn", "correlation",
            "ensemble gain (pts)", "vs order"]
    files = payload.get("files") or {}
    tail = [f"Files: {files['json']}, {files['figure']}"] if files else []
    return "\n".join([table(rows, head), "", payload["answer"], *tail])
