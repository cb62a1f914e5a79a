"""Options are checked before any work starts, in the working dtype, on the command line and in Python.

Each case is refused at once: on the command line with exit status 2 and one line naming the flag,
in Python with a ``ValueError`` naming the keyword argument; nothing is compiled, trained or written
(the result folder does not appear, and the refusal takes a fraction of a second). The classes:

* out of range in the working dtype (float32 unless ``--x64``): a value that overflows, or is
  subnormal, or whose ``1/k`` or ``k * lr`` is (the perturbed step computes ``fl(lr k) fl(d / k)``);
* integers too large for the computation (counts, seeds): a clear error, not an ``OverflowError``;
* a value given twice in a list (each value is a run of its own);
* an option the chosen mode ignores (``--safety`` with ``--scheme gd``);
* a combination that can only fail after the work (too few k or seeds, a kernel larger than the image).
"""

from __future__ import annotations

import importlib
import time

import numpy as np
import pytest

import jaxcfl
from jaxcfl import cli
from jaxcfl.experiments import COMMANDS, EXPERIMENTS

HUGE = "100000000000000000000000"  # 1e23: more than any count or seed
SWEEP = ["sweep", "--size", "8", "--kernel-size", "2", "--lr", "1e-3", "--alpha", "1"]
BOUNDS = ["bounds", "--size", "8", "--kernel-size", "2", "--lr", "1e-3"]
SECONDS = 1.0  # a refusal; the cheapest compile or training step takes longer

CLI = [
    # class 1: out of range in the working dtype
    ("sweep compare-k overflows", [*SWEEP, "--compare-k", "1e300"], "--compare-k"),
    ("sweep 1/compare-k subnormal", [*SWEEP, "--compare-k", "1e38"], "--compare-k"),
    ("sweep compare-k subnormal", [*SWEEP, "--compare-k", "1e-39"], "--compare-k"),
    ("sweep compare-k * lr overflows", ["sweep", "--size", "8", "--kernel-size", "2", "--lr", "1e10", "--alpha", "1",
                                        "--compare-k", "1e30"], "--compare-k * lr"),
    ("sweep lr subnormal", ["sweep", "--size", "8", "--kernel-size", "2", "--lr", "1e-50", "--alpha", "1"], "--lr"),
    ("sweep alpha overflows", ["sweep", "--size", "8", "--kernel-size", "2", "--lr", "1e-3", "--alpha", "1e300"],
     "--alpha"),
    ("bounds a overflows", [*BOUNDS, "--a", "1e39"], "--a"),
    ("variance k subnormal", ["variance", "--k", "1", "1e-40"], "--k"),
    ("variance lr overflows", ["variance", "--lr", "1e39"], "--lr"),
    ("fig2 k subnormal", ["reproduce", "fig2", "--k", "1e-39"], "--k"),
    ("fig4 k overflows", ["reproduce", "fig4", "--k", "1e300"], "--k"),
    ("pde-guard 1/k subnormal", ["reproduce", "pde-guard", "--k", "1e38"], "--k"),
    ("theory a overflows", ["theory", "--a", "1e300"], "--a"),
    ("appendix-f alpha overflows", ["reproduce", "appendix-f", "--alphas", "1e39"], "alpha"),
    # class 7: integers too large, a clear error and not an OverflowError
    ("sweep seed huge", [*SWEEP, "--seed", HUGE], "--seed"),
    ("sweep every huge", [*SWEEP, "--scheme", "guarded_gd", "--every", HUGE], "--every"),
    ("sweep warmup huge", [*SWEEP, "--scheme", "guarded_gd", "--warmup", HUGE], "--warmup"),
    ("pde-guard warmup huge", ["reproduce", "pde-guard", "--warmup", HUGE], "--warmup"),
    ("fig4 seed huge", ["reproduce", "fig4", "--seed", HUGE], "--seed"),
    ("fig2 seed 2^32", ["reproduce", "fig2", "--seed", str(2**32)], "--seed"),
    ("variance seeds huge", ["variance", "--seeds", HUGE, "1"], "--seeds"),
    ("open-question every huge", ["reproduce", "open-question", "--every", HUGE], "--every"),
    ("determinism seed huge", ["determinism", "--seed", HUGE], "--seed"),
    ("sensitivity seed huge", ["sensitivity", "--seed", HUGE], "--seed"),
    ("heat steps huge", ["heat", "--steps", HUGE], "--steps"),
    # class 8: a value given twice in a list
    ("variance k twice", ["variance", "--k", "1", "1"], "--k"),
    ("variance seeds twice", ["variance", "--seeds", "1", "1"], "--seeds"),
    ("fig2 n twice", ["reproduce", "fig2", "--n", "2", "2"], "--n"),
    ("fig4 lr twice", ["reproduce", "fig4", "--lr", "0.01", "0.01"], "--lr"),
    ("table5 kernel twice", ["reproduce", "table5", "--kernel-size", "16", "16"], "--kernel-size"),
    ("appendix-f alphas twice", ["reproduce", "appendix-f", "--alphas", "1", "1"], "--alphas"),
    ("bounds kernel twice", ["bounds", "--size", "8", "--kernel-size", "2", "2", "--lr", "1e-3"], "--kernel-size"),
    ("heat dt twice", ["heat", "--dt", "0.4", "0.4"], "--dt"),
    ("theory kernel twice", ["theory", "--kernel-size", "4", "4"], "--kernel-size"),
    # class 8: an option the chosen mode ignores
    ("sweep safety with gd", [*SWEEP, "--safety", "0.5"], "--safety"),
    ("sweep every with nesterov", [*SWEEP, "--scheme", "nesterov", "--every", "5"], "--every"),
    ("sweep momentum with gd", [*SWEEP, "--momentum", "0.5"], "--momentum"),
    ("sweep label with the linear model", [*SWEEP, "--label", "2"], "--label"),
    ("bounds bias with the linear model", [*BOUNDS, "--bias", "1"], "--bias"),
    ("variance beta with relu", ["variance", "--beta", "5"], "--beta"),
    ("fig2 beta with relu", ["reproduce", "fig2", "--activation", "relu", "--beta", "2"], "--beta"),
    ("theory momentum with gd", ["theory", "--scheme", "gd", "--momentum", "0.5"], "--momentum"),
    # class 5: what could only fail after the work
    ("open-question one k", ["reproduce", "open-question", "--k", "1"], "--k"),
    ("pde-guard k 1: a copy against itself", ["reproduce", "pde-guard", "--k", "1"], "--k 1"),
    ("fig2 k 1: a copy against itself", ["reproduce", "fig2", "--k", "1"], "--k 1"),
    ("sweep compare-k 1: a copy against itself", [*SWEEP, "--compare-k", "1"], "--compare-k 1"),
    ("open-question one seed", ["reproduce", "open-question", "--seeds", "3"], "--seeds"),
    ("fig4 kernel larger than the checkerboard", ["reproduce", "fig4", "--size", "16", "--kernel-size", "32"],
     "--kernel-size"),
    ("table5 kernel larger than the checkerboard", ["reproduce", "table5", "--size", "8", "--kernel-size", "16"],
     "--kernel-size"),
    ("determinism one process", ["determinism", "--processes", "1"], "--processes"),
    ("sensitivity one run", ["sensitivity", "--runs", "1"], "--runs"),
    ("open-question safety above 1", ["reproduce", "open-question", "--safety", "1.5"], "--safety"),
]


def _image() -> np.ndarray:
    return np.ones((8, 8))


def _modules():
    return {name: importlib.import_module(module) for name, (module, _) in {**EXPERIMENTS, **COMMANDS}.items()}


API = [
    ("sweep compare_k 1e38", lambda m, out: jaxcfl.sweep(_image(), 2, [1e-3], [1.0], compare_k=1e38, out=out),
     "compare_k"),
    ("sweep compare_k 1e-39", lambda m, out: jaxcfl.sweep(_image(), 2, [1e-3], [1.0], compare_k=1e-39, out=out),
     "compare_k"),
    ("image_sweep compare_k overflows", lambda m, out: m["sweep"].run(_image(), [1e-3], [1.0], kernel_size=2,
                                                                      compare_k=1e300, out=out), "^compare_k"),
    ("image_sweep compare_k * lr", lambda m, out: m["sweep"].run(_image(), [1e10], [1.0], kernel_size=2,
                                                                 compare_k=1e30, out=out), "^compare_k=1e\\+30: compare_k \\* lr"),
    ("image_sweep lr twice", lambda m, out: m["sweep"].run(_image(), [1e-3, 1e-3], [1.0], kernel_size=2, out=out),
     "^lr repeats"),
    ("image_sweep safety with gd", lambda m, out: m["sweep"].run(_image(), [1e-3], [1.0], kernel_size=2, safety=0.5,
                                                                 out=out), "^safety is ignored"),
    ("image_sweep seed huge", lambda m, out: m["sweep"].run(_image(), [1e-3], [1.0], kernel_size=2, seed=2**64,
                                                            out=out), "^seed must be"),
    ("image_bounds alpha_range order", lambda m, out: m["bounds"].run(_image(), [1e-3], kernel_sizes=(2,),
                                                                      alpha_range=(10.0, 1.0), out=out),
     "^alpha_range"),
    ("image_bounds momentum with gd", lambda m, out: m["bounds"].run(_image(), [1e-3], kernel_sizes=(2,), momentum=0.5,
                                                                     out=out), "^momentum is ignored"),
    ("variance k subnormal", lambda m, out: m["variance"].run(ks=(1.0, 1e-40), out=out), "^ks=1e-40"),
    ("variance seeds 2^40", lambda m, out: m["variance"].run(seeds=(2**40,), out=out), "^seeds must be"),
    ("variance beta with relu", lambda m, out: m["variance"].run(beta=5.0, out=out), "^beta is ignored"),
    ("variance ks twice", lambda m, out: m["variance"].run(ks=(1.0, 1.0), out=out), "^ks repeats"),
    ("open_question one k", lambda m, out: m["open-question"].run(ks=(1.0,), out=out), "^ks and seeds"),
    ("open_question safety 0", lambda m, out: m["open-question"].run(safety=0.0, out=out), "^safety"),
    ("fig2 k subnormal", lambda m, out: m["fig2"].run(k=1e-39, out=out), "^k=1e-39"),
    ("fig2 negative seed", lambda m, out: m["fig2"].run(seed=-1, out=out), "^seed must be"),
    ("fig2 n twice", lambda m, out: m["fig2"].run(n=(2, 2), out=out), "^n repeats"),
    ("fig4 k overflows", lambda m, out: m["fig4"].run(k=1e300, out=out), "^k=1e\\+300"),
    ("fig4 k 1", lambda m, out: m["fig4"].run(k=1.0, out=out), "^k 1 is the reference copy"),
    ("fig4 window huge", lambda m, out: m["fig4"].run(window=2**40, out=out), "^window must be"),
    ("pde_guard warmup negative", lambda m, out: m["pde-guard"].run(warmup=-1, out=out), "^warmup must be"),
    ("pde_guard k * map lr", lambda m, out: m["pde-guard"].run(k=1e37, map_lr=(100.0,), out=out), "^k=1e\\+37: k \\* lr"),
    ("table5 kernel twice", lambda m, out: m["table5"].run(kernel_sizes=(8, 8), out=out), "^kernel_sizes repeats"),
    ("appendix_f alpha overflows", lambda m, out: m["appendix-f"].run(alphas=(1e39,), out=out), "^alphas=1e\\+39"),
    ("determinism one process", lambda m, out: m["determinism"].run(processes=1, out=out), "^processes must be"),
    ("sensitivity one run", lambda m, out: m["sensitivity"].run(runs=1, out=out), "^runs must be"),
]


@pytest.fixture(scope="module")
def modules():
    """Every experiment imported, and each command's parser built once, so that a case times its refusal only."""
    for argv in ([*SWEEP, "--help"], ["variance", "--help"], ["reproduce", "fig2", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
    return _modules()


def test_at_least_twenty_five_cases_of_each_side():
    assert len(CLI) >= 25 and len(API) >= 25
    assert len({c[0] for c in CLI}) == len(CLI) and len({c[0] for c in API}) == len(API)


@pytest.mark.parametrize("case, argv, flag", CLI, ids=[c[0] for c in CLI])
def test_cli_refuses_before_any_work(case, argv, flag, modules, tmp_path, capsys):
    out = tmp_path / "never"
    with_out = argv if argv[0] in ("theory", "heat") else [*argv, "--out", str(out)]
    capsys.readouterr()
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        cli.main(with_out)
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2, err
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert flag in err[0], err
    assert not out.exists()
    assert seconds < SECONDS, f"{case}: refused after {seconds:.2f}s"


@pytest.mark.parametrize("case, call, match", API, ids=[c[0] for c in API])
def test_api_refuses_before_any_work(case, call, match, modules, tmp_path):
    out = tmp_path / "never"
    start = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        call(modules, out)
    assert time.perf_counter() - start < SECONDS
    assert not out.exists()


def test_the_check_follows_the_working_dtype():
    """Under x64 (``jaxcfl --x64``, applied before the options are built) float64's range applies."""
    import jax

    from jaxcfl.experiments import fig4

    with pytest.raises(ValueError, match="^k=1e-39 is below the smallest normal number in float32"):
        fig4.Options(k=1e-39)
    with jax.enable_x64(True):
        assert fig4.Options(k=1e-39).k == 1e-39
        with pytest.raises(ValueError, match="float64"):
            fig4.Options(k=1e-320)
