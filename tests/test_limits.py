"""Optimisers' stability thresholds (jaxcfl.nn._limits) and the sharpness held against them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcfl.nn._limits import Adam, GradientDescent, HeavyBall, Nesterov


def test_thresholds_are_the_closed_forms():
    lr, mu = 0.05, 0.9
    assert GradientDescent(lr).threshold == pytest.approx(2 / lr)
    assert HeavyBall(lr, mu).threshold == pytest.approx(2 * (1 + mu) / lr)
    assert Nesterov(lr, mu).threshold == pytest.approx(2 * (1 + mu) / ((1 + 2 * mu) * lr))
    assert Adam(1e-3).threshold == pytest.approx(38 / 1e-3)  # Cohen et al. 2022, beta1 = 0.9
    assert GradientDescent(lr, weight_decay=1e-3).alpha == 1e-3 and Adam(1e-3).alpha == 0.0


def test_adam_scale_is_the_inverse_square_root_of_its_preconditioner():
    params = {"w": jnp.zeros(4)}
    tx = optax.adam(1e-3, b2=0.99)
    state = tx.init(params)
    g = {"w": jnp.array([1.0, -2.0, 0.5, 0.0])}
    for _ in range(3):
        _, state = tx.update(g, state, params)
    scale = Adam(1e-3, b2=0.99).scale(state)["w"]
    nu_hat = np.array([1.0, 4.0, 0.25, 0.0])  # a constant gradient: v_hat = g^2 exactly
    np.testing.assert_allclose(scale, (np.sqrt(nu_hat) + 1e-8) ** -0.5, rtol=1e-5)
    with pytest.raises(ValueError, match="ScaleByAdamState"):
        Adam(1e-3).scale(optax.sgd(0.1).init(params))


@pytest.mark.parametrize("kwargs, match", [(dict(lr=-1.0), "lr"), (dict(lr=0.1, momentum=1.5), "momentum")])
def test_bad_limits_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HeavyBall(**kwargs)


def test_the_protocols_sharpness_on_a_quadratic_with_known_hessian():
    """loss = 1/2 sum h w^2: the sharpness is max h; Adam's preconditioned one is max h s^2."""
    from jaxcfl.nn._lockstep import Copies, Lockstep
    from jaxcfl.nn._protocol import _Curvature
    from jaxcfl._core.results import ResultDir

    h = jnp.array([3.0, 0.5, 7.0, 1.0])

    def init(key):
        return {"w": jax.random.normal(key, (4,))}

    def apply(p, x):
        return jnp.broadcast_to(p["w"], (x.shape[0], 4))

    def loss(outputs, y):
        return 0.5 * jnp.sum(h * outputs**2, axis=-1)

    data = (np.zeros((8, 1), np.float32), np.zeros(8, np.int32))
    for limit, opt in ((GradientDescent(0.1), optax.sgd(0.1)), (Adam(1e-2), optax.adam(1e-2))):
        engine = Lockstep((init, apply), opt, loss=loss, metric=lambda o, y: jnp.zeros(o.shape[0]))
        curv = _Curvature(engine, limit, data, 0, 4, 8, 4, ResultDir(None))
        result = engine.fit(data, Copies(), epochs=1, batch_size=4, on_epoch=curv.on_epoch, progress=False)
        scale = limit.scale(result.state.copy(0).opt_state)
        expected = float(jnp.max(h * (1.0 if scale is None else scale["w"] ** 2)))
        got = curv.records[-1]["sharpness"]
        assert got == pytest.approx(expected, rel=1e-4)
        assert curv.records[-1]["ratio"] == pytest.approx(expected / limit.threshold, rel=1e-4)
