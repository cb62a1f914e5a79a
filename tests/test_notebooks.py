"""The notebooks run end to end at a small size (their code cells, in order, in one namespace)."""

import json
from pathlib import Path

import matplotlib
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

# The notebooks' small sizes are those of tests that run earlier in the session, so that their compiled
# programs are reused here: table5_figure3 <- test_cli.py::test_reproduce_table5_small (64 image, 8 kernel,
# 1000 steps); restrained_eos_appendix_f <- test_fig4.py's SMALL and test_appendix_f.py's TINY_ARGS.


# Three notebooks run with -m slow; their APIs are tested in test_sensitivity.py, test_curvature.py and test_guard.py.
@pytest.mark.parametrize("name", ["table5_figure3.ipynb", pytest.param("restrained_eos_appendix_f.ipynb", marks=pytest.mark.slow),
                                  pytest.param("cfl_guard.ipynb", marks=pytest.mark.slow), pytest.param("sensitivity.ipynb", marks=pytest.mark.slow)])
def test_notebook_runs_at_small_size(name, monkeypatch, tmp_path):
    matplotlib.use("Agg")
    monkeypatch.setenv("JAXCFL_NOTEBOOK_SMALL", "1")
    monkeypatch.chdir(tmp_path)
    nb = json.loads((NOTEBOOKS / name).read_text())
    namespace: dict = {"__name__": "__notebook__"}
    for i, cell in enumerate(c for c in nb["cells"] if c["cell_type"] == "code"):
        source = "".join(cell["source"])
        exec(compile(source, f"{name}[code cell {i}]", "exec"), namespace)
    assert "rows" in namespace and namespace["rows"]
