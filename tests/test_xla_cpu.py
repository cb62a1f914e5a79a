"""jaxcfl._core.xla_cpu: the training engine's programs run convolutions on XLA's Eigen kernels."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _hlo import computations

from jaxcfl._core import xla_cpu

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's options")


def _convolutions_in_ynn_fusions(hlo: str) -> int:
    """Convolutions inside the computations that YNNPACK fusions call."""
    bodies = computations(hlo)
    called = [name for line in hlo.splitlines() if "__ynn_fusion" in line
              for name in re.findall(r"calls=%([\w.\-]+)", line)]
    return sum(" convolution(" in line for name in called for line in bodies.get(name, []))


def _gradient(jit):
    w = jax.random.normal(jax.random.key(0), (3, 3, 8, 32))
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 8))

    def loss(w, x):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.tanh(y) ** 2)

    fn = jit(jax.grad(loss))
    return fn.lower(w, x).compile().as_text(), np.asarray(fn(w, x))


def test_the_engine_compiles_convolutions_for_eigen_and_gets_the_same_gradient():
    if not xla_cpu.training_compiler_options():
        pytest.skip("this jaxlib has no YNNPACK option")
    ours, g_ours = _gradient(xla_cpu.jit)
    plain, g_plain = _gradient(jax.jit)
    assert _convolutions_in_ynn_fusions(plain) > 0  # the check sees XLA's default
    assert _convolutions_in_ynn_fusions(ours) == 0
    np.testing.assert_allclose(g_ours, g_plain, rtol=1e-4, atol=1e-4)  # another summation order
    # Only convolutions move: a matrix product stays where XLA puts it.
    a = jnp.ones((64, 64))
    dots = [jit(lambda m: m @ m).lower(a).compile().as_text().count("__ynn_fusion") for jit in (jax.jit, xla_cpu.jit)]
    assert dots[1] == dots[0]


@pytest.fixture
def asked_anew():
    """``training_compiler_options`` asked again inside the test, and again after it."""
    xla_cpu.training_compiler_options.cache_clear()
    yield
    xla_cpu.training_compiler_options.cache_clear()


def test_a_users_xla_flags_setting_is_kept(monkeypatch, asked_anew):
    monkeypatch.setenv("XLA_FLAGS", f"--{xla_cpu.YNN_OPTION}=")
    assert xla_cpu.training_compiler_options() == ()
    monkeypatch.undo()
    xla_cpu.training_compiler_options.cache_clear()
    assert xla_cpu.training_compiler_options() == ((xla_cpu.YNN_OPTION, xla_cpu.CONVOLUTIONS_ON_EIGEN),)


def test_an_option_this_jaxlib_refuses_leaves_the_defaults(monkeypatch, asked_anew):
    monkeypatch.setattr(xla_cpu, "CONVOLUTIONS_ON_EIGEN", "NOT_A_FUSION_TYPE")
    assert xla_cpu.training_compiler_options() == ()


def test_the_lockstep_training_step_has_no_convolution_on_ynnpack():
    """The plumbing: :class:`jaxcfl.Lockstep`'s compiled step is built with the options."""
    if not xla_cpu.training_compiler_options():
        pytest.skip("this jaxlib has no YNNPACK option")
    from jaxcfl.nn._preset import TrainConfig, copies_of, engine_of, init_lockstep

    config = TrainConfig(model="cnn", batch_size=4, milestones=(), augment=False)
    engine = engine_of(config, steps_per_epoch=1, in_channels=1, num_classes=10)
    _, state = init_lockstep(config, (1.0,), 1, 10)
    x, y = jnp.zeros((4, 28, 28, 1)), jnp.zeros((4,), jnp.int32)
    hlo = engine.step_function(copies_of(config, (1.0,), 0), state).compile(state, x, y).as_text()
    assert " convolution(" in hlo
    assert _convolutions_in_ynn_fusions(hlo) == 0
