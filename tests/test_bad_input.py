"""Bad input, table-driven: every public function and command answers with one clear message.

Each case names the argument (or flag) the message must mention. API cases must raise
``ValueError`` or ``TypeError`` (never a raw JAX, NumPy or pathlib error); CLI cases must exit
with status 2 and one line on stderr, without a traceback.
"""

import pathlib

import _strict_json as strict_json
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcfl
from jaxcfl.pde import _heat as heat
from jaxcfl.pde import _theory as theory
from jaxcfl.nn import _preset as tr
IMG = np.asarray(jaxcfl.checkerboard(8), np.float32)
K3 = np.ones((3, 3), np.float32)
PROB = jaxcfl.make_problem(IMG, 3)
HYPER = jaxcfl.make_hyper(1e-3, 1.0)


def _sweep(**kw):
    args = dict(image=IMG, kernel_size=3, lr=1e-3, alpha=1.0, steps=20, progress=False)
    args.update(kw)
    return jaxcfl.sweep(**args)


def _bounds(**kw):
    args = dict(image=IMG, kernel_size=3, lr=1e-3, steps=20, progress=False)
    args.update(kw)
    return jaxcfl.empirical_bounds(**args)


API = [
    # make_hyper: values, and values that float64 accepts but float32 cannot hold
    ("hyper lr < 0", lambda: jaxcfl.make_hyper(-1.0, 1.0), "lr"),
    ("hyper lr nan", lambda: jaxcfl.make_hyper(float("nan"), 1.0), "lr"),
    ("hyper lr string", lambda: jaxcfl.make_hyper("fast", 1.0), "lr"),
    ("hyper alpha < 0", lambda: jaxcfl.make_hyper(1e-3, -1.0), "alpha"),
    ("hyper k = 0", lambda: jaxcfl.make_hyper(1e-3, 1.0, k=0.0), "k"),
    ("hyper mu = 1", lambda: jaxcfl.make_hyper(1e-3, 1.0, mu=1.0), "mu"),
    ("hyper beta inf", lambda: jaxcfl.make_hyper(1e-3, 1.0, beta=float("inf")), "beta"),
    ("hyper k subnormal in float32", lambda: jaxcfl.make_hyper(1e-4, 15000.0, k=[1, 1e-60]), "k=1e-60"),
    ("hyper alpha overflows float32", lambda: jaxcfl.make_hyper(1e-4, 1e300), "alpha=1e\\+300"),
    ("hyper lr underflows float32", lambda: jaxcfl.make_hyper(1e-60, 1.0), "lr=1e-60"),
    ("hyper k*lr underflows", lambda: jaxcfl.make_hyper(1e-30, 1.0, k=1e-20), "k \\* lr"),
    ("hyper 1/k overflows", lambda: jaxcfl.make_hyper(1e-3, 1.0, k=1e-39), "k"),
    ("hyper shapes", lambda: jaxcfl.make_hyper(np.full(3, 1e-3), np.ones(4)), "lr \\(3,\\), alpha \\(4,\\)"),
    # make_problem
    ("problem kernel larger than image", lambda: jaxcfl.make_problem(IMG, 9), "kernel_size"),
    ("problem kernel 0", lambda: jaxcfl.make_problem(IMG, 0), "kernel_size"),
    ("problem kernel float", lambda: jaxcfl.make_problem(IMG, 2.5), "kernel_size"),
    ("problem 1-D image", lambda: jaxcfl.make_problem(np.ones(8), 3), "image"),
    ("problem empty image", lambda: jaxcfl.make_problem(np.ones((0, 8)), 1), "image"),
    ("problem nan image", lambda: jaxcfl.make_problem(np.full((8, 8), np.nan), 3), "image"),
    ("problem image overflows float32", lambda: jaxcfl.make_problem(np.full((8, 8), 1e300), 3), "image"),
    ("problem string image", lambda: jaxcfl.make_problem(np.array([["a", "b"], ["c", "d"]]), 1), "image"),
    ("problem complex image", lambda: jaxcfl.make_problem(np.ones((4, 4), complex), 2), "image"),
    ("problem float16 image", lambda: jaxcfl.make_problem(IMG.astype(np.float16), 3), "float16"),
    ("problem bfloat16 image", lambda: jaxcfl.make_problem(jnp.asarray(IMG, jnp.bfloat16), 3), "bfloat16"),
    ("problem unknown pool", lambda: jaxcfl.make_problem(IMG, 3, pool="max"), "pool"),
    ("problem unknown operator", lambda: jaxcfl.make_problem(IMG, 3, operator="gpu"), "operator"),
    ("problem unknown model", lambda: jaxcfl.make_problem(IMG, 3, model="quadratic"), "model"),
    ("problem dense nonlinear", lambda: jaxcfl.make_problem(IMG, 3, operator="dense", model="nonlinear"), "operator='dense'"),
    ("problem separable max_rank", lambda: jaxcfl.make_problem(np.random.default_rng(0).random((8, 8)), 3,
                                                               operator="separable", max_rank=1), "max_rank"),
    # gradient / integrate
    ("gradient unknown model", lambda: jaxcfl.pde.gradient(PROB, K3, HYPER, "quadratic"), "model"),
    ("integrate hyper not Hyper", lambda: jaxcfl.integrate(PROB, K3, dict(lr=1e-3)), "hyper"),
    ("integrate steps 0", lambda: jaxcfl.integrate(PROB, K3, HYPER, steps=0), "steps"),
    ("integrate record_every 0", lambda: jaxcfl.integrate(PROB, K3, HYPER, steps=5, record_every=0), "record_every"),
    ("integrate scheme", lambda: jaxcfl.integrate(PROB, K3, HYPER, scheme="rk4"), "scheme"),
    ("integrate kernel shape", lambda: jaxcfl.integrate(PROB, np.ones((4, 4)), HYPER, steps=5), "kernel"),
    ("integrate compare_k 0", lambda: jaxcfl.integrate(PROB, K3, HYPER, steps=5, compare_k=0.0), "compare_k"),
    ("integrate problem not a Problem", lambda: jaxcfl.integrate("prob", K3, HYPER), "problem"),
    ("integrate kernel a string", lambda: jaxcfl.integrate(PROB, "abc", HYPER), "kernel"),
    ("integrate_many map_batch 0", lambda: jaxcfl.integrate_many(PROB, K3, jaxcfl.make_hyper([1e-3], 1.0), steps=5,
                                                                 map_batch=0), "map_batch"),
    # Setup
    ("setup model", lambda: jaxcfl.Setup(model="quadratic"), "model"),
    ("setup momentum", lambda: jaxcfl.Setup(momentum=1.5), "momentum"),
    ("setup array constant", lambda: jaxcfl.Setup(a=[1.0, 2.0]), "a must be a real scalar"),
    ("setup from a list", lambda: jaxcfl.Setup.from_dict([1, 2]), "mapping"),
    # sweep
    ("sweep lr string", lambda: _sweep(lr="fast"), "lr"),
    ("sweep lr empty", lambda: _sweep(lr=[]), "lr"),
    ("sweep lr 2-D", lambda: _sweep(lr=np.ones((2, 2)) * 1e-3), "lr"),
    ("sweep alpha < 0", lambda: _sweep(alpha=-1.0), "alpha"),
    ("sweep steps 0", lambda: _sweep(steps=0), "steps"),
    ("sweep record_points 2", lambda: _sweep(record_points=2), "record_points"),
    ("sweep chunk_size 0", lambda: _sweep(chunk_size=0), "chunk_size"),
    ("sweep compare_k < 0", lambda: _sweep(compare_k=-1.0), "compare_k"),
    ("sweep momentum", lambda: _sweep(momentum=1.0), "momentum"),
    ("sweep rule string", lambda: _sweep(rule="strict"), "rule"),
    ("sweep kernel shape", lambda: _sweep(kernel=np.ones((4, 4))), "kernel"),
    ("sweep kernel nan", lambda: _sweep(kernel=np.full((3, 3), np.nan)), "kernel"),
    ("sweep out is a file", lambda: _sweep(out=__file__), "out=.*is a file"),
    ("sweep spec from a partial dict", lambda: jaxcfl.pde._sweeps.SweepSpec.from_dict({**jaxcfl.Setup().to_dict()}),
     "missing"),
    # empirical_bounds
    ("bounds several lr", lambda: _bounds(lr=[1e-3, 2e-3]), "lr must be one learning rate"),
    ("bounds alpha_range order", lambda: _bounds(alpha_range=(10.0, 1.0)), "alpha_range"),
    ("bounds alpha_range inf", lambda: _bounds(alpha_range=(1.0, float("inf"))), "alpha_range"),
    ("bounds screen_steps 0", lambda: _bounds(screen_steps=0), "screen_steps"),
    ("bounds too few steps", lambda: _bounds(steps=5), "steps"),
    ("bounds initial_points", lambda: _bounds(initial_points=2), "initial_points"),
    ("bounds rule string", lambda: _bounds(rule="strict"), "rule"),
    # theory
    ("theory a nan", lambda: theory.alpha_bounds(IMG, 1e-4, a=float("nan")), "a"),
    ("theory beta inf", lambda: theory.windowed_alpha_bounds(IMG, 3, 1e-4, beta=float("inf")), "beta"),
    ("theory lr < 0", lambda: theory.stability_limit("gd", -1.0), "lr"),
    ("theory scheme", lambda: theory.step_size("adam", 1e-3), "scheme"),
    ("theory momentum", lambda: theory.step_size("nesterov", 1e-3, momentum=1.0), "momentum"),
    # perturbations and fingerprints
    ("perturb_update k subnormal", lambda: jaxcfl.perturb_update(1e-45), "k"),
    ("perturb_update k overflows", lambda: jaxcfl.perturb_update(1e39), "k"),
    ("perturb_update k < 0", lambda: jaxcfl.perturb_update(-3.0), "k"),
    ("perturbed_sgd k nan", lambda: jaxcfl.perturbed_sgd(0.1, k=float("nan")), "k"),
    ("fingerprint a Path", lambda: jaxcfl.fingerprint({"out": pathlib.Path("x")}), "PosixPath|Path"),
    ("fingerprint an object", lambda: jaxcfl.fingerprint([object()]), "object"),
    # heat
    ("heat dt < 0", lambda: heat.solve(-0.1, 1.0), "dt"),
    ("heat a billion steps", lambda: heat.solve(1e-9, 1.0), "max_steps"),
    ("heat negative time", lambda: heat.snapshots(0.4, (-1.0,)), "times"),
    # training configuration
    ("train model", lambda: tr.TrainConfig(model="resnet7"), "model"),
    ("train dataset", lambda: tr.TrainConfig(dataset="imagenet"), "dataset"),
    ("train epochs 0", lambda: tr.TrainConfig(epochs=0), "epochs"),
    ("train lr < 0", lambda: tr.TrainConfig(lr=-0.1), "lr"),
]


@pytest.mark.parametrize("case,call,match", API, ids=[c[0] for c in API])
def test_api_bad_input_names_the_argument(case, call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def _npy(tmp_path, name, array):
    path = tmp_path / name
    np.save(path, array)
    return str(path)


CLI = [
    ("theory lr", lambda t: ["theory", "--lr", "-1"], "lr"),
    ("theory kernel 0", lambda t: ["theory", "--kernel-size", "0"], "kernel-size"),
    ("theory kernel > image", lambda t: ["theory", "--size", "8", "--kernel-size", "9"], "kernel_size"),
    ("theory scheme", lambda t: ["theory", "--scheme", "adam"], "scheme"),
    ("theory momentum", lambda t: ["theory", "--momentum", "1.5"], "momentum"),
    ("theory missing image", lambda t: ["theory", "--image", str(t / "missing.npy")], "--image"),
    ("theory 1-D image", lambda t: ["theory", "--image", _npy(t, "line.npy", np.ones(8))], "--image"),
    ("theory string image", lambda t: ["theory", "--image", _npy(t, "s.npy", np.array([["a"]]))], "--image"),
    ("theory png image", lambda t: ["theory", "--image", str(_png(t))], "--image"),
    ("heat dt nan", lambda t: ["heat", "--dt", "nan"], "dt"),
    ("heat dt < 0", lambda t: ["heat", "--dt", "-0.4"], "dt"),
    ("heat a billion steps", lambda t: ["heat", "--dt", "1e-9"], "--long"),
    ("unknown command", lambda t: ["sweeep"], "sweeep"),
    ("unknown experiment", lambda t: ["reproduce", "table6"], "table6"),
    ("table5 steps 0", lambda t: ["reproduce", "table5", "--steps", "0"], "steps"),
    ("fig4 k 0", lambda t: ["reproduce", "fig4", "--k", "0"], "k"),
    ("variance missing dataset", lambda t: ["variance", "--dataset", "cifar10", "--data-root", str(t / "none"),
                                            "--epochs", "1", "--out", str(t / "v")], "cifar10"),
    ("variance epochs 0", lambda t: ["variance", "--epochs", "0"], "epochs"),
    # jaxcfl sweep / bounds on a user's image: every message names the flag
    ("sweep lr range without N", lambda t: ["sweep", "--lr", "1e-5:1e-3", "--alpha", "1"], "--lr"),
    ("sweep lr log range from 0", lambda t: ["sweep", "--lr", "0:1e-3:4", "--alpha", "1"], "--lr"),
    ("sweep lr N not whole", lambda t: ["sweep", "--lr", "1e-5:1e-3:2.5", "--alpha", "1"], "--lr"),
    ("sweep alpha < 0", lambda t: ["sweep", "--lr", "1e-3", "--alpha", "-1"], "--alpha"),
    ("sweep alpha not a number", lambda t: ["sweep", "--lr", "1e-3", "--alpha", "1,x"], "--alpha"),
    ("sweep no lr", lambda t: ["sweep", "--alpha", "1"], "--lr"),
    ("sweep scheme", lambda t: ["sweep", "--scheme", "adam", "--lr", "1e-3", "--alpha", "1"], "--scheme"),
    ("sweep record points 2", lambda t: ["sweep", "--record-points", "2", "--lr", "1e-3", "--alpha", "1"], "--record-points"),
    ("sweep kernel > image", lambda t: ["sweep", "--size", "8", "--kernel-size", "9", "--lr", "1e-3", "--alpha", "1"],
     "--kernel-size"),
    ("sweep unreadable png", lambda t: ["sweep", "--image", str(_png(t)), "--lr", "1e-3", "--alpha", "1"], "--image"),
    ("sweep 3-D npy", lambda t: ["sweep", "--image", _npy(t, "cube.npy", np.ones((4, 4, 3))), "--lr", "1e-3",
                                 "--alpha", "1"], "--image"),
    ("sweep size with a file", lambda t: ["sweep", "--image", _npy(t, "ok.npy", np.ones((8, 8))), "--size", "8",
                                          "--lr", "1e-3", "--alpha", "1"], "--size"),
    ("sweep out is a file", lambda t: ["sweep", "--size", "8", "--kernel-size", "2", "--lr", "1e-3", "--alpha", "1",
                                       "--out", __file__], "--out"),
    ("bounds kernel > image", lambda t: ["bounds", "--size", "8", "--kernel-size", "4", "9", "--lr", "1e-3"], "--kernel-size"),
    ("bounds missing image", lambda t: ["bounds", "--image", str(t / "photo.jpg"), "--lr", "1e-3"], "--image"),
    ("bounds alpha range order", lambda t: ["bounds", "--lr", "1e-3", "--alpha-range", "10:1"], "--alpha-range"),
    ("bounds steps < 12", lambda t: ["bounds", "--lr", "1e-3", "--steps", "5"], "--steps"),
    ("bounds momentum 1", lambda t: ["bounds", "--lr", "1e-3", "--momentum", "1"], "momentum"),
]


def _png(tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    return path


@pytest.mark.parametrize("case,argv,match", CLI, ids=[c[0] for c in CLI])
def test_cli_bad_input_is_one_line_and_status_2(case, argv, match, tmp_path, capsys):
    from jaxcfl import cli
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv(tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2
    message = [line for line in err if not line.startswith("[")]  # progress lines may come first
    assert len(message) == 1 and message[0].startswith("jaxcfl"), err
    assert "Traceback" not in "\n".join(err)
    assert pytest.importorskip("re").search(match, message[0]), message[0]


def test_at_least_sixty_cases():
    assert len(API) + len(CLI) >= 60


def test_json_output_is_strict_and_says_where_values_were_not_finite(capsys):
    from jaxcfl import cli
    assert cli.main(["heat", "--dt", "0.8", "--steps", "3000", "--json"]) == 0  # the unstable run overflows
    payload = strict_json.loads(capsys.readouterr().out)
    run = payload["runs"][0]
    assert run["perturbation"][-1] is None and run["measured_growth_factor"] is None
    assert payload["non_finite"]["count"] >= 1 and "/runs/0/perturbation/" in payload["non_finite"]["paths"][-1]
    assert cli.main(["heat", "--dt", "0.8", "--steps", "3000"]) == 0
    assert "n/a (the run reached NaN or inf)" in capsys.readouterr().out
    assert cli.main(["heat", "--dt", "0.4", "--json"]) == 0
    assert "non_finite" not in strict_json.loads(capsys.readouterr().out)


def test_every_json_command_prints_through_the_one_strict_writer():
    """Each command's ``--json`` goes through ``cli._emit`` (strict_payload, ``allow_nan=False``); the
    tests of each command (test_cli, test_fig2, test_fig4, test_appendix_f, test_variance) read what it
    printed with the strict reader of ``tests/_strict_json.py``."""
    import inspect
    import re

    from jaxcfl import cli
    from jaxcfl.experiments import COMMANDS, EXPERIMENTS

    source = inspect.getsource(cli)
    assert len(re.findall(r"json\.dumps?\(", source)) == 1 and "allow_nan=False" in inspect.getsource(cli._emit)
    for module, _ in (*EXPERIMENTS.values(), *COMMANDS.values()):  # experiments return payloads, never print JSON
        text = inspect.getsource(__import__(module, fromlist=["_"]))
        assert not re.search(r"json\.dump\(|print\(json", text), module
