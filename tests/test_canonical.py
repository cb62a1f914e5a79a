"""canonical_convs: the same values, every convolution in XLA:CPU's canonical form, inside loops too."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxcfl._core.canonical import _needs_rewrite, canonical_convs, is_canonical

CANONICAL = "b01f_01io->b01f"


def _net(params, x, *, strides=(1, 1), groups=1, dilation=(1, 1), numbers=("NHWC", "HWIO", "NHWC")):
    """Two convolutions and a ReLU: a loss whose Hessian-vector product holds convolutions of every form."""
    h = lax.conv_general_dilated(x, params["a"], strides, "SAME", rhs_dilation=dilation, dimension_numbers=numbers,
                                 feature_group_count=groups)
    h = jax.nn.relu(h)
    h = lax.conv_general_dilated(h, params["b"], (1, 1), ((1, 0), (0, 1)), dimension_numbers=numbers)
    return jnp.mean(h ** 2)


def _setup(groups=1, numbers=("NHWC", "HWIO", "NHWC")):
    ka, kb, kx, kv = jax.random.split(jax.random.key(0), 4)
    params = {"a": jax.random.normal(ka, (3, 3, 4 // groups, 6)), "b": jax.random.normal(kb, (2, 2, 6, 5))}
    x = jax.random.normal(kx, (2, 7, 7, 4))
    if numbers[0] == "NCHW":
        x = jnp.transpose(x, (0, 3, 1, 2))
        params = {k: jnp.transpose(w, (3, 2, 0, 1)) for k, w in params.items()}
    v = jax.tree.map(lambda p: jax.random.normal(kv, p.shape), params)
    return params, x, v


def _hvp(loss):
    def hvp(params, v, x):
        return jax.jvp(jax.grad(lambda p: loss(p, x)), (params,), (v,))[1]
    return hvp


def _labels(compiled_text: str) -> list[str]:
    return re.findall(r"convolution\(.*?dim_labels=([\w>-]+)", compiled_text)


@pytest.mark.parametrize("kwargs", [{}, pytest.param({"strides": (2, 2)}, marks=pytest.mark.slow),
                                    pytest.param({"groups": 2}, marks=pytest.mark.slow),
                                    pytest.param({"dilation": (2, 1)}, marks=pytest.mark.slow),
                                    {"numbers": ("NCHW", "OIHW", "NCHW")}])
def test_the_values_are_the_function_s(kwargs):
    numbers = kwargs.get("numbers", ("NHWC", "HWIO", "NHWC"))
    params, x, v = _setup(kwargs.get("groups", 1), numbers)
    hvp = _hvp(lambda p, x: _net(p, x, **kwargs))
    want = jax.jit(hvp)(params, v, x)
    got = jax.jit(canonical_convs(hvp))(params, v, x)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(w))))


def test_every_convolution_of_the_rewritten_program_is_canonical():
    params, x, v = _setup()
    hvp = _hvp(_net)
    plain = jax.make_jaxpr(hvp)(params, v, x)
    assert _needs_rewrite(plain.jaxpr)  # the derivatives hold other forms: what the rewrite is for
    rewritten = jax.make_jaxpr(canonical_convs(hvp))(params, v, x)
    convs = [e for e in rewritten.jaxpr.eqns if e.primitive is lax.conv_general_dilated_p]
    assert convs and all(is_canonical(e.params["dimension_numbers"], 4) for e in convs)
    assert not _needs_rewrite(rewritten.jaxpr)


def test_inside_a_loop_xla_runs_only_canonical_convolutions():
    params, x, v = _setup()
    hvp = _hvp(_net)

    def power(matvec):
        def run(params, v, x):
            return lax.fori_loop(0, 3, lambda _, u: jax.tree.map(lambda a: a / jnp.max(jnp.abs(a)),
                                                                  matvec(params, u, x)), v)
        return jax.jit(run).lower(params, v, x).compile().as_text()

    assert set(_labels(power(canonical_convs(hvp)))) == {CANONICAL}
    assert set(_labels(power(hvp))) - {CANONICAL}  # without it, XLA keeps other forms inside the loop


def test_a_program_without_other_forms_is_evaluated_unchanged():
    w = jax.random.normal(jax.random.key(1), (6, 6))

    def hvp(p, v):
        return jax.jvp(jax.grad(lambda q: jnp.sum(jnp.tanh(w @ q) ** 2)), (p,), (v,))[1]

    p, v = jnp.linspace(-1.0, 1.0, 6), jnp.ones(6)
    assert not _needs_rewrite(jax.make_jaxpr(hvp)(p, v).jaxpr)
    np.testing.assert_array_equal(jax.jit(canonical_convs(hvp))(p, v), jax.jit(hvp)(p, v))
