"""The top-level namespace: every public name resolves, and Flax loads only when needed."""

import subprocess
import sys

import pytest

import jaxcfl


def test_every_public_name_resolves():
    missing = [name for name in jaxcfl.__all__ if not hasattr(jaxcfl, name)]
    assert missing == []
    assert set(jaxcfl.__all__) <= set(dir(jaxcfl))
    assert jaxcfl.nn._preset.TrainConfig is jaxcfl.TrainConfig  # jaxcfl.nn._preset is the module


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        jaxcfl.no_such_thing  # noqa: B018


def test_the_pde_core_imports_without_flax():
    code = ("import sys, jaxcfl; assert 'flax' not in sys.modules, 'flax imported'; "
            "jaxcfl.TrainConfig; assert 'flax' in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
