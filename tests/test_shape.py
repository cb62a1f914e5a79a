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
from jaxcfl.pde import _operators as ops
from jaxcfl.pde._integration import SaveAt, solve
from jaxcfl.pde._schemes import init
from jaxcfl._core.search import Bracket, edge_brackets, log_bisect, narrow
from jaxcfl.pde._sweeps import SweepSpec

SRC = Path(jaxcfl.__file__).parent

# The four groups are folders (docs/architecture.md): the shared core at the bottom, the two
# halves on it, the front end on top. A module's group is the folder it sits in.
CORE, PDE, NN = "_core", "pde", "nn"
FRONT = {"cli", "plot", "experiments", "examples"}
BELOW = {CORE: {CORE}, PDE: {CORE, PDE}, NN: {CORE, NN}}  # what each lower group may import


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The jaxcfl modules ``path`` imports, anywhere in it (inside functions too).

    ``from jaxcfl.pde import _heat`` names the module ``jaxcfl.pde._heat``; ``from jaxcfl
    import sweep`` names the package ``jaxcfl`` itself.
    """
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "jaxcfl":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if _exists(sub) else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "jaxcfl")
    return found


def _exists(module: str) -> bool:
    base = SRC.parent.joinpath(*module.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def _group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "jaxcfl"


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def test_every_module_sits_in_a_group_folder():
    loose = {m for m in MODULES if _group(m) not in {CORE, PDE, NN, "jaxcfl", "_version"} | FRONT}
    assert not loose, f"modules outside the group folders: {sorted(loose)}"
    for group in (CORE, PDE, NN):
        assert (SRC / group / "__init__.py").exists()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_layers(module):
    group = _group(module)
    if group not in BELOW:
        return
    imported = _imports(MODULES[module])
    groups = {_group(m) for m in imported} - {"_version"}
    assert groups <= BELOW[group], f"{module} ({group}) imports {sorted(m for m in imported if _group(m) not in BELOW[group])}"
    if module == "jaxcfl._core.search":  # the generic search knows nothing of what it searches
        assert imported <= {"jaxcfl._core.validate"}


def test_implementation_modules_are_private():
    """Inside pde/, nn/ and nn/nets/ every module is private; the packages say what is public."""
    for group in (PDE, NN, f"{NN}/nets"):
        public = [p.name for p in (SRC / group).glob("*.py") if not p.name.startswith("_")]
        assert not public, f"public implementation modules in {group}/: {public}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The cycles of ``graph`` (Tarjan's strongly connected components of size > 1, or self-loops)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _module_graph() -> dict[str, set[str]]:
    """Imports between modules, package ``__init__`` files left out: they re-export, and a
    module that imports a sibling does not import its package's public face."""
    packages = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    return {m: _imports(p) - packages - {m} for m, p in MODULES.items() if m not in packages}


def test_no_import_cycle():
    assert _cycles(_module_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"a"}}) == [["a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_public_api_is_curated():
    """``dir`` of the package and of each public subpackage is its ``__all__``, and every name
    in ``__all__`` resolves."""
    import jaxcfl.nn
    import jaxcfl.nn.nets
    import jaxcfl.pde

    for package in (jaxcfl, jaxcfl.pde, jaxcfl.nn, jaxcfl.nn.nets):
        assert len(set(package.__all__)) == len(package.__all__), package.__name__
        for name in package.__all__:
            assert getattr(package, name) is not None, (package.__name__, name)
    assert sorted(dir(jaxcfl)) == sorted(jaxcfl.__all__)
    assert sorted(dir(jaxcfl.nn)) == sorted(jaxcfl.nn.__all__)
    generic = {"init", "State", "loss", "gradient", "correlate", "with_dense_operator", "euler_step"}
    assert not generic & set(jaxcfl.__all__)
    assert generic <= set(jaxcfl.pde.__all__)


def test_namespaces_export_what_they_define():
    """Each namespace users reach (``jaxcfl.theory``, ``jaxcfl.statistics``, ...) has an
    ``__all__`` of names it really holds."""
    for name in ("theory", "heat", "statistics", "determinism", "distributed", "spectral", "perturb", "limits",
                 "data", "train"):
        module = getattr(jaxcfl, name)
        assert module.__all__, name
        for attr in module.__all__:
            assert hasattr(module, attr), (name, attr)


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
            np.testing.assert_allclose(jaxcfl.pde.correlate(prob, kernel), jaxcfl.pde.correlate(ref, kernel), rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(jaxcfl.pde.correlate_adjoint(prob, u), jaxcfl.pde.correlate_adjoint(ref, u), rtol=1e-10, atol=1e-9)
            np.testing.assert_allclose(jaxcfl.pde.normal_operator(prob, kernel), jaxcfl.pde.normal_operator(ref, kernel), rtol=1e-10, atol=1e-8)
        # <C K, u> = <K, C^T u>: the adjoint is the adjoint
        lhs = float(jnp.sum(jaxcfl.pde.correlate(ref, kernel) * u))
        rhs = float(jnp.sum(kernel * jaxcfl.pde.correlate_adjoint(ref, u)))
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
            np.testing.assert_array_equal(jax.jit(jaxcfl.pde.normal_operator)(prob, k), jaxcfl.pde.normal_operator(prob, k))


def test_one_choice_for_make_problem_and_sweep():
    img = np.asarray(jaxcfl.checkerboard(16), np.float32)
    for model in jaxcfl.MODELS:
        res = jaxcfl.sweep(img, 4, 1e-3, 1.0, steps=5, record_points=3, model=model, progress=False)
        assert res.spec.operator == jaxcfl.make_problem(img, 4, model=model).operator


# --- one set-up ------------------------------------------------------------------------------

def test_setup_round_trips_and_validates():
    s = jaxcfl.Setup(model="nonconstant", scheme="forward_euler", pool="mean", beta=np.float32(2.0), momentum=0.5)
    assert s.scheme is jaxcfl.pde.get_scheme("gd") and s.to_dict()["scheme"] == "gd" and isinstance(s.beta, float)
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
    for name, module in (("plot", "jaxcfl.plot"), ("nets", "jaxcfl.nn.nets"), ("train", "jaxcfl.nn._preset"),
                         ("nn", "jaxcfl.nn")):
        assert getattr(jaxcfl, name).__name__ == module
