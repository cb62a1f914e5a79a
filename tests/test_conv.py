"""jaxcfl.nn.nets.conv_general_dilated: the same numbers as lax's, canonical convolutions in loops."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxcfl.nn.nets import conv_general_dilated as conv

NHWC = ("NHWC", "HWIO", "NHWC")

# (spatial size, kernel, stride, padding): ResNet's 3x3/1, 3x3/2 and 1x1/2 layers, an odd size
# whose last window is cropped, a 5x5 kernel, string paddings.
CASES = [
    (8, 3, 2, ((1, 1), (1, 1))),
]
MORE_CASES = [  # slow: the same code paths as CASES with other numbers
    (8, 3, 1, ((1, 1), (1, 1))),
    (8, 1, 2, ((0, 0), (0, 0))),
    (7, 3, 2, "SAME"),
    (7, 3, 2, ((1, 1), (1, 1))),
    (9, 5, 1, ((2, 2), (2, 2))),
    (6, 3, 1, ((0, 2), (1, 0))),
    (8, 3, 1, "VALID"),
]


def _operands(size, k, cin=3, cout=4, batch=2, dtype=jnp.float32, seed=0):
    kx, kw, kv, ku = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(kx, (batch, size, size, cin), dtype)
    w = jax.random.normal(kw, (k, k, cin, cout), dtype)
    return x, w, jax.random.normal(kv, x.shape, dtype), jax.random.normal(ku, w.shape, dtype)


def _objective(fn, stride, padding):
    return lambda x, w: jnp.sum(jnp.tanh(fn(jnp.tanh(x), w, (stride, stride), padding, dimension_numbers=NHWC)) ** 2)


def _max_err(a, b):
    return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("size,k,stride,padding",
                         CASES + [pytest.param(*case, marks=pytest.mark.slow) for case in MORE_CASES])
def test_values_gradients_and_second_derivatives_match_lax(size, k, stride, padding):
    with jax.enable_x64(True):
        x, w, vx, vw = _operands(size, k, dtype=jnp.float64)
        ours, ref = _objective(conv, stride, padding), _objective(lax.conv_general_dilated, stride, padding)
        # Each derivative as one compiled program (op by op, this test compiled hundreds of small ones).
        assert _max_err(jax.jit(ours)(x, w), jax.jit(ref)(x, w)) == 0.0
        grad_ours, grad_ref = jax.grad(ours, (0, 1)), jax.grad(ref, (0, 1))
        assert _max_err(jax.jit(grad_ours)(x, w), jax.jit(grad_ref)(x, w)) < 1e-12
        # forward-over-reverse (what the Hessian tools use) and reverse-over-reverse
        fr = lambda g: jax.jit(lambda x, w: jax.jvp(g, (x, w), (vx, vw))[1])(x, w)
        assert _max_err(fr(grad_ours), fr(grad_ref)) < 1e-11

        def rr(g):
            return jax.jit(jax.grad(lambda x, w: sum(jnp.vdot(a, b) for a, b in zip(g(x, w), (vx, vw))), (0, 1)))(x, w)

        assert _max_err(rr(grad_ours), rr(grad_ref)) < 1e-11
        # forward mode alone
        fwd = lambda f: jax.jit(lambda x, w: jax.jvp(f, (x, w), (vx, vw))[1])(x, w)
        assert _max_err(fwd(ours), fwd(ref)) < 1e-11


def test_gradients_are_bit_identical_to_lax_in_float32():
    """Outside loops XLA canonicalises lax's gradient convolutions itself; ours are that program."""
    for size, k, stride, padding in CASES[:2]:
        x, w, _, _ = _operands(size, k, cin=8, cout=16, batch=4)
        ours = jax.jit(jax.grad(_objective(conv, stride, padding), (0, 1)))(x, w)
        ref = jax.jit(jax.grad(_objective(lax.conv_general_dilated, stride, padding), (0, 1)))(x, w)
        for a, b in zip(ours, ref):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_vmap_over_kernels_matches_lax():
    x, w, _, _ = _operands(8, 3)
    ws = jnp.stack([w, 2.0 * w, -w])
    f_ours = jax.jit(jax.vmap(jax.grad(_objective(conv, 2, "SAME"), 1), (None, 0)))
    f_ref = jax.jit(jax.vmap(jax.grad(_objective(lax.conv_general_dilated, 2, "SAME"), 1), (None, 0)))
    assert _max_err(f_ours(x, ws), f_ref(x, ws)) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("spatial", [1, 3])
def test_one_and_three_spatial_dimensions(spatial):
    dn = {1: ("NWC", "WIO", "NWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}[spatial]
    kx, kw = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (2,) + (6,) * spatial + (3,))
    w = jax.random.normal(kw, (3,) * spatial + (3, 5))

    def objective(fn):
        return lambda x, w: jnp.sum(fn(x, w, (2,) * spatial, "SAME", dimension_numbers=dn) ** 2)

    assert _max_err(jax.grad(objective(conv), (0, 1))(x, w),
                    jax.grad(objective(lax.conv_general_dilated), (0, 1))(x, w)) < 1e-4


@pytest.mark.parametrize("kwargs", [
    pytest.param({"rhs_dilation": (2, 2)}, marks=pytest.mark.slow),
    pytest.param({"lhs_dilation": (2, 2)}, marks=pytest.mark.slow),
    {"feature_group_count": 3},
    {"dimension_numbers": ("NCHW", "OIHW", "NCHW")},
])
def test_other_convolutions_are_forwarded_to_lax(kwargs):
    kx, kw = jax.random.split(jax.random.key(2))
    x = jax.random.normal(kx, (2, 6, 6, 6))
    groups = kwargs.get("feature_group_count", 1)
    kwargs = dict(kwargs)
    dn = kwargs.pop("dimension_numbers", NHWC)
    w = jax.random.normal(kw, (6, 6, 3, 3) if dn != NHWC else (3, 3, 6 // groups, 6))
    pad = ((1, 1), (1, 1))
    f_ours = lambda x, w: jnp.sum(conv(x, w, (1, 1), pad, dimension_numbers=dn, **kwargs) ** 2)
    f_ref = lambda x, w: jnp.sum(lax.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=dn, **kwargs) ** 2)
    assert _max_err(jax.jit(f_ours)(x, w), jax.jit(f_ref)(x, w)) == 0.0
    assert _max_err(jax.jit(jax.grad(f_ours, (0, 1)))(x, w), jax.jit(jax.grad(f_ref, (0, 1)))(x, w)) == 0.0


def _scanned_sgd_hlo(fn) -> str:
    kx, k1, k2 = jax.random.split(jax.random.key(3), 3)
    params = (jax.random.normal(k1, (3, 3, 3, 8)) * 0.1, jax.random.normal(k2, (3, 3, 8, 8)) * 0.1)
    xs = jax.random.normal(kx, (2, 4, 8, 8, 3))

    def loss(p, x):
        h = jax.nn.relu(fn(x, p[0], (1, 1), "SAME", dimension_numbers=NHWC))
        return jnp.sum(fn(h, p[1], (2, 2), "SAME", dimension_numbers=NHWC) ** 2)

    def step(p, x):
        g = jax.grad(loss)(p, x)
        return jax.tree.map(lambda a, b: a - 0.01 * b, p, g), None

    return jax.jit(lambda p: lax.scan(step, p, xs)[0]).lower(params).compile().as_text()


def test_every_convolution_in_a_scanned_training_step_is_canonical():
    """XLA's CPU fast kernels need b01f_01io->b01f; lax's own gradients inside a while body are not."""
    if jax.default_backend() != "cpu":
        pytest.skip("the layouts checked here are XLA:CPU's")
    labels = re.findall(r"convolution\(.*?dim_labels=([^,\s]+)", _scanned_sgd_hlo(conv))
    assert labels, "no convolution found in the compiled program"
    assert set(labels) == {"b01f_01io->b01f"}, labels


@pytest.mark.slow
def test_lax_gradients_in_a_scan_are_not_canonical_on_this_jaxlib():
    """The upstream behaviour this module works around (jax-ml/jax#12868). If this fails, XLA has
    fixed it: the benchmark benchmarks/scan_step.py will show lax's scanned step as fast too."""
    if jax.default_backend() != "cpu":
        pytest.skip("XLA:CPU only")
    labels = re.findall(r"convolution\(.*?dim_labels=([^,\s]+)", _scanned_sgd_hlo(lax.conv_general_dilated))
    assert set(labels) - {"b01f_01io->b01f"}, labels


def test_stored_is_the_identity_bit_for_bit():
    """``stored`` changes no bit of a value or a derivative, under jit, grad, HVP and vmap."""
    from jaxcfl.nn.nets._conv import stored

    x = jnp.array([[-0.0, 0.0, 1e-40, -3.5], [jnp.inf, -jnp.inf, jnp.nan, 7.0]], jnp.float32)
    bits = lambda a: np.asarray(a).view(np.uint32)
    np.testing.assert_array_equal(bits(jax.jit(stored)(x)), bits(x))
    np.testing.assert_array_equal(bits(jax.jit(jax.vmap(stored))(x)), bits(x))
    y = jnp.array([[0.5, -1.25, 3.0], [2.0, -0.75, 1.5]], jnp.float32)
    f = lambda a: jnp.sum(jnp.sin(a * 3.0) ** 2)
    g = lambda a: jnp.sum(jnp.sin(stored(a) * 3.0) ** 2)
    for t in (jax.grad, lambda h: jax.vmap(jax.grad(h)),
              lambda h: (lambda a: jax.jvp(jax.grad(h), (a,), (jnp.ones_like(a),))[1])):
        np.testing.assert_array_equal(bits(jax.jit(t(g))(y)), bits(jax.jit(t(f))(y)))
    ints = jnp.arange(3)
    assert stored(ints) is ints  # not floating: returned as it is


def _residual_chain_gradient_hlo(blocks: int = 4) -> str:
    ks = jax.random.split(jax.random.key(4), blocks + 1)
    ws = [0.1 * jax.random.normal(k, (3, 3, 8, 8)) for k in ks[:blocks]]
    x = jax.random.normal(ks[-1], (4, 8, 8, 8))

    def loss(ws, x):
        h = x
        for w in ws:  # conv, batch normalisation, the identity shortcut, ReLU: a ResNet stage
            z = conv(h, w, (1, 1), "SAME", dimension_numbers=NHWC)
            z = (z - z.mean((0, 1, 2))) * lax.rsqrt(z.var((0, 1, 2)) + 1e-5)
            h = jax.nn.relu(z + h)
        return jnp.sum(h ** 2)

    return jax.jit(jax.grad(loss)).lower(ws, x).compile().as_text()


def _most_relus_in_a_transpose(hlo: str) -> int:
    """The most ReLUs (``maximum``) that one fused computation holding a transpose evaluates."""
    from _hlo import computations

    return max((sum(" maximum(" in line for line in lines) for lines in computations(hlo).values()
                if any(" transpose(" in line for line in lines)), default=0)


def test_the_weight_gradient_transposes_a_stored_input_not_its_recomputed_producers(monkeypatch):
    """XLA:CPU fuses a convolution input's producers into the transpose its weight gradient
    needs; in a residual stage that recomputes every earlier block's ReLU there. With the input
    stored first (``stored``), no transpose evaluates a ReLU."""
    if jax.default_backend() != "cpu":
        pytest.skip("the fusion checked here is XLA:CPU's")
    from jaxcfl.nn.nets import _conv

    assert _most_relus_in_a_transpose(_residual_chain_gradient_hlo()) == 0
    monkeypatch.setattr(_conv, "stored", lambda a: a)
    assert _most_relus_in_a_transpose(_residual_chain_gradient_hlo()) >= 2  # the check sees the recomputation
