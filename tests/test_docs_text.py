"""The text users read (docs, docstrings, help, benchmark notes) names the paper and the project's
pages, never this project's issue tracker, and the names and paths it cites exist."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import jaxcfl

ROOT = Path(__file__).resolve().parent.parent
TEXT_SUFFIXES = {".py", ".md", ".txt", ".toml", ".cfg"}


def _text_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for folder in ("src", "docs", "benchmarks"):
        files += sorted(p for p in (ROOT / folder).rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
    return [p for p in files if "__pycache__" not in p.parts]


# "issue 13", "Issue 21, item 2", "issues 12 and 13", "(#19)". An upstream reference names its
# repository ("jax-ml/jax#12868") and is allowed; so are colours ("#4c9f70").
TRACKER = re.compile(r"\bissues?\s*#?\s*\d+|(?<![\w/.\-])#\d{1,4}\b", re.IGNORECASE)


def tracker_citations(text: str) -> list[str]:
    return [m.group(0) for m in TRACKER.finditer(text)]


def test_the_pattern_finds_tracker_numbers_and_spares_upstream_references():
    for cited in ("Issue 13, the open question", "(issue 13's target)", "see #19.", "issues 12 and 13",
                  "issue #7", "## The lockstep engine (Issue 21)"):
        assert tracker_citations(cited), cited
    for fine in ("jax-ml/jax#12868", "google/flax#4511", 'colour "#4c9f70"', "the issue of rounding",
                 "# 1 comment", "a 2-issue list"):
        assert not tracker_citations(fine), fine


def test_the_walk_finds_the_text():
    names = {p.relative_to(ROOT).as_posix() for p in _text_files()}
    assert {"README.md", "docs/architecture.md", "benchmarks/README.md", "src/jaxcfl/cli.py",
            "src/jaxcfl/pde/_schemes.py", "src/jaxcfl/nn/datasets/README.md"} <= names


@pytest.mark.parametrize("path", _text_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_tracker_issue_numbers(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    found = [f"{n}: {line.strip()}" for n, line in enumerate(lines, 1) if tracker_citations(line)]
    assert not found, (f"{path.relative_to(ROOT)} cites this project's issue tracker; name the paper's "
                       "section or the project's docs page instead:\n" + "\n".join(found))


# --- the names and paths the docs cite ------------------------------------------------------

DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md")),
        ROOT / "src" / "jaxcfl" / "nn" / "datasets" / "README.md"]
DOTTED = re.compile(r"(?<![\w/.\-])jaxcfl(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
PATH = re.compile(r"(?<![\w/.\-])((?:src/jaxcfl|tests|benchmarks|notebooks|docs)/[\w/.\-]*\.(?:py|md|ipynb|npz))")


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    obj = jaxcfl
    for i, part in enumerate(parts[1:], 1):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            try:
                obj = importlib.import_module(".".join(parts[: i + 1]))
            except ImportError:
                return False
    return True


def _cited(pattern: re.Pattern, path: Path) -> list[tuple[int, str]]:
    return [(n, m.group(1) if m.groups() else m.group(0))
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            for m in pattern.finditer(line)]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_cited_names_exist(path):
    """``jaxcfl.sweep``, ``jaxcfl.pde.correlate``, ``jaxcfl.theory.alpha_bounds``, ...: a name a page
    cites is one the package has (a file suffix such as ``jaxcfl.cli`` in ``python -m jaxcfl.cli``
    is a module, and resolves)."""
    missing = [f"{n}: {name}" for n, name in _cited(DOTTED, path) if not _resolves(name.rstrip("."))]
    assert not missing, f"{path.relative_to(ROOT)} cites names jaxcfl does not have:\n" + "\n".join(missing)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_cited_paths_exist(path):
    missing = [f"{n}: {p}" for n, p in _cited(PATH, path) if not (ROOT / p.split("::")[0]).exists()]
    assert not missing, f"{path.relative_to(ROOT)} cites files that are not in the repository:\n" + "\n".join(missing)


def test_the_name_check_can_fail():
    assert _resolves("jaxcfl.sweep") and _resolves("jaxcfl.theory.alpha_bounds") and _resolves("jaxcfl.pde.correlate")
    assert not _resolves("jaxcfl.operators") and not _resolves("jaxcfl.train.make_train_step")
