import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import pytest

CACHE_MIN_COMPILE_SECONDS = 0.2
"""Programs that compile faster than this are not cached (reading one back costs about as much)."""


def pytest_configure(config):
    """One XLA compilation cache for the whole run: the controller, its xdist workers and the
    processes the tests start (CLI runs, determinism checks) read and write one fresh folder, so a
    program that several tests compile (the same step of a built-in network, say) compiles once.
    A cache hit loads the same executable, so no result changes. A ``JAX_COMPILATION_CACHE_DIR``
    already set is used as it is."""
    path = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if path is None and not hasattr(config, "workerinput"):  # the controller (or a run without xdist)
        path = tempfile.mkdtemp(prefix="jaxcfl-tests-xla-")
        config._jaxcfl_xla_cache = path
        os.environ["JAX_COMPILATION_CACHE_DIR"] = path  # inherited by workers and subprocesses
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", str(CACHE_MIN_COMPILE_SECONDS))
    if path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs",
                          float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", CACHE_MIN_COMPILE_SECONDS)))


def pytest_unconfigure(config):
    path = getattr(config, "_jaxcfl_xla_cache", None)
    if path:
        shutil.rmtree(path, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.slow_in_float64``: the test's float64 case (the ``dtype`` fixture) is slow; its
    float32 case runs by default. For tests whose float64 case repeats the float32 one's code path
    with a tighter tolerance."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if item.get_closest_marker("slow_in_float64") and callspec and callspec.params.get("dtype") == "float64":
            item.add_marker(pytest.mark.slow)


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    """Run a test in float32 (default) and in float64 (under ``jax.enable_x64``)."""
    if request.param == "float64":
        with jax.enable_x64(True):
            yield jnp.float64
    else:
        yield jnp.float32
