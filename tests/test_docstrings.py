"""Every docstring example in the jaxcfl package runs and prints what it shows, so that none can drift.

One case per module, found by walking the package: a new module is picked up without editing this
file. A module may be skipped only when it fails to import for want of one of jaxcfl's optional
dependencies (the extras of its metadata); any other import error fails.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.metadata
import pkgutil
import re

import pytest

import jaxcfl


def _optional_dependencies() -> frozenset[str]:
    """Top-level import names of the extras (``pip install jaxcfl[...]``), e.g. ``torch``."""
    try:
        requires = importlib.metadata.requires("jaxcfl") or []
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from an uninstalled checkout
        return frozenset()
    names = (re.match(r"[A-Za-z0-9_.\-]+", r) for r in requires if "extra ==" in r)
    return frozenset(m.group(0).lower().replace("-", "_") for m in names if m)


def _modules() -> list[str]:
    names = {"jaxcfl"}
    for info in pkgutil.walk_packages(jaxcfl.__path__, "jaxcfl.", onerror=lambda name: names.add(name)):
        names.add(info.name)
    return sorted(names)


MODULES = _modules()


def test_the_walk_finds_the_package():
    assert {"jaxcfl._core.spectral", "jaxcfl.nn._preset", "jaxcfl.nn.nets", "jaxcfl.nn.nets._resnet"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    try:
        module = importlib.import_module(name)
    except ImportError as err:
        missing = (err.name or "").split(".")[0]
        if missing and missing in _optional_dependencies():
            pytest.skip(f"{name} needs the optional dependency {missing!r}")
        raise
    report: list[str] = []
    runner = doctest.DocTestRunner(verbose=False)
    # DocTestFinder keeps the objects defined in this module: a re-exported function runs once, in its own module.
    for test in doctest.DocTestFinder(exclude_empty=True).find(module, name):
        runner.run(test, out=report.append)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}:\n" + "".join(report)
