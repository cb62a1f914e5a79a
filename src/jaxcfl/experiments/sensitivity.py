"""``jaxcfl sensitivity [SPEC]``: the nondeterminism protocol on your own training.

SPEC is ``PATH.py:FUNCTION`` or ``module:FUNCTION``; ``FUNCTION()`` returns a dict with the keys
``model``, ``optimizer``, ``data`` and ``test`` (optionally ``loss``, ``metric``, ``augment``,
``batch_size``, and ``stability``: the optimiser's threshold from ``jaxcfl.nn._limits``), or a
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
from typing import Any

from jaxcfl._core.results import stderr

DEFAULT_SPEC = "jaxcfl.examples.digits:training"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jaxcfl.experiments._cli_types import positive_int
    from jaxcfl.nn._protocol import SOURCES

    parser.add_argument("spec", nargs="?", default=DEFAULT_SPEC,
                        help=f"PATH.py:FUNCTION or module:FUNCTION returning the training (default {DEFAULT_SPEC})")
    parser.add_argument("--sources", nargs="+", choices=SOURCES, default=None,
                        help="sources to vary, one at a time (default: every source the training has)")
    parser.add_argument("--runs", type=positive_int, default=8, help="runs per source, >= 2 (default 8)")
    parser.add_argument("--epochs", type=positive_int, default=8, help="epochs per run (default 8)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="batch size for array data (default: the spec's batch_size, else 128)")
    parser.add_argument("--seed", type=int, default=0, help="the baseline's seed (default 0)")
    parser.add_argument("--no-determinism", action="store_true", help="skip the determinism checks")
    parser.add_argument("--copies-mode", choices=("auto", "vmap", "unroll"), default="auto",
                        help="how the copies share one compiled step (default auto: unroll on CPU)")
    parser.add_argument("--resamples", type=positive_int, default=2000, help="bootstrap resamples (default 2000)")
    parser.add_argument("--progress", action="store_true", help="progress bars even when stderr is not a terminal")
    parser.add_argument("--out", default="jaxcfl-sensitivity", help="output directory (default ./jaxcfl-sensitivity)")


def main(args: argparse.Namespace) -> dict[str, Any]:
    from jaxcfl.nn._protocol import load_training, sensitivity

    if args.runs < 2:
        raise ValueError(f"--runs must be >= 2 to compare runs, got {args.runs}")
    try:
        training = load_training(args.spec)
        report = sensitivity(training.model, training.optimizer, training.data, test=_test(training, args.spec),
                             sources=args.sources, runs=args.runs, epochs=args.epochs,
                             batch_size=args.batch_size or training.batch_size or 128, loss=training.loss,
                             metric=training.metric, augment=training.augment, stability=training.stability,
                             seed=args.seed,
                             determinism=not args.no_determinism, spec=args.spec, out=args.out,
                             copies_mode=args.copies_mode, resamples=args.resamples,
                             progress=True if args.progress else None, log=stderr)
    except TypeError as err:  # a spec that returns the wrong kind of object: bad input, one line
        raise ValueError(str(err)) from None
    return report.to_dict()


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
