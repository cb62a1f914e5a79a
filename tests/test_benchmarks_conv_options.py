"""The pieces of benchmarks/conv_options.py that are not timings: its alternative convolutions
compute the network's convolution, the graphdef swap keeps the network, and the HLO classifier."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

conv_options = pytest.importorskip("conv_options")

CASES = [  # (N, side, C, O, kernel, stride)
    (2, 8, 3, 4, 3, 1),
    (2, 9, 4, 6, 3, 2),
    (2, 8, 4, 6, 1, 2),
]


def _normal(shape, seed=0):
    # NumPy draws: jax.random compiles its sampler for every new shape (about 0.3 s each).
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _conv_case(case):
    n, side, c, o, k, s = case
    x, w = _normal((n, side, side, c)), _normal((k, k, c, o), seed=1)
    return x, w, (s, s), [(k // 2, k // 2)] * 2


@pytest.mark.parametrize("impl", sorted(conv_options.CONVS))
def test_alternative_convolutions_match_lax(impl):
    # forward on the cases in one compiled program (XLA takes seconds over im2col's slices: two cases for it)
    cases = [_conv_case(case) for case in (CASES[1:] if impl == "im2col" else CASES)]
    operands = [(x, w) for x, w, _, _ in cases]
    forward = lambda f: jax.jit(lambda xw: [f(x, w, s, p) for (x, w), (_, _, s, p) in zip(xw, cases)])(operands)
    for got, want in zip(forward(conv_options.CONVS[impl]), forward(conv_options.conv_lax)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if impl == "im2col":
        return  # its gradient is autodiff of slices, a concatenation and a product; XLA compiles it slowly
    # gradients on the strided 3x3 case
    x, w, s, p = cases[1]
    ct = _normal(forward(conv_options.conv_lax)[1].shape, seed=2)
    grads = jax.jit(lambda f, x, w: jax.vjp(lambda a, b: f(a, b, s, p), x, w)[1](ct), static_argnums=0)
    for got, want in zip(grads(conv_options.CONVS[impl], x, w), grads(conv_options.conv_lax, x, w)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_replace_conv_keeps_the_network():
    from flax import nnx
    from train_step import replace_conv

    from jaxcfl.nn import nets as nets
    # the small network's structure, with random numbers in place of its initialisation (no compile)
    graphdef, params, stats = nets.split(nnx.eval_shape(lambda: nets.create("cnn")))
    rng = np.random.default_rng(0)
    params, stats = (jax.tree.map(lambda a: jnp.asarray(0.5 + 0.1 * rng.standard_normal(a.shape), a.dtype), t)
                     for t in (params, stats))
    swapped = replace_conv(graphdef, params, stats, conv_options.conv_nchw)
    assert swapped != graphdef
    convs = [m for _, m in nnx.iter_modules(nets.merge(swapped, params, stats)) if isinstance(m, nnx.Conv)]
    assert convs and all(m.conv_general_dilated is conv_options.conv_nchw for m in convs)
    x = _normal((4, 16, 16, 3), seed=1)
    apply = jax.jit(lambda g, p, b, x: nets.apply(g, p, b, x, train=True)[0], static_argnums=0)
    want, got = apply(graphdef, params, stats, x), apply(swapped, params, stats, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_thunk_kinds_classifies_a_compiled_module():
    def f(x, w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jax.nn.relu(y), axis=(1, 2)), x.transpose(3, 1, 2, 0) * 2.0

    x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
    kinds = conv_options._thunk_kinds(jax.jit(f).lower(x, w).compile().as_text())
    labels = {k.split(" ")[0] for k in kinds.values()}
    assert "conv" in labels
    assert labels <= {"conv", "dot", "transpose", "concat/slice/pad", "reduce", "elementwise"}
