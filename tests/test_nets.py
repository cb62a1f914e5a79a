"""Tests of jaxcfl.nn.nets: CIFAR ResNets, VGG-BN and the functional split/apply.

Speed: with the default threefry keys, building a model compiles one random
kernel per distinct weight shape (tens of seconds for ResNet-20 on a busy
2-core CPU). The tests therefore initialise with ``rbg`` keys (XLA's
RngBitGenerator, cheap to compile), share built models (cloned by tests that
change them), use one input shape for eager calls, and build VGGs abstractly
(``nnx.eval_shape``) where only their structure is checked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcfl.nn import nets as nets
from jaxcfl.nn.nets import functional
from jaxcfl.nn.nets._layers import Activation, MaxPool, as_rngs

RESNET_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}
VGG_CONVS = {"vgg11": 8, "vgg13": 10, "vgg16": 13, "vgg19": 16}

# Trainable parameters measured with option-B shortcuts, conv layers without bias.
PARAM_COUNTS = {
    "resnet20": 272_474,
    "resnet32": 466_906,
    "resnet44": 661_338,
    "resnet56": 855_770,
    "resnet110": 1_730_714,
    "vgg11": 9_228_362,
    "vgg13": 9_413_066,
    "vgg16": 14_724_042,
    "vgg19": 20_035_018,
}
# Exact counts of the same networks with option-A (parameter-free) shortcuts, as in
# He et al. (2016) and the common PyTorch reproduction; the paper's Table 6 rounds
# them to 0.27M, 0.46M, 0.66M, 0.85M and 1.7M.
OPTION_A_COUNTS = {
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet44": 658_586,
    "resnet56": 853_018,
    "resnet110": 1_727_962,
}
PAPER_COUNTS = {"resnet20": 0.27e6, "resnet32": 0.46e6, "resnet44": 0.66e6, "resnet56": 0.85e6, "resnet110": 1.7e6}


X_SHAPE = (2, 32, 32, 3)  # every eager call on 32x32 inputs uses this shape (compile reuse)


def _rngs(seed: int = 0) -> nnx.Rngs:
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def _create(name: str, seed: int = 0, **kwargs):
    return nets.create(name, rngs=_rngs(seed), **kwargs)


@functools.cache
def _built(name: str, in_channels: int = 3, activation: str = "relu", beta: float = 1.0, seed: int = 0):
    """A model shared by the tests; clone it (``nnx.clone``) before changing it."""
    return _create(name, seed, in_channels=in_channels, activation=activation, beta=beta)


@pytest.fixture(scope="module", autouse=True)
def _free_models():
    yield
    _built.cache_clear()


def _x(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _modules(model, cls):
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, cls)]


def _leaves(tree):
    return jax.tree.leaves(tree)


# --------------------------------------------------------------------------- registry


def test_networks_tuple():
    assert nets.NETWORKS == tuple(RESNET_DEPTHS) + tuple(VGG_CONVS) + ("cnn", "cnn_avg")
    assert isinstance(nets.NETWORKS, tuple)
    assert not hasattr(nets, "MODELS")  # jaxcfl.MODELS alone means the PDE's right-hand sides


@pytest.mark.parametrize("name", ["resnet20", "vgg11"])
@pytest.mark.parametrize("hw, channels", [pytest.param(32, 3, marks=pytest.mark.slow), (28, 1)])
def test_forward_eval_shape_and_finite(name, hw, channels):
    model = nnx.clone(_built(name, in_channels=channels))
    model.eval()
    logits = nnx.jit(lambda m, x: m(x))(model, _x((2, hw, hw, channels)))  # one program, not one per op
    assert logits.shape == (2, 10)
    assert np.all(np.isfinite(np.asarray(logits)))


def test_num_classes():
    abstract = nnx.eval_shape(lambda: nets.create("vgg11", num_classes=7, in_channels=1))
    graphdef, params, stats = functional.split(abstract)
    assert params["fc"]["kernel"].shape == (512, 7)
    x = jax.ShapeDtypeStruct((5, 28, 28, 1), jnp.float32)
    logits, _ = jax.eval_shape(functools.partial(functional.apply, train=True), graphdef, params, stats, x)
    assert logits.shape == (5, 7)


def test_seeds():
    a, b, c = _create("resnet20", 3), _create("resnet20", 3), _create("resnet20", 4)
    assert all(np.array_equal(u, v) for u, v in zip(_leaves(nnx.state(a)), _leaves(nnx.state(b))))
    assert not np.array_equal(a.stem_conv.kernel[...], c.stem_conv.kernel[...])


def test_rngs_argument():
    key = lambda r: np.asarray(jax.random.key_data(r.params.key[...]))  # noqa: E731
    assert np.array_equal(key(as_rngs(None)), key(nnx.Rngs(0)))  # a fresh Rngs(0) per call
    assert np.array_equal(key(as_rngs(5)), key(nnx.Rngs(5)))
    r = _rngs(1)
    assert as_rngs(r) is r


# --------------------------------------------------------------------------- structure


@pytest.mark.parametrize("name", list(RESNET_DEPTHS))
def test_resnet_depth_and_shape(name):
    depth = RESNET_DEPTHS[name]
    model = _create(name)
    _check_param_count(name, model)
    n = (depth - 2) // 6
    convs = _modules(model, nnx.Conv)
    main = [c for c in convs if c.kernel_size == (3, 3)]
    shortcut = [c for c in convs if c.kernel_size == (1, 1)]
    linears = _modules(model, nnx.Linear)
    assert len(main) + len(linears) == depth == 6 * n + 2
    assert len(shortcut) == 2  # option B, at the two downsampling blocks
    assert len(linears) == 1
    assert len(model.blocks) == 3 * n
    assert len(_modules(model, nnx.BatchNorm)) == 1 + 2 * 3 * n + 2
    widths = [b.conv2.out_features for b in model.blocks]
    assert widths == [16] * n + [32] * n + [64] * n
    strides = [b.conv1.strides for b in model.blocks]
    assert strides[n] == strides[2 * n] == (2, 2)
    assert sum(s == (2, 2) for s in strides) == 2
    assert [b.shortcut is not None for b in model.blocks].count(True) == 2
    assert model.blocks[n].shortcut.conv.strides == (2, 2)


@pytest.mark.parametrize("name", list(VGG_CONVS))
def test_vgg_depth(name):
    model = nnx.eval_shape(lambda: nets.create(name))  # abstract: structure only, no init cost
    _check_param_count(name, model)
    convs = _modules(model, nnx.Conv)
    assert len(convs) == VGG_CONVS[name]
    assert all(c.kernel_size == (3, 3) and c.use_bias is False for c in convs)
    assert len(_modules(model, MaxPool)) == 5
    assert len(_modules(model, nnx.BatchNorm)) == VGG_CONVS[name]
    (fc,) = _modules(model, nnx.Linear)
    assert fc.kernel.shape == (512, 10)
    assert len(convs) + 3 == int(name[3:])  # the original's 3 FC layers


def _check_param_count(name, model):
    count = nets.count_params(model)
    assert count == PARAM_COUNTS[name]
    _, params, _ = functional.split(model)
    assert nets.count_params(params) == count
    if name in OPTION_A_COUNTS:
        # option B adds (16*32 + 2*32) + (32*64 + 2*64) = 2752 parameters
        assert count - OPTION_A_COUNTS[name] == 2752
        assert count == pytest.approx(PAPER_COUNTS[name], rel=0.03)


def test_batch_stats_not_counted():
    model = _built("resnet20")
    stats = nnx.state(model, nnx.BatchStat)
    assert sum(np.size(v) for v in _leaves(stats)) > 0
    assert nets.count_params(model) == sum(np.size(v) for v in _leaves(nnx.state(model, nnx.Param)))


def test_only_params_and_batch_stats():
    model = _built("resnet20")
    _, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    assert _leaves(rest) == []


def test_initialisation():
    model = _built("vgg11")
    k = np.asarray(model.features[-2].conv.kernel[...])  # 3x3x512x512
    fan_out = 3 * 3 * 512
    assert k.std() == pytest.approx(np.sqrt(2.0 / fan_out), rel=0.02)
    bn = model.features[0].bn
    assert np.all(np.asarray(bn.scale[...]) == 1) and np.all(np.asarray(bn.bias[...]) == 0)
    assert np.all(np.asarray(bn.mean[...]) == 0) and np.all(np.asarray(bn.var[...]) == 1)
    assert bn.momentum == 0.9 and bn.epsilon == 1e-5
    fc = np.asarray(model.fc.kernel[...])
    assert np.abs(fc).max() <= 1 / np.sqrt(512)
    assert np.all(np.asarray(model.fc.bias[...]) == 0)


def test_maxpool_same_padding_sizes():
    pool = MaxPool()
    sizes = [28]
    x = jnp.arange(28 * 28, dtype=jnp.float32).reshape(1, 28, 28, 1)
    for _ in range(5):
        x = pool(x)
        sizes.append(x.shape[1])
    assert sizes == [28, 14, 7, 4, 2, 1]
    assert float(x[0, 0, 0, 0]) == 28 * 28 - 1  # padding never wins the max
    y = pool(-jnp.ones((1, 1, 1, 2)))  # a 1x1 map stays 1x1, negatives kept
    assert y.shape == (1, 1, 1, 2) and np.all(np.asarray(y) == -1)


def _lax_pool(x):
    """The reference: lax.reduce_window through flax, its derivative select_and_scatter_add."""
    return nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="SAME")


@pytest.mark.parametrize("shape", [pytest.param((3, 8, 8, 4), marks=pytest.mark.slow), (2, 7, 7, 3),
                                   pytest.param((2, 5, 6, 2), marks=pytest.mark.slow), (1, 1, 1, 2)])
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_has_the_bits_of_reduce_window(shape, ties):
    """Values and gradients (reverse mode, what training uses) bit for bit, ties included: the
    cotangent goes to the first maximal entry of each window, as select_and_scatter_add sends it."""
    from jaxcfl.nn.nets._layers import max_pool_2x2

    x = jax.random.normal(jax.random.key(1), shape)
    if ties:  # many ties: quantised, and half of them ReLU's zeros
        x = jax.nn.relu(jnp.round(2 * x) / 2)
    out = jax.jit(max_pool_2x2)(x)
    np.testing.assert_array_equal(out, jax.jit(_lax_pool)(x))
    cot = jax.random.normal(jax.random.key(2), out.shape)
    grad = lambda f: jax.jit(lambda x: jax.vjp(f, x)[1](cot)[0])(x)
    np.testing.assert_array_equal(grad(max_pool_2x2), grad(_lax_pool))
    if not ties:  # forward mode too (on ties lax's forward mode takes another entry than its reverse mode)
        t = jax.random.normal(jax.random.key(3), shape)
        jvp = lambda f: jax.jit(lambda x, t: jax.jvp(f, (x,), (t,))[1])(x, t)
        np.testing.assert_array_equal(jvp(max_pool_2x2), jvp(_lax_pool))


def test_max_pool_under_vmap_and_second_order():
    from jaxcfl.nn.nets._layers import max_pool_2x2

    x = jax.random.normal(jax.random.key(4), (3, 2, 6, 6, 2))
    np.testing.assert_array_equal(jax.jit(jax.vmap(max_pool_2x2))(x), jax.jit(jax.vmap(_lax_pool))(x))
    loss = lambda pool: (lambda x: jnp.sum(jnp.tanh(pool(x)) ** 2))
    v = jax.random.normal(jax.random.key(5), x.shape[1:])
    hvp = lambda pool: jax.jit(lambda x, v: jax.jvp(jax.grad(loss(pool)), (x,), (v,))[1])(x[0], v)
    np.testing.assert_allclose(hvp(max_pool_2x2), hvp(_lax_pool), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- activations


def test_activation_formulas():
    x = jnp.linspace(-3.0, 3.0, 13)
    np.testing.assert_allclose(Activation("relu")(x), np.maximum(np.asarray(x), 0))
    np.testing.assert_allclose(
        Activation("swish", 5.0)(x), np.asarray(x) / (1 + np.exp(-5.0 * np.asarray(x))), rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(Activation("swish", 1e4)(x), np.maximum(np.asarray(x), 0), atol=1e-6)


def test_swish_and_relu_differ():
    relu = nnx.clone(_built("resnet20"))
    swish = nnx.clone(_built("resnet20", activation="swish", beta=5.0))
    # same seed -> same weights; only the activation differs
    assert np.array_equal(relu.fc.kernel[...], swish.fc.kernel[...])
    assert {a.kind for a in _modules(swish, Activation)} == {"swish"}
    assert {a.beta for a in _modules(swish, Activation)} == {5.0}
    relu.eval()
    swish.eval()
    x = _x(X_SHAPE)
    a, b = np.asarray(relu(x)), np.asarray(swish(x))
    assert np.all(np.isfinite(b))
    assert not np.allclose(a, b)


# --------------------------------------------------------------------------- BatchNorm modes


def test_batchnorm_train_vs_eval():
    model = nnx.clone(_built("resnet20"))
    x = _x(X_SHAPE)
    x_other = x.at[1].set(_x((32, 32, 3), seed=1))  # same first image, different partner

    model.eval()
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    e1, e2 = model(x), model(x_other)
    np.testing.assert_allclose(e1[0], e2[0], rtol=1e-5, atol=1e-6)  # per-sample in eval
    after_eval = nnx.state(model, nnx.BatchStat)
    assert all(np.array_equal(u, v) for u, v in zip(_leaves(before), _leaves(after_eval)))

    model.train()
    assert all(bn.use_running_average is False for bn in _modules(model, nnx.BatchNorm))
    stem_out = model.stem_conv(x)
    t1 = model(x)
    # batch statistics: the first sample's logits depend on its batch partner
    t2 = nnx.clone(model)(x_other)
    assert not np.allclose(t1[0], t2[0], atol=1e-4)
    # running averages updated: 0.9 * old + 0.1 * batch (old mean 0, old var 1)
    np.testing.assert_allclose(model.stem_bn.mean[...], 0.1 * stem_out.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        model.stem_bn.var[...], 0.9 + 0.1 * stem_out.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6
    )


# --------------------------------------------------------------------------- functional


@pytest.fixture(scope="module")
def pieces():
    return functional.split(_built("resnet20"))


def _snapshot(*trees):
    return [np.array(v) for t in trees for v in _leaves(t)]


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(u, v) for u, v in zip(a, b))


def test_split_returns_param_and_batchstat_states(pieces):
    graphdef, params, stats = pieces
    assert isinstance(graphdef, nnx.GraphDef)
    assert _leaves(graphdef) == []  # static: safe to close over or pass to jit
    assert isinstance(params, nnx.State) and isinstance(stats, nnx.State)
    for v in jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, nnx.Variable)):
        assert isinstance(v, nnx.Param)
    for v in jax.tree.leaves(stats, is_leaf=lambda v: isinstance(v, nnx.Variable)):
        assert isinstance(v, nnx.BatchStat)
    # the same graphdef for every seed
    assert functional.split(_create("resnet20", 1))[0] == graphdef


def test_apply_is_pure_and_matches_module(pieces):
    graphdef, params, stats = pieces
    model = _built("resnet20")
    before = _snapshot(params, stats, nnx.state(model))
    x = _x(X_SHAPE)

    logits, new_stats = functional.apply(graphdef, params, stats, x, train=True)
    assert _same(before, _snapshot(params, stats, nnx.state(model)))  # nothing mutated
    assert logits.shape == (2, 10)
    changed = [not np.array_equal(u, v) for u, v in zip(_leaves(stats), _leaves(new_stats))]
    assert all(changed)  # every running mean / var moved

    ref = nnx.clone(model)
    ref.train()
    np.testing.assert_allclose(logits, ref(x), rtol=1e-5, atol=1e-5)
    for u, v in zip(_leaves(new_stats), _leaves(nnx.state(ref, nnx.BatchStat))):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)

    e_logits, e_stats = functional.apply(graphdef, params, new_stats, x, train=False)
    assert _same(_snapshot(e_stats), _snapshot(new_stats))  # eval: stats unchanged
    ref.eval()
    np.testing.assert_allclose(e_logits, ref(x), rtol=1e-5, atol=1e-5)
    assert ref.stem_bn.use_running_average is True


def test_apply_jit_vmap(pieces):
    graphdef, params0, stats0 = pieces
    _, params1, stats1 = functional.split(_create("resnet20", 1))
    _, stats1 = functional.apply(graphdef, params1, stats1, _x(X_SHAPE, seed=5), train=True)
    xs = jnp.stack([_x(X_SHAPE, seed=2), _x(X_SHAPE, seed=3)])

    params = functional.stack([params0, params1])
    stats = functional.stack([stats0, stats1])
    assert nets.count_params(params) == 2 * PARAM_COUNTS["resnet20"]
    batched = jax.jit(jax.vmap(functools.partial(functional.apply, train=True), in_axes=(None, 0, 0, 0)))
    logits, new = batched(graphdef, params, stats, xs)
    assert logits.shape == (2, 2, 10)
    for i, (p, s) in enumerate([(params0, stats0), (params1, stats1)]):
        ref_logits, ref_stats = functional.apply(graphdef, p, s, xs[i], train=True)  # eager, unbatched
        np.testing.assert_allclose(logits[i], ref_logits, rtol=1e-4, atol=1e-5)
        for u, v in zip(_leaves(new), _leaves(ref_stats)):
            np.testing.assert_allclose(u[i], v, rtol=1e-4, atol=1e-6)


def test_apply_grad(pieces):
    graphdef, params, stats = pieces
    x = _x(X_SHAPE, seed=4)
    labels = jnp.array([1, 7])

    def xent(logits):
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), labels])

    def loss(p, s):
        logits, new_stats = functional.apply(graphdef, p, s, x, train=True)
        return xent(logits), new_stats

    before = _snapshot(params, stats)
    grads, new_stats = jax.jit(jax.grad(loss, has_aux=True))(params, stats)
    assert _same(before, _snapshot(params, stats))
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert jax.tree.structure(new_stats) == jax.tree.structure(stats)
    g = [np.asarray(v, np.float64) for v in _leaves(grads)]
    assert all(np.all(np.isfinite(v)) for v in g)
    assert np.any(np.asarray(grads["fc"]["kernel"][...]) != 0)
    assert np.any(np.asarray(grads["stem_conv"]["kernel"][...]) != 0)

    # the derivative along the unit gradient direction is the gradient's norm
    # (central difference, eps = 5e-4: 0.1 % curvature error in float32 here)
    norm = float(np.sqrt(sum(np.sum(v * v) for v in g)))
    eps = 5e-4
    shift = lambda t: jax.tree.map(lambda p, d: p + (t / norm) * d, params, grads)  # noqa: E731
    f = jax.jit(lambda t: loss(shift(t), stats)[0])
    fd = (float(f(eps)) - float(f(-eps))) / (2 * eps)
    assert fd == pytest.approx(norm, rel=1e-2)


def test_merge_copies(pieces):
    graphdef, params, stats = pieces
    m = functional.merge(graphdef, params, stats, train=True)
    assert m.stem_bn.use_running_average is False
    before = _snapshot(stats)
    m(_x(X_SHAPE))
    assert _same(before, _snapshot(stats))
    assert functional.merge(graphdef, params, stats).stem_bn.use_running_average is True


def test_stack_empty():
    with pytest.raises(ValueError, match="trees"):
        functional.stack([])


# --------------------------------------------------------------------------- errors


def test_unknown_name_lists_models():
    with pytest.raises(ValueError, match="resnet20") as err:
        nets.create("resnet18")
    assert "resnet18" in str(err.value) and "vgg19" in str(err.value)


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        ({"activation": "tanh"}, "activation"),
        ({"beta": 0.0}, "beta"),
        ({"beta": -5.0}, "beta"),
        ({"beta": float("nan")}, "beta"),
        ({"num_classes": 0}, "num_classes"),
        ({"in_channels": 0}, "in_channels"),
    ],
)
@pytest.mark.parametrize("name", ["resnet20", "vgg11"])
def test_bad_arguments(name, kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        nets.create(name, **kwargs)


def test_bad_types():
    with pytest.raises(TypeError, match="num_classes"):
        nets.create("resnet20", num_classes=2.5)
    with pytest.raises(TypeError, match="beta"):
        nets.create("resnet20", beta="5")
    with pytest.raises(TypeError, match="rngs"):
        nets.create("resnet20", rngs="seed")


def test_bad_depths():
    with pytest.raises(ValueError, match="depth"):
        nets.ResNet(21)
    with pytest.raises(ValueError, match="depth"):
        nets.VGG(12)


def test_bad_input_shape():
    model = _built("resnet20")
    with pytest.raises(ValueError, match="NHWC"):
        model(jnp.ones((2, 32, 32, 1)))
    with pytest.raises(ValueError, match="NHWC"):
        model(jnp.ones((32, 32, 3)))


# --------------------------------------------------------------------------- slow


@pytest.mark.slow
@pytest.mark.parametrize("name", nets.NETWORKS)
@pytest.mark.parametrize("hw, channels", [(32, 3), (28, 1)])
def test_forward_all_models(name, hw, channels):
    model = _create(name, in_channels=channels)
    graphdef, params, stats = functional.split(model)
    step = jax.jit(functional.apply, static_argnames="train")
    x = _x((2, hw, hw, channels))
    for train in (True, False):
        logits, _ = step(graphdef, params, stats, x, train=train)
        assert logits.shape == (2, 10)
        assert np.all(np.isfinite(np.asarray(logits)))


def test_cnn_avg_is_the_cnn_with_average_pools():
    """Same weights (same seed), a different pool: equal where a 2x2 window is constant, smooth elsewhere."""
    from jaxcfl.nn.nets._vgg import AvgPool, MaxPool

    avg, mx = nets.create("cnn_avg", in_channels=1, rngs=0), nets.create("cnn", in_channels=1, rngs=0)
    assert nets.count_params(avg) == nets.count_params(mx)
    assert [type(layer) for layer in avg.features if isinstance(layer, (AvgPool, MaxPool))] == [AvgPool] * 3
    x = jnp.arange(2 * 3 * 3 * 1, dtype=jnp.float32).reshape(2, 3, 3, 1)
    pooled = AvgPool()(x)
    assert pooled.shape == (2, 2, 2, 1)
    np.testing.assert_allclose(pooled[0, :, :, 0], [[2.0, 3.5], [6.5, 8.0]])  # padding not counted
    with pytest.raises(ValueError, match="pool"):
        nets.VGG(4, pool="min")
