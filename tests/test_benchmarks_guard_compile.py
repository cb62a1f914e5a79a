"""benchmarks/guard_compile.py measures what a guarded run compiles: its ``loop`` variant is the
engine's estimate program and plain step, and a refresh it times gives the engine's bits."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

guard_compile = pytest.importorskip("guard_compile")

from jaxcfl.nn._preset import TrainConfig, copies_of, engine_of  # noqa: E402


@pytest.mark.slow
def test_the_loop_variant_compiles_the_estimate_and_the_plain_step():
    times, programs, arguments = guard_compile.compile_variant("cnn", 1, "loop", 8)
    assert times["compile_s"]["refresh"] == 0.0 and times["compile_s"]["first"] > 0
    assert times["compile_s"]["total"] == pytest.approx(times["compile_s"]["first"] + times["compile_s"]["plain"])
    state, metrics = programs["first"](*arguments["first"])
    lam = np.asarray(metrics["guard_lambda"])
    assert np.all(np.isfinite(lam)) and np.all(lam > 0)  # the estimate ran before the step
    # the step with the estimate inside (the engine before 2026-12-08) gives the same step, bit for bit
    x, y, classes = guard_compile.batch_for("cnn", 8)
    config = TrainConfig(model="cnn", batch_size=8, guard=True, milestones=(), augment=False)
    engine = engine_of(config, steps_per_epoch=1, in_channels=x.shape[-1], num_classes=classes)
    fn, args = guard_compile._fused_step(engine, copies_of(config, (1.0,), 0), arguments["first"][0],
                                         jnp.asarray(x), jnp.asarray(y))
    for a, b in zip(jax.tree.leaves((state, metrics)), jax.tree.leaves(fn(*args))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
