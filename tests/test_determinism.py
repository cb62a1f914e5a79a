import jax.numpy as jnp
import numpy as np
import pytest

from jaxcfl.determinism import divergence, fingerprint


def test_divergence_closed_forms():
    a = np.array([1.0, -2.0, 0.0, 3.0])
    assert float(divergence(a, a)) == 0.0
    assert float(divergence(a, -a)) == pytest.approx(2.0 * 3 / 4)  # the zero entry contributes 0
    assert float(divergence([1.0], [3.0])) == pytest.approx(2 * 2 / 4)
    b = a + np.array([1e-3, 0, 0, 0])
    assert float(divergence(a, b)) == pytest.approx(2 * (1e-3 / 2.001) / 4, rel=1e-4)


def test_fingerprint_sees_bytes_shapes_dtypes_and_structure():
    x = {"w": jnp.arange(4.0), "b": jnp.zeros(2)}
    assert fingerprint(x) == fingerprint({"w": jnp.arange(4.0), "b": jnp.zeros(2)})
    assert fingerprint(x) != fingerprint({"w": jnp.arange(4.0).reshape(2, 2), "b": jnp.zeros(2)})
    assert fingerprint(x) != fingerprint({"w": jnp.arange(4.0, dtype=jnp.int32), "b": jnp.zeros(2)})
    y = {"w": jnp.arange(4.0).at[0].set(jnp.nextafter(0.0, 1.0)), "b": jnp.zeros(2)}
    assert fingerprint(x) != fingerprint(y)
    assert fingerprint(x) != fingerprint([jnp.arange(4.0), jnp.zeros(2)])
