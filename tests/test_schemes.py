"""Schemes and the integrator: closed forms, NumPy, vmap, and no recompilation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcfl
import importlib

integrate_mod = importlib.import_module("jaxcfl.pde._integration")


def _even_checkerboard_problem(dtype=jnp.float32):
    # N = 13, w = 4: M = 10 is even, so the windowed input sum vanishes and the
    # linear model is homogeneous, G = (a beta / 2) C^T C K + alpha K, with
    # C^T C = M^2 w^2 P P^T / w^2 for the kernel-sized checkerboard P.
    prob = jaxcfl.make_problem(jaxcfl.checkerboard(13, dtype=dtype), 4)
    assert float(jnp.abs(prob.window_sum).max()) < 1e-5  # zero up to FFT rounding
    pattern = np.asarray(jaxcfl.checkerboard(4), np.float64) / 4.0  # unit norm
    eig = prob.output_shape[0] ** 2 * 16.0
    return prob, pattern, eig


def test_euler_matches_the_closed_form_per_mode(dtype):
    prob, p, eig = _even_checkerboard_problem(dtype)
    other = np.zeros((4, 4))
    other[0, 0], other[0, 1] = 1 / np.sqrt(2), 1 / np.sqrt(2)  # orthogonal to p
    kernel0 = 2.0 * p + 3.0 * other
    lr, alpha = 1e-3, 300.0
    hyper = jaxcfl.make_hyper(lr, alpha, a=-0.5, beta=1.0, dtype=dtype)
    traj = jaxcfl.integrate(prob, kernel0, hyper, scheme="gd", model="linear", steps=40, record_every=40)
    n = 40
    expected = 2.0 * (1 - lr * (alpha - 0.25 * eig)) ** n * p + 3.0 * (1 - lr * alpha) ** n * other
    rtol = 1e-4 if dtype == jnp.float32 else 1e-11
    np.testing.assert_allclose(traj.state.kernel, expected, rtol=rtol, atol=rtol)


def test_nesterov_matches_the_scalar_recursion(dtype):
    prob, p, eig = _even_checkerboard_problem(dtype)
    dt, mu, alpha = 0.05, 0.9, 300.0
    hyper = jaxcfl.make_hyper(dt, alpha, mu=mu, dtype=dtype)
    traj = jaxcfl.integrate(prob, 2.0 * p, hyper, scheme="nesterov", model="linear", steps=30, record_every=30)
    h = (1 + mu) * dt * dt / 2
    lam = alpha - 0.25 * eig
    prev = cur = 2.0
    for _ in range(30):
        look = cur + mu * (cur - prev)
        prev, cur = cur, look - h * lam * look
    rtol = 1e-4 if dtype == jnp.float32 else 1e-11
    np.testing.assert_allclose(traj.state.kernel, cur * p, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("scheme", ["gd", "nesterov"])
def test_stable_linear_run_converges_to_the_numpy_fixed_point(scheme):
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        img = rng.standard_normal((10, 11))
        prob = jaxcfl.make_problem(img, 3)
        w = 3
        a, beta, alpha = -0.5, 1.0, 50.0
        # Dense operator (c a beta / 2) C^T C + alpha, and forcing (c a / 2) Ibar, from NumPy.
        from numpy.lib.stride_tricks import sliding_window_view

        windows = sliding_window_view(img, (w, w)).reshape(-1, w * w)  # rows: C
        ctc = windows.T @ windows
        ibar = windows.sum(axis=0)
        op = 0.5 * a * beta * ctc + alpha * np.eye(w * w)
        fixed = np.linalg.solve(op, -0.5 * a * ibar).reshape(w, w)
        lo, hi = jaxcfl.pde._theory.windowed_alpha_bounds(img, w, 1e-3, scheme=scheme, a=a, beta=beta)
        assert lo < alpha
        lr = 1e-3 if scheme == "gd" else 0.02
        hyper = jaxcfl.make_hyper(lr, alpha, a=a, beta=beta, dtype=jnp.float64)
        traj = jaxcfl.integrate(prob, np.zeros((w, w)), hyper, scheme=scheme, model="linear", steps=4000, record_every=4000)
        np.testing.assert_allclose(traj.state.kernel, fixed, rtol=1e-8, atol=1e-10)


def test_records_stride_and_remainder():
    prob = jaxcfl.make_problem(jaxcfl.checkerboard(16), 4)
    hyper = jaxcfl.make_hyper(1e-4, 10.0)
    traj = jaxcfl.integrate(prob, jnp.ones((4, 4)), hyper, steps=25, record_every=10)
    np.testing.assert_array_equal(traj.diagnostics.iteration, [0, 10, 20, 25])
    assert int(traj.state.iteration) == 25
    d = traj.diagnostics
    np.testing.assert_allclose(d.kernel_norm[0], 4.0, rtol=1e-6)
    np.testing.assert_allclose(d.kernel_max[0], 1.0)
    assert float(d.update_norm[0]) == 0.0
    # The state continues a run: 25 + 25 steps from the state equals 50 steps.
    again = jaxcfl.integrate(prob, traj.state, hyper, steps=25, record_every=25)
    whole = jaxcfl.integrate(prob, jnp.ones((4, 4)), hyper, steps=50, record_every=50)
    np.testing.assert_array_equal(again.state.kernel, whole.state.kernel)


def test_divergent_run_is_a_result_not_an_exception():
    prob = jaxcfl.make_problem(jaxcfl.checkerboard(16), 4)
    hyper = jaxcfl.make_hyper(1.0, 100.0)  # lr * alpha = 100 >> 2
    traj = jaxcfl.integrate(prob, jnp.ones((4, 4)), hyper, model="nonlinear", steps=200, record_every=20)
    assert bool(traj.diagnostics.finite[0])
    assert not bool(traj.diagnostics.finite[-1])


# Every model and both schemes run by default (each model once, each scheme twice); the scheme and
# the right-hand side are separate code, so the other four pairs only repeat it (-m slow runs them).
_slow = pytest.mark.slow


@pytest.mark.parametrize(
    "model, scheme",
    [("nonlinear", "gd"), ("linear", "nesterov"), ("nonconstant", "gd"), ("activated", "nesterov"),
     pytest.param("nonlinear", "nesterov", marks=_slow), pytest.param("linear", "gd", marks=_slow),
     pytest.param("nonconstant", "nesterov", marks=_slow), pytest.param("activated", "gd", marks=_slow)],
)
def test_vmap_over_configurations_equals_single_runs(model, scheme):
    prob = jaxcfl.make_problem(jaxcfl.checkerboard(24), 5, pool="mean")
    kernel0 = jnp.asarray(0.1 * np.random.default_rng(0).standard_normal((5, 5)), jnp.float32)
    hyper = jaxcfl.make_hyper(jnp.array([1e-3, 5e-3, 1e-2]), jnp.array([1.0, 3.0, 10.0]), beta=jnp.array([1.0, 2.0, 0.5]), k=jnp.array([1.0, 3.0, 1.0]))
    run = lambda h: jaxcfl.integrate(prob, kernel0, h, scheme=scheme, model=model, steps=50, record_every=10)
    batched = jax.vmap(run)(hyper)
    for i in range(3):
        single = run(jax.tree.map(lambda x: x[i], hyper))
        chex.assert_trees_all_close(jax.tree.map(lambda x: x[i], batched), single, rtol=2e-5, atol=1e-6)


def test_changing_hyperparameter_values_does_not_recompile():
    prob = jaxcfl.make_problem(jaxcfl.checkerboard(16), 4)
    kernel0 = jnp.ones((4, 4))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def final_loss(hyper):
        return jaxcfl.integrate(prob, kernel0, hyper, scheme="nesterov", model="nonlinear", steps=5).diagnostics.loss[-1]

    before = integrate_mod._integrate._cache_size()
    for lr, alpha, beta, k, mu in [(1e-3, 1.0, 1.0, 1.0, 0.9), (2e-3, 5.0, 2.0, 3.0, 0.5), (1e-4, 0.0, 0.5, 7.0, 0.0)]:
        final_loss(jaxcfl.make_hyper(lr, alpha, beta=beta, k=k, mu=mu)).block_until_ready()
    # Direct calls with new values reuse one compiled integrator.
    jaxcfl.integrate(prob, kernel0, jaxcfl.make_hyper(1e-3, 1.0), scheme="gd", steps=7)
    n = integrate_mod._integrate._cache_size()
    jaxcfl.integrate(prob, kernel0, jaxcfl.make_hyper(3e-3, 2.0, beta=3.0, k=5.0), scheme="gd", steps=7)
    assert integrate_mod._integrate._cache_size() == n
    assert n <= before + 2


@pytest.mark.parametrize("bad, match", [("rk4", "scheme"), ("", "scheme")])
def test_unknown_scheme_is_rejected(bad, match):
    prob = jaxcfl.make_problem(jaxcfl.checkerboard(8), 2)
    with pytest.raises(ValueError, match=match):
        jaxcfl.integrate(prob, jnp.ones((2, 2)), jaxcfl.make_hyper(1e-3, 1.0), scheme=bad)


def test_bad_integrator_arguments_are_rejected():
    prob = jaxcfl.make_problem(jaxcfl.checkerboard(8), 2)
    hyper = jaxcfl.make_hyper(1e-3, 1.0)
    with pytest.raises(ValueError, match="steps"):
        jaxcfl.integrate(prob, jnp.ones((2, 2)), hyper, steps=0)
    with pytest.raises(ValueError, match="record_every"):
        jaxcfl.integrate(prob, jnp.ones((2, 2)), hyper, steps=3, record_every=0)
    with pytest.raises(ValueError, match="model"):
        jaxcfl.integrate(prob, jnp.ones((2, 2)), hyper, model="cubic")
    with pytest.raises(TypeError, match="hyper"):
        jaxcfl.integrate(prob, jnp.ones((2, 2)), {"lr": 1e-3})
    bad = jaxcfl.Hyper(**{**vars(hyper), "k": jnp.asarray(-1.0)})
    with pytest.raises(ValueError, match=r"\bk\b"):
        jaxcfl.integrate(prob, jnp.ones((2, 2)), bad)


def test_scheme_aliases():
    from jaxcfl.pde._schemes import canonical_scheme

    assert canonical_scheme("euler") == canonical_scheme("forward_euler") == "gd"
    assert canonical_scheme("nesterov") == "nesterov"


@pytest.mark.parametrize("map_batch", [None, 1, 4])
def test_integrate_many_equals_vmap_of_integrate(map_batch):
    prob = jaxcfl.make_problem(jaxcfl.checkerboard(24), 5, pool="mean")
    kernel0 = jnp.asarray(0.1 * np.random.default_rng(0).standard_normal((5, 5)), jnp.float32)
    hyper = jaxcfl.make_hyper(jnp.geomspace(1e-3, 0.1, 6), jnp.linspace(1.0, 30.0, 6), k=jnp.array([1.0, 3.0] * 3))
    many = jaxcfl.integrate_many(prob, kernel0, hyper, model="nonlinear", steps=40, record_every=10, map_batch=map_batch)
    vmapped = jax.vmap(lambda h: jaxcfl.integrate(prob, kernel0, h, model="nonlinear", steps=40, record_every=10))(hyper)
    chex.assert_trees_all_close(many, vmapped, rtol=2e-5, atol=1e-6)


# --- the facts of a scheme or a model, never its name (issue 21) -----------------------------

def test_scheme_and_model_tables():
    from jaxcfl.pde._rhs import MODELS, RIGHT_HAND_SIDES, get_model
    from jaxcfl.pde._schemes import SCHEMES, get_scheme

    for name in SCHEMES:
        assert get_scheme(name).name == name
    assert get_scheme("euler") is get_scheme("gd")
    assert get_scheme("guarded_gd").guarded and not get_scheme("gd").guarded
    assert (get_scheme("gd").dt_power, get_scheme("guarded_gd").dt_power, get_scheme("nesterov").dt_power) == (1, 1, 2)
    assert tuple(RIGHT_HAND_SIDES) == MODELS
    for name in MODELS:
        assert get_model(name).name == name and get_model(name).gradient is RIGHT_HAND_SIDES[name]
    assert [m for m in MODELS if not get_model(m).linearised] == ["nonlinear"]
    assert [m for m in MODELS if get_model(m).paper_bounds] == ["linear"]
    assert [m for m in MODELS if get_model(m).constant_residual] == ["linear"]
    with pytest.raises(ValueError, match="unknown model"):
        get_model("quadratic")


def _name_comparisons(path):
    """``(line, text)`` of every comparison in ``path`` with a scheme or model name (aliases included), or
    of an expression named ``*scheme*``/``*model*`` with a string literal other than a network's name."""
    import ast

    from jaxcfl.experiments.appendix_f import ARCHITECTURES
    from jaxcfl.pde._rhs import MODELS
    from jaxcfl.nn.nets import NETWORKS
    from jaxcfl.pde._schemes import _ALIASES, SCHEMES

    names = set(MODELS) | set(SCHEMES) | set(_ALIASES)
    networks = set(NETWORKS) | set(ARCHITECTURES)  # "model" also names a network in the training experiments

    def literals(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value}
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return set().union(*(literals(e) for e in node.elts)) if node.elts else set()
        return set()

    def named(node):
        if isinstance(node, ast.Subscript):
            key = node.slice
            return named(node.value) or bool(literals(key) and any(("scheme" in k or "model" in k) for k in literals(key)))
        text = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
        return "scheme" in text.lower() or "model" in text.lower()

    source = path.read_text()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        strings = set().union(*(literals(o) for o in operands))
        if strings & names or (any(named(o) for o in operands) and strings - networks):
            found.append((node.lineno, ast.get_source_segment(source, node)))
    return found


def _name_lookups(path):
    """``(line, text)`` of every place in ``path`` that parses a scheme or model name outside the
    parsers (``get_scheme``, ``get_model``, ``canonical_scheme``): a look-up in a name registry, a
    subscript keyed by an expression named ``*scheme*``/``*model*``, a name literal passed as
    ``scheme=``/``model=`` or to a parser."""
    import ast

    from jaxcfl.pde._rhs import MODELS
    from jaxcfl.pde._schemes import _ALIASES, SCHEMES

    names = set(MODELS) | set(SCHEMES) | set(_ALIASES)
    registries = {"_SCHEMES", "_MODELS", "_ALIASES", "RIGHT_HAND_SIDES", "MODELS", "SCHEMES"}
    parsers = {"get_scheme", "get_model", "canonical_scheme", "gradient_fn"}

    def named(node):
        text = ast.unparse(node).lower()
        return isinstance(node, (ast.Name, ast.Attribute, ast.Call)) and ("scheme" in text or "model" in text)

    def is_name(node):
        return isinstance(node, ast.Constant) and node.value in names

    source = path.read_text()
    tree = ast.parse(source)
    allowed = set()
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef) and fn.name in parsers:
            allowed |= {id(n) for n in ast.walk(fn)}
    found = []
    for node in ast.walk(tree):
        if id(node) in allowed:
            continue
        hit = False
        if isinstance(node, ast.Subscript):
            base = node.value.id if isinstance(node.value, ast.Name) else ""
            hit = base in registries or named(node.slice) or is_name(node.slice)
        elif isinstance(node, ast.Call):
            func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            hit = any(kw.arg in ("scheme", "model") and is_name(kw.value) for kw in node.keywords) or (
                func in parsers and any(is_name(a) for a in node.args))
        if hit:
            found.append((node.lineno, ast.get_source_segment(source, node)))
    return found


def _below_the_front_end():
    from pathlib import Path

    src = Path(jaxcfl.__file__).parent
    return src, [p for part in ("pde", "nn", "_core") for p in sorted((src / part).rglob("*.py"))]


def test_no_module_branches_on_a_scheme_or_model_name():
    """``dt_bound(scheme="guarded_gd")`` once gave Nesterov's bound because the theory asked
    ``scheme == "gd"``. A branch takes the fact from :class:`jaxcfl.pde.Scheme` or
    :class:`jaxcfl.pde.Model` (parsed once from the name); names stay at the public boundary."""
    from pathlib import Path

    src = Path(jaxcfl.__file__).parent
    found = {str(p.relative_to(src)): hits for p in sorted(src.rglob("*.py")) if (hits := _name_comparisons(p))}
    assert found == {}


def test_no_module_below_the_front_end_looks_up_a_scheme_or_model_by_name():
    """Below the front end (every module of ``pde/``, ``nn/`` and ``_core/``) a scheme or a model
    is a value: no comparison with its name, no look-up keyed by its name (the parsers
    ``get_scheme``/``get_model`` aside), no name passed down where the value belongs."""
    src, modules = _below_the_front_end()
    assert len(modules) > 30 and {p.parent.name for p in modules} >= {"pde", "nn", "_core", "nets"}
    found = {str(p.relative_to(src)): hits for p in modules if (hits := _name_comparisons(p) + _name_lookups(p))}
    assert found == {}


def test_the_name_scan_sees_what_it_should(tmp_path):
    path = tmp_path / "m.py"
    path.write_text('a = scheme == "gd"\nb = "nonlinear" != m\nc = s["model"] in ("x", "y")\n'
                    'd = setup.model == "linear"\ne = model == "resnet20"\nf = pool == "sum"\n'
                    'g = kind not in ("nesterov",)\nfor scheme in ("gd", "nesterov"):\n    pass\n')
    assert [line for line, _ in _name_comparisons(path)] == [1, 2, 3, 4, 7]
    path.write_text('a = _MATVECS[model]\nb = RIGHT_HAND_SIDES[name]\nc = table[setup.scheme]\n'
                    'd = symbol(img, model="linear")\ne = get_scheme("nesterov")\nf = get_model(m)\n'
                    'g = data["lr"]\nh: Mapping[str, Model] = {}\n'
                    'def get_model(name):\n    return _MODELS[name]\ni = spec(scheme=s)\nj = t["gd"]\n')
    assert [line for line, _ in _name_lookups(path)] == [1, 2, 3, 4, 5, 12]
