"""jaxcfl.sensitivity: the nondeterminism protocol on a user's own training, from Python and the CLI."""

from __future__ import annotations

import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxcfl
from jaxcfl.cli import main
from jaxcfl.nn._limits import Adam
from jaxcfl.nn._protocol import SOURCES, copies_for, load_training, sensitivity


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(8, 16, rngs=rngs)
        self.norm = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
        self.dropout = nnx.Dropout(0.2, rngs=rngs)
        self.out = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(self.dropout(nnx.relu(self.norm(self.hidden(x)))))


def factory(key):
    return Net(nnx.Rngs(params=key, dropout=jax.random.fold_in(key, 1)))


def _data(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8)).astype(np.float32)
    return x, np.argmax(x[:, :3], axis=1).astype(np.int32)


def jitter(x, key):
    return x + 0.05 * jax.random.normal(key, x.shape, x.dtype)


DATA, TEST = _data(96, 0), _data(48, 1)
SMALL = dict(test=TEST, runs=3, epochs=2, batch_size=16, resamples=200, progress=False)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("sens")
    return out, sensitivity(factory, optax.adamw(1e-2, weight_decay=1e-4), DATA, augment=jitter, out=out,
                            stability=Adam(lr=1e-2), **SMALL)


def test_every_source_is_measured_with_its_statistics(report):
    out, r = report
    assert list(r.sources) == list(SOURCES) and not r.skipped
    for name, s in r.sources.items():
        assert s.runs == 3 and len(s.final_metric) == 3
        assert s.metric_std is not None and s.metric_std.low <= s.metric_std.estimate <= s.metric_std.high
        assert s.churn is not None and 0 <= s.churn.mean <= 1
        assert s.correlation is not None and -1 <= s.correlation.mean <= 1
        assert s.ensemble is not None and s.divergence_curve.shape == (2 * 6,)
        assert (s.verdict is None) == (name == "order")
    # The init seed changes the weights from the first step; a last-bit change starts at rounding size.
    assert r.sources["init"].divergence_curve[0] > 0.1 > r.sources["numerics"].divergence_curve[0]


def test_determinism_checks_and_strict_json_report(report):
    out, r = report
    d = r.determinism
    assert d.repeat_identical and d.first_difference is None and d.powers_identical
    assert "skipped" in d.processes  # objects, not a spec: no fresh process can rebuild them
    payload = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert payload["answer"] == r.answer() and "against order" in payload["answer"]
    assert (out / "report.json").exists() and (out / "report.png").stat().st_size > 0
    assert json.loads((out / "report.json").read_text())["sources"]["numerics"]["runs"] == 3
    c = r.curvature
    assert [rec["epoch"] for rec in c["records"]] == [1, 2] and c["preconditioned"]
    assert all(rec["sharpness"] > 0 and rec["threshold"] == pytest.approx(3800.0) for rec in c["records"])
    assert "Curvature:" in r.answer()


@pytest.mark.slow
def test_a_second_run_reads_the_finished_runs(report):
    out, first = report
    again = sensitivity(factory, optax.adamw(1e-2, weight_decay=1e-4), DATA, augment=jitter, out=out,
                        stability=Adam(lr=1e-2), **SMALL)
    for name in SOURCES:
        assert again.sources[name].final_metric == first.sources[name].final_metric
    assert again.curvature == first.curvature  # the finished epochs' sharpness, read back
    assert again.seconds < first.seconds


def test_pure_functions_with_adam_skip_what_they_do_not_have():
    def init(key):
        return {"w": jax.random.normal(key, (8, 3)) * 0.3, "b": jnp.zeros(3)}

    def apply(p, x):
        return x @ p["w"] + p["b"]

    r = sensitivity((init, apply), optax.adam(1e-2), DATA, sources=None, determinism=False, **SMALL)
    assert set(r.skipped) == {"augmentation", "dropout"} and "numerics" in r.sources
    with pytest.raises(ValueError, match="dropout"):
        sensitivity((init, apply), optax.adam(1e-2), DATA, sources=["dropout"], **SMALL)


def test_copies_differ_in_one_source_only():
    for name in SOURCES:
        c = copies_for(name, 4, seed=7)
        assert c.count == 4
        varying = [f for f in ("k", "init_seed", "init_ulp", "data_seed", "augment_seed", "dropout_seed")
                   if c.varies(f)]
        assert varying == {"numerics": ["k"], "init-bit": ["init_ulp"], "order": ["data_seed"],
                           "init": ["init_seed"], "augmentation": ["augment_seed"],
                           "dropout": ["dropout_seed"]}[name]
        assert c.value("init_seed", 0) == c.value("data_seed", 0) == 7


@pytest.mark.parametrize("kwargs, match", [
    (dict(runs=1), "runs"),
    (dict(sources=["noise"]), "sources"),
    (dict(sources=[]), "sources"),
    (dict(test=(TEST[0][:, :5], TEST[1])), "shape"),
    (dict(test=(TEST[0], TEST[1][:3])), "different numbers"),
    (dict(epochs=0), "epochs"),
    (dict(stability="adam"), "stability"),
])
def test_bad_input_is_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        sensitivity(factory, optax.adam(1e-3), DATA, **{**SMALL, **kwargs})


SPEC = textwrap.dedent('''
    import jax, numpy as np, optax

    def _data(n, seed):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((n, 8)).astype(np.float32)
        return x, np.argmax(x[:, :3], axis=1).astype(np.int32)

    def init(key):
        return {"w": jax.random.normal(key, (8, 3)) * 0.3}

    def apply(p, x):
        return x @ p["w"]

    def training():
        return dict(model=(init, apply), optimizer=optax.adam(1e-2), data=_data(64, 0), test=_data(32, 1),
                    batch_size=16)

    def not_optax():
        return dict(training(), optimizer="adam")

    def wrong():
        return [1, 2]

    def mismatched():
        x, y = _data(32, 1)
        return dict(training(), test=(x[:, :4], y))
''')


def _cli_spec_run(tmp_path, capsys, *extra):
    spec = tmp_path / "mine.py"
    spec.write_text(SPEC)
    out = tmp_path / "out"
    code = main(["sensitivity", f"{spec}:training", "--runs", "2", "--epochs", "1", "--sources", "numerics",
                 "order", "--resamples", "50", "--out", str(out), "--json", *extra])
    assert code == 0 and (out / "report.png").exists()
    payload = json.loads(capsys.readouterr().out)
    assert set(payload["sources"]) == {"numerics", "order"}
    return payload


def test_cli_runs_a_spec_file(tmp_path, capsys):
    assert _cli_spec_run(tmp_path, capsys, "--no-determinism")["determinism"] is None


@pytest.mark.slow
def test_cli_repeats_a_spec_file_in_two_processes(tmp_path, capsys):
    proc = _cli_spec_run(tmp_path, capsys)["determinism"]["processes"]
    assert proc["identical"] and proc["matches_this_process"]


@pytest.mark.parametrize("suffix, match", [
    ("missing.py:training", "no file"),
    ("mine.py:nothing", "no function 'nothing'"),
    ("mine.py:wrong", "must return a dict"),
    ("mine.py:not_optax", "optimizer must be"),
    ("mine.py:mismatched", "shape"),
    ("no_such_module_xyz:training", "no module"),
    ("mine.py", "PATH.py:FUNCTION"),
])
def test_cli_bad_spec_exits_2_with_one_line(tmp_path, capsys, suffix, match):
    (tmp_path / "mine.py").write_text(SPEC)
    spec = suffix if suffix.startswith("no_such") else str(tmp_path / suffix)
    with pytest.raises(SystemExit) as exc:
        main(["sensitivity", spec, "--runs", "2", "--epochs", "1", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err


def test_load_training_accepts_a_dataclass(tmp_path):
    (tmp_path / "dc.py").write_text(SPEC + textwrap.dedent('''
        import dataclasses

        @dataclasses.dataclass
        class Setup:
            model: object
            optimizer: object
            data: object
            test: object = None

        def as_dataclass():
            t = training()
            return Setup(t["model"], t["optimizer"], t["data"], t["test"])
    '''))
    t = load_training(f"{tmp_path / 'dc.py'}:as_dataclass")
    assert t.test is not None and t.batch_size is None
    assert jaxcfl.sensitivity is sensitivity
