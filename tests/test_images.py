import jax.numpy as jnp
import numpy as np
import pytest

import jaxcfl


@pytest.mark.parametrize("n", [1, 2, 5, 256])
def test_checkerboard_matches_definition(n):
    img = np.asarray(jaxcfl.checkerboard(n))
    m, l = np.indices((n, n))
    expected = np.where((m + l) % 2 == 0, -1.0, 1.0)
    np.testing.assert_array_equal(img, expected)
    assert img.dtype == np.float32


def test_checkerboard_dtype(dtype):
    assert jaxcfl.checkerboard(4, dtype=dtype).dtype == dtype
    assert jaxcfl.checkerboard(4).dtype == jnp.zeros(()).dtype


def test_checkerboard_power_is_a_single_peak():
    # The paper's |I(w)|^2 is concentrated at the Nyquist frequency: N^4 there, 0 elsewhere.
    power = np.abs(np.fft.fft2(np.asarray(jaxcfl.checkerboard(16), np.float64))) ** 2
    assert power[8, 8] == pytest.approx(16.0**4)
    power[8, 8] = 0
    assert power.max() < 1e-12


@pytest.mark.parametrize("bad", [0, -3])
def test_checkerboard_rejects_bad_size(bad):
    with pytest.raises(ValueError, match="n"):
        jaxcfl.checkerboard(bad)


def test_checkerboard_rejects_float_size():
    with pytest.raises(TypeError, match="n"):
        jaxcfl.checkerboard(4.0)
