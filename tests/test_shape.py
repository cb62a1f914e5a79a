"""The library's shape: its layers, the operator back-ends as values, one set-up, one integrator, the search."""

import ast
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcfl
from jaxcfl import operators as ops
from jaxcfl.integration import SaveAt, solve
from jaxcfl.schemes import init
from jaxcfl.search import Bracket, edge_brackets, log_bisect, narrow
from jaxcfl.sweeps import SweepSpec

SRC = Path(jaxcfl.__file__).parent

# The two halves of the library and the shared pieces beside them (README, "Layout").
SHARED = {"rounding", "spectral", "search", "classify", "determinism", "statistics", "images", "_folder", "distributed",
          "_validate", "_io", "_results", "_text", "_version", "_cli_types"}
PDE = {"problem", "operators", "model", "schemes", "integration", "theory", "sweeps", "bounds", "heat"}
NETWORK = {"perturb", "guard", "data", "nets", "lockstep", "train", "curvature", "protocol", "examples", "limits"}
FRONT = {"cli", "experiments", "plot"}


def _jaxcfl_imports(path: Path) -> set[str]:
    """The first-level jaxcfl modules that ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "jaxcfl":
            parts = node.module.split(".")
            if len(parts) > 1:
                found.add(parts[1])
            else:  # from jaxcfl import x, y
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("jaxcfl."))
    return found


def _module_files():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        top = rel.parts[0]
        if top in ("__init__", "__main__", "datasets"):
            continue
        yield top, path


def test_every_module_belongs_to_one_group():
    tops = {top for top, _ in _module_files()}
    assert tops <= SHARED | PDE | NETWORK | FRONT, tops - (SHARED | PDE | NETWORK | FRONT)
    assert not (SHARED & PDE or SHARED & NETWORK or PDE & NETWORK)


@pytest.mark.parametrize("top,path", list(_module_files()), ids=lambda x: str(x) if isinstance(x, str) else "")
def test_layers(top, path):
    imported = _jaxcfl_imports(path) - {top}
    if top in SHARED:
        assert imported <= SHARED, f"shared module {path.name} imports {imported - SHARED}"
    if top in PDE:
        assert imported <= SHARED | PDE, f"PDE module {path.name} imports {imported - SHARED - PDE}"
    if top in SHARED | PDE | NETWORK:
        assert not imported & FRONT, f"{path.name} imports the front end {imported & FRONT}"
    if top == "search":  # the generic search knows nothing of what it searches
        assert imported <= {"_validate"}
    if top == "curvature":  # max_stable_lr uses the search without the sweep engine
        assert not imported & {"sweeps", "bounds"}


# --- operators as values ---------------------------------------------------------------

@pytest.fixture(scope="module")
def backends():
    img = np.asarray(jaxcfl.checkerboard(16), np.float64) + np.outer(np.arange(16.0), np.ones(16)) / 8
    with jax.enable_x64(True):
        fft = jaxcfl.make_problem(img, 5, operator="fft")
        sep = jaxcfl.make_problem(img, 5, operator="separable")
        dense = jaxcfl.make_problem(img, 5, operator="dense")
    return img, {"fft": fft, "separable": sep, "dense": dense}


def test_backends_agree_and_report_what_runs(backends):
    img, probs = backends
    rng = np.random.default_rng(1)
    kernel = rng.standard_normal((5, 5))
    u = rng.standard_normal((12, 12))
    with jax.enable_x64(True):
        ref = probs["fft"]
        for name, prob in probs.items():
            assert prob.operator == name == prob.backend.name
            assert prob.kernel_size == 5
            np.testing.assert_allclose(jaxcfl.correlate(prob, kernel), jaxcfl.correlate(ref, kernel), rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(jaxcfl.correlate_adjoint(prob, u), jaxcfl.correlate_adjoint(ref, u), rtol=1e-10, atol=1e-9)
            np.testing.assert_allclose(jaxcfl.normal_operator(prob, kernel), jaxcfl.normal_operator(ref, kernel), rtol=1e-10, atol=1e-8)
        # <C K, u> = <K, C^T u>: the adjoint is the adjoint
        lhs = float(jnp.sum(jaxcfl.correlate(ref, kernel) * u))
        rhs = float(jnp.sum(kernel * jaxcfl.correlate_adjoint(ref, u)))
        assert lhs == pytest.approx(rhs, rel=1e-12)
    assert probs["separable"].rank == 2 and probs["fft"].rank is None and probs["dense"].rank is None


def test_each_backend_says_how_to_batch(backends):
    _, probs = backends
    assert probs["fft"].backend.map_batch(True) == probs["fft"].backend.map_batch(False) == ops.FFT_MAP_BATCH
    assert probs["separable"].backend.map_batch(True) is None  # small products: one wide vmap
    assert probs["separable"].backend.map_batch(False) == ops.FFT_MAP_BATCH  # correlations in groups
    assert probs["dense"].backend.map_batch(True) is None  # one GEMM per batch


def test_backends_are_pytrees_that_jit(backends):
    _, probs = backends
    with jax.enable_x64(True):
        for prob in probs.values():
            leaves, tree = jax.tree_util.tree_flatten(prob)
            assert all(isinstance(x, jax.Array) for x in leaves)
            back = jax.tree_util.tree_unflatten(tree, leaves)
            assert back.operator == prob.operator
            k = jnp.ones((5, 5))
            np.testing.assert_array_equal(jax.jit(jaxcfl.normal_operator)(prob, k), jaxcfl.normal_operator(prob, k))


def test_one_choice_for_make_problem_and_sweep():
    img = np.asarray(jaxcfl.checkerboard(16), np.float32)
    for model in jaxcfl.MODELS:
        res = jaxcfl.sweep(img, 4, 1e-3, 1.0, steps=5, record_points=3, model=model, progress=False)
        assert res.spec.operator == jaxcfl.make_problem(img, 4, model=model).operator


# --- one set-up ------------------------------------------------------------------------------

def test_setup_round_trips_and_validates():
    s = jaxcfl.Setup(model="nonconstant", scheme="forward_euler", pool="mean", beta=np.float32(2.0), momentum=0.5)
    assert s.scheme == "gd" and isinstance(s.beta, float)
    assert jaxcfl.Setup.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert hash(s) == hash(jaxcfl.Setup.from_dict(s.to_dict()))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.beta = 3.0
    for bad, match in [(dict(model="quadratic"), "unknown model"), (dict(scheme="rk4"), "unknown scheme"),
                       (dict(pool="max"), "unknown pool"), (dict(beta=float("nan")), "beta"),
                       (dict(momentum=1.5), "momentum"), (dict(a=[1.0, 2.0]), "a must be a real scalar")]:
        with pytest.raises(ValueError, match=match):
            jaxcfl.Setup(**bad)
    with pytest.raises(ValueError, match="missing"):
        jaxcfl.Setup.from_dict({"model": "linear"})


def test_setup_hyper_matches_make_hyper():
    s = jaxcfl.Setup(beta=3.0, a=-0.25, label=0.0, bias=0.5, momentum=0.8)
    h = s.hyper(np.array([1e-3, 1e-2]), 2.0, k=4.0)
    ref = jaxcfl.make_hyper(np.array([1e-3, 1e-2]), 2.0, beta=3.0, a=-0.25, label=0.0, bias=0.5, k=4.0, mu=0.8)
    jax.tree.map(np.testing.assert_array_equal, h, ref)
    assert h.mu.shape == (2,)


def test_sweep_spec_is_the_manifest():
    img = np.asarray(jaxcfl.checkerboard(8), np.float32)
    res = jaxcfl.sweep(img, 3, [1e-3, 1e-2], [0.5], steps=6, record_points=3, scheme="nesterov", progress=False)
    d = res.to_dict()["spec"]
    assert list(d)[:5] == ["image", "image_shape", "kernel_size", "kernel", "scheme"]
    assert d["scheme"] == "nesterov" and d["lr"] == [1e-3, 1e-2] and d["alpha"] == [0.5]
    again = SweepSpec.from_dict(json.loads(json.dumps(d)))
    assert again == res.spec and again.to_dict() == d


# --- one integrator -----------------------------------------------------------------------

@pytest.mark.parametrize("save,steps", [(SaveAt(4), 10), (SaveAt(5), 10), (SaveAt(3, offset=1, initial=False), 10),
                                        (SaveAt(4, initial=False, final=False), 10), (SaveAt(20), 7)])
def test_saveat_iterations_are_what_solve_records(save, steps):
    prob = jaxcfl.make_problem(jaxcfl.checkerboard(8), 3, operator="fft")
    sol = solve(prob, init(jnp.ones((3, 3))), jaxcfl.make_hyper(1e-3, 1.0), scheme="gd", model="linear", steps=steps,
                save=save)
    np.testing.assert_array_equal(sol.diagnostics.iteration, save.iterations(steps))
    assert int(sol.state.iteration) == steps


def test_integrate_with_a_paired_copy_matches_the_sweep():
    img = np.asarray(jaxcfl.checkerboard(12), np.float32)
    k0 = jax.random.normal(jax.random.key(0), (3, 3))
    steps, stride = 60, 6
    res = jaxcfl.sweep(img, 3, 0.05, 0.5, steps=steps, record_points=steps // stride, compare_k=3.0, kernel=k0,
                       operator="fft", model="nonlinear", progress=False)
    prob = jaxcfl.make_problem(img, 3, operator="fft")
    hyper = jaxcfl.make_hyper(0.05, 0.5)
    traj = jaxcfl.integrate(prob, k0, hyper, model="nonlinear", steps=steps, record_every=stride, compare_k=3.0)
    np.testing.assert_allclose(traj.divergence[1:], res.curves["divergence"][0, 0], rtol=1e-5, atol=1e-9)
    assert traj.divergence[0] == 0
    plain = jaxcfl.integrate(prob, k0, hyper, model="nonlinear", steps=steps, record_every=stride)
    assert plain.divergence is None
    np.testing.assert_array_equal(plain.state.kernel, traj.state.kernel)  # the copy does not disturb the run
    same = jaxcfl.integrate(prob, k0, hyper, model="nonlinear", steps=steps, record_every=stride, compare_k=1.0)
    assert float(jnp.max(same.divergence)) == 0.0  # k = 1 is the unperturbed scheme, bit for bit


# --- the search -----------------------------------------------------------------------------

def test_narrow_keeps_the_edge_next_to_the_ok_side():
    b = Bracket(1.0, 16.0, ok_lo=True)
    pts = np.array([2.0, 4.0, 8.0])
    assert narrow(b, pts, np.array([True, False, True])) == Bracket(2.0, 4.0, True)  # first change
    b = Bracket(1.0, 16.0, ok_lo=False)
    assert narrow(b, pts, np.array([True, False, True])) == Bracket(4.0, 8.0, False)  # last change
    # points that include the ends override the bracket's own verdicts
    assert narrow(Bracket(1.0, 16.0, True), np.array([1.0, 4.0, 16.0]), np.array([True, True, False])).lo == 4.0


def test_edge_brackets():
    grid = np.array([1.0, 2.0, 4.0, 8.0, 16.0])
    lower, upper, findings = edge_brackets(grid, np.array([False, True, True, False, False]))
    assert (lower.lo, lower.hi, lower.ok_lo) == (1.0, 2.0, False) and (upper.lo, upper.hi, upper.ok_lo) == (4.0, 8.0, True)
    assert findings == []
    lower, upper, findings = edge_brackets(grid, np.array([True, False, True, True, True]))
    assert lower is None and upper is None and findings == ["not an interval", "ok at the lower end", "ok at the upper end"]
    assert edge_brackets(grid, np.zeros(5, bool))[:2] == (None, None)


def test_log_bisect_finds_each_transition_in_one_call_per_round():
    calls = []

    def evaluate(x):
        calls.append(x.size)
        return (x > 3.0) & (x < 700.0)

    brackets = [Bracket(1.0, 10.0, ok_lo=False), Bracket(100.0, 1000.0, ok_lo=True)]
    out, rounds, n = log_bisect(evaluate, brackets, candidates=7, rtol=1e-4)
    assert abs(out[0].boundary / 3.0 - 1) < 1e-4 and abs(out[1].boundary / 700.0 - 1) < 1e-4
    assert rounds == len(calls) and n == sum(calls) and calls[0] == 14
    assert brackets[0] == Bracket(1.0, 10.0, ok_lo=False)  # inputs untouched


def test_lazy_modules_are_reachable_from_the_package():
    # The README calls jaxcfl.plot.stability_map(res) without importing jaxcfl.plot first.
    for name in ("plot", "nets", "train"):
        assert getattr(jaxcfl, name).__name__ == f"jaxcfl.{name}"
