import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import jaxcfl
from jaxcfl.pde import _sweeps as sweep_mod
from jaxcfl.pde import _theory as theory
IMG = np.asarray(jaxcfl.checkerboard(32))
W = 8
LR = 1e-4  # windowed bounds for gd: alpha in (1e4, 2e4)


def _alphas(lo, hi):
    return np.array([0.5 * lo, 0.9 * lo, 1.1 * lo, np.sqrt(lo * hi), 0.9 * hi, 1.1 * hi, 2.0 * hi])


EXPECTED = ["divergent", "divergent", "stable", "stable", "stable", "divergent", "divergent"]


# Nesterov on the dense and separable operators runs with -m slow only: by default Nesterov on them is
# covered by empirical_bounds against the windowed theory (test_bounds: separable, both bounds;
# test_cli's table5: dense and separable, alpha_max), and the operators by the gd cases here.
_NESTEROV = ("nesterov", 0.01)


@pytest.mark.parametrize(
    "operator, scheme, lr",
    [pytest.param("fft", "gd", 1e-4, marks=pytest.mark.slow), ("fft", *_NESTEROV), ("dense", "gd", 1e-4),
     ("separable", "gd", 1e-4),
     pytest.param("dense", *_NESTEROV, marks=pytest.mark.slow),
     pytest.param("separable", *_NESTEROV, marks=pytest.mark.slow)],
)
def test_sweep_statuses_follow_the_windowed_theory(scheme, lr, operator):
    lo, hi = theory.windowed_alpha_bounds(IMG, W, lr, scheme=scheme)
    assert lo < hi
    res = jaxcfl.sweep(IMG, W, lr, _alphas(lo, hi), scheme=scheme, steps=600, operator=operator, progress=False)
    assert res.status.shape == (1, 7)
    assert res.status[0].tolist() == EXPECTED
    assert res.spec.operator == operator
    assert np.all(np.isfinite(res.metrics["final_loss"][0, 2:5]))


def test_grid_shape_metrics_and_curves():
    res = jaxcfl.sweep(IMG, W, [1e-4, 5e-5], [1.2e4, 1.5e4, 3e4], steps=200, record_points=20, progress=False)
    assert res.status.shape == (2, 3)
    for name in sweep_mod.SUMMARY_FIELDS:
        assert res.metrics[name].shape == (2, 3)
    assert res.curves["loss"].shape == (2, 3, 20)
    assert res.record_iterations[-1] == 200
    assert np.all(np.isnan(res.metrics["divergence"]))  # no compare_k
    assert res.counts()["stable"] + res.counts()["divergent"] + res.counts()["restrained"] == 6


def test_divergent_neighbours_do_not_contaminate():
    alphas = np.array([1.5e4, 1e9, 1.5e4, 0.0])
    mixed = jaxcfl.sweep(IMG, W, LR, alphas, steps=300, progress=False, operator="fft")
    # The same run among stable copies of itself: a batch as wide as the mixed one, so the same compiled program.
    alone = jaxcfl.sweep(IMG, W, LR, [1.5e4] * 4, steps=300, progress=False, operator="fft")
    assert mixed.status[0].tolist() == ["stable", "divergent", "stable", "divergent"]
    assert not mixed.metrics["finite"][0, 1]
    np.testing.assert_allclose(mixed.metrics["final_norm"][0, [0, 2]], alone.metrics["final_norm"][0, 0], rtol=1e-5)


def test_divergence_of_a_blown_up_run_is_nan_not_zero():
    res = jaxcfl.sweep(IMG, W, LR, [1.5e4, 1e9], compare_k=3.0, steps=300, progress=False)
    assert res.status[0].tolist() == ["stable", "divergent"]
    assert np.isfinite(res.metrics["divergence"][0, 0]) and np.isnan(res.metrics["divergence"][0, 1])
    assert np.isnan(res.curves["divergence"][0, 1, -1])


def test_compare_k_power_of_two_is_bit_identical_and_odd_k_is_amplified():
    # Figure 4's set-up at a small size: nonlinear model, mean pooling, alpha = 20.
    kwargs = dict(model="nonlinear", pool="mean", steps=1000, progress=False)
    img = np.asarray(jaxcfl.checkerboard(64))
    res2 = jaxcfl.sweep(img, 16, [0.01, 0.09], 20.0, compare_k=2.0, **kwargs)
    assert np.all(res2.metrics["divergence"] == 0.0)
    res3 = jaxcfl.sweep(img, 16, [0.01, 0.09], 20.0, compare_k=3.0, **kwargs)
    assert res3.metrics["divergence"][0, 0] < 1e-6  # stable: the last-bit perturbation dies out
    assert res3.metrics["divergence"][1, 0] > 0.1  # restrained: amplified to order one
    assert res3.status[:, 0].tolist() == ["stable", "restrained"]
    np.testing.assert_array_equal(res2.metrics["final_norm"], res3.metrics["final_norm"])  # the k=1 copy is shared


def test_changing_values_does_not_recompile():
    # 100 steps in batches of 2, as the next test: its sweeps reuse this program.
    jaxcfl.sweep(IMG, W, LR, [1e4, 2e4], steps=100, progress=False, operator="fft")
    size = sweep_mod._run_batch._cache_size()
    jaxcfl.sweep(IMG, W, 2 * LR, [3e4, 5e3], steps=100, progress=False, operator="fft", beta=2.0, a=-0.3)
    assert sweep_mod._run_batch._cache_size() == size


def test_out_dir_persists_resumes_and_refuses_a_different_sweep(tmp_path, monkeypatch):
    alphas = np.geomspace(5e3, 5e4, 6)
    kwargs = dict(steps=100, chunk_size=2, progress=False, operator="fft")
    reference = jaxcfl.sweep(IMG, W, LR, alphas, **kwargs)

    real = sweep_mod._run_batch
    calls = []

    def dying(*args, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(sweep_mod, "_run_batch", dying)
    out = tmp_path / "sweep"
    with pytest.raises(KeyboardInterrupt):
        jaxcfl.sweep(IMG, W, LR, alphas, out=out, **kwargs)
    assert sorted(p.name for p in out.glob("chunk_*.npz")) == ["chunk_00000.npz", "chunk_00001.npz"]
    assert [p.name for p in out.glob(".*")] == [".jaxcfl.lock"]  # the lock file, and no temporary files left behind

    calls.clear()
    monkeypatch.setattr(sweep_mod, "_run_batch", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    resumed = jaxcfl.sweep(IMG, W, LR, alphas, out=out, **kwargs)
    assert len(calls) == 1  # only the missing chunk ran
    np.testing.assert_array_equal(resumed.status, reference.status)
    np.testing.assert_array_equal(resumed.metrics["final_norm"], reference.metrics["final_norm"])
    assert (out / "result.csv").exists() and (out / "result.json").exists()

    with pytest.raises(ValueError, match="different sweep"):
        jaxcfl.sweep(IMG, W, LR, alphas * 2, out=out, **kwargs)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        jaxcfl.sweep(IMG, W, LR, alphas, out=tmp_path / "other", **kwargs)


def test_exports(tmp_path):
    res = jaxcfl.sweep(IMG, W, LR, [5e3, 1.5e4], steps=100, progress=False)
    rows = res.rows()
    assert [r["status"] for r in rows] == res.status.ravel().tolist()
    csv_text = res.to_csv(tmp_path / "r.csv").read_text().splitlines()
    assert csv_text[0].startswith("lr,alpha,status,")
    assert len(csv_text) == 3
    payload = json.loads(res.to_json(tmp_path / "r.json").read_text())
    assert payload["counts"] == res.counts()
    assert payload["spec"]["kernel_size"] == W


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=[], alpha=1.0), "lr"),
        (dict(lr=1e-4, alpha=[]), "alpha"),
        (dict(lr=[1e-4, float("nan")], alpha=1.0), "lr"),
        (dict(lr=1e-4, alpha=[1.0, float("inf")]), "alpha"),
        (dict(lr=-1e-4, alpha=1.0), "lr"),
        (dict(lr=1e-4, alpha=-1.0), "alpha"),
        (dict(lr=1e-4, alpha=1.0, steps=0), "steps"),
        (dict(lr=1e-4, alpha=1.0, scheme="rk4"), "scheme"),
        (dict(lr=1e-4, alpha=1.0, model="quadratic"), "model"),
        (dict(lr=1e-4, alpha=1.0, compare_k=0.0), "compare_k"),
        (dict(lr=1e-4, alpha=1.0, operator="sparse"), "operator"),
        (dict(lr=1e-4, alpha=1.0, model="nonlinear", operator="dense"), "dense"),
        (dict(lr=[[1e-4]], alpha=1.0), "lr"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jaxcfl.sweep(IMG, W, progress=False, **kwargs)


FOUR_DEVICES = textwrap.dedent(
    """
    import json, numpy as np, jax, jaxcfl
    assert len(jax.devices()) == 4, jax.devices()
    out = {}
    for op in ("fft", "separable"):
        res = jaxcfl.sweep(np.asarray(jaxcfl.checkerboard(32)), 8, [1e-4, 5e-5], np.geomspace(5e3, 5e4, 5),
                           steps=200, chunk_size=6, progress=False, operator=op, compare_k=3.0)
        out[op] = dict(status=res.status.tolist(), norm=res.metrics["final_norm"].tolist(),
                       div=res.metrics["divergence"].tolist())
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_four_host_devices_give_the_same_results():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", FOUR_DEVICES], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    for op, sharded in results.items():
        res = jaxcfl.sweep(IMG, W, [1e-4, 5e-5], np.geomspace(5e3, 5e4, 5), steps=200, chunk_size=6, progress=False,
                           operator=op, compare_k=3.0)
        assert sharded["status"] == res.status.tolist()
        np.testing.assert_allclose(np.array(sharded["norm"], float), res.metrics["final_norm"], rtol=1e-5)
        # Divergences of stable runs are rounding noise (1e-6 and below). With matrix products their
        # last bits depend on how the GEMM blocks a batch, which changes with the per-device batch.
        atol = 1e-7 if op == "fft" else 5e-6
        np.testing.assert_allclose(np.array(sharded["div"], float), res.metrics["divergence"], rtol=1e-4, atol=atol)


def test_a_setup_is_the_primary_way_and_keywords_still_work(tmp_path):
    """``sweep(setup=Setup(...))`` is the keyword form's sweep: same runs, same manifest, so a folder
    written by either resumes under the other. Both at once is refused, naming the keywords."""
    setup = jaxcfl.Setup(scheme="nesterov", momentum=0.8, beta=2.0)
    kw = dict(steps=30, record_points=10, progress=False)
    by_keywords = jaxcfl.sweep(IMG, W, 1e-3, [1e3, 1e4], scheme="nesterov", momentum=0.8, beta=2.0, out=tmp_path / "s", **kw)
    by_setup = jaxcfl.sweep(IMG, W, 1e-3, [1e3, 1e4], setup=setup, out=tmp_path / "s", **kw)  # resumes: all on disk
    assert by_setup.spec == by_keywords.spec and by_setup.spec.setup == setup
    np.testing.assert_array_equal(by_setup.metrics["final_norm"], by_keywords.metrics["final_norm"])
    with pytest.raises(TypeError, match="not both.*scheme, beta"):
        jaxcfl.sweep(IMG, W, 1e-3, 1e3, setup=setup, scheme="gd", beta=1.0, **kw)
    with pytest.raises(TypeError, match="setup must be a jaxcfl.Setup"):
        jaxcfl.sweep(IMG, W, 1e-3, 1e3, setup=setup.to_dict(), **kw)
    # The defaults of the keywords are Setup's (the one place they are declared).
    assert jaxcfl.sweep(IMG, W, 1e-3, 1e3, **kw).spec.setup == jaxcfl.Setup()
