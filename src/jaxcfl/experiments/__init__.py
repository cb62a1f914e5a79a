"""The paper's experiments, behind ``jaxcfl reproduce NAME``.

Each experiment is one module with three functions, so that the command line
stays argument parsing only:

* ``add_arguments(parser)``: its options (defaults: the paper's set-up at a size
  that fits a laptop CPU);
* ``main(args) -> dict``: run it from parsed arguments, return a JSON-able payload;
* ``render(payload) -> str``: the human-readable table.

Its options are declared once, as a frozen dataclass ``Options``
(:mod:`jaxcfl.experiments._options`): its flags, the keyword arguments of its ``run`` and
the ``settings`` its payload records all come from that declaration, and every value is
checked when the options are built, before any work starts.

Their files go through :mod:`jaxcfl._core.results` (the result folder, atomic CSV / JSON,
the row cache, the clock and the progress log).

This module is the registry, and imports none of them: :data:`EXPERIMENTS` maps each
``jaxcfl reproduce`` name to its module and one-line help, :data:`COMMANDS` the same for
the top-level commands that run one experiment module. The command line builds its
parser from these names and imports a module only when its command runs (or shows its
``--help``), so that ``jaxcfl theory`` does not load Flax.
"""

from __future__ import annotations

EXPERIMENTS: dict[str, tuple[str, str]] = {
    "table5": ("jaxcfl.experiments.table5", "appendix E, Table 5: empirical alpha bounds beside the CFL theory"),
    "fig2": ("jaxcfl.experiments.fig2", "Section 4, Figure 2: lr vs amplification of a last-bit perturbation (k = 1 vs 3)"),
    "fig4": ("jaxcfl.experiments.fig4", "Section 5, Figure 4: restrained instabilities of the nonlinear CNN, by lr"),
    "appendix-f": ("jaxcfl.experiments.appendix_f", "appendix F: largest stable lr of standard networks against 2/alpha"),
    "pde-guard": ("jaxcfl.experiments.pde_guard",
                  "appendix A on Section 5's problem: Figure 4 and its lr x alpha stability map without and "
                  "with the CFL guard"),
    "open-question": ("jaxcfl.experiments.open_question",
                      "appendix A's open question: does keeping every step stable (CFL guard, or a constant lr) "
                      "remove the variance?"),
}
"""``jaxcfl reproduce NAME``: name -> (module, one-line help)."""

COMMANDS: dict[str, tuple[str, str]] = {
    "variance": ("jaxcfl.experiments.variance",
                 "appendix C: accuracy spread from last-bit perturbations (k) against batch order (seeds)"),
    "determinism": ("jaxcfl.experiments.determinism_check",
                    "bit-exact determinism: repeated processes, k vs k*2^n, odd k, deterministic mode on/off"),
    "sweep": ("jaxcfl.experiments.image_sweep",
              "stability map of an lr x alpha grid on your own image (--image), beside the CFL theory"),
    "sensitivity": ("jaxcfl.experiments.sensitivity",
                    "your own training: which source of variation (numerics, one bit, order, init, augmentation, "
                    "dropout) moves the result, and is it bit-deterministic"),
    "bounds": ("jaxcfl.experiments.image_bounds",
               "empirical alpha bounds on your own image (--image), beside the CFL theory, as reproduce table5"),
}
"""``jaxcfl NAME``: top-level commands that run one experiment module, as :data:`EXPERIMENTS`."""
