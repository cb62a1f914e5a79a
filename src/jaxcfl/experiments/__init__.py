"""The paper's experiments, behind ``jaxcfl reproduce NAME``.

Each experiment is one module with three functions, so that the command line
stays argument parsing only:

* ``add_arguments(parser)``: its options (defaults: the paper's set-up at a size
  that fits a laptop CPU);
* ``main(args) -> dict``: run it from parsed arguments, return a JSON-able payload;
* ``render(payload) -> str``: the human-readable table.

:data:`EXPERIMENTS` maps each command name to its module and one-line help.
"""

from __future__ import annotations

EXPERIMENTS: dict[str, tuple[str, str]] = {
    "table5": ("jaxcfl.experiments.table5", "appendix E, Table 5: empirical alpha bounds beside the CFL theory"),
    "fig2": ("jaxcfl.experiments.fig2", "Section 4, Figure 2: lr vs amplification of a last-bit perturbation (k = 1 vs 3)"),
    "fig4": ("jaxcfl.experiments.fig4", "Section 5, Figure 4: restrained instabilities of the nonlinear CNN, by lr"),
    "appendix-f": ("jaxcfl.experiments.appendix_f", "appendix F: largest stable lr of standard networks against 2/alpha"),
}
