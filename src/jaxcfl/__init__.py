"""jaxcfl: numerical stability of deep-network training as the discretisation of a PDE.

The package is four groups, one folder each (``docs/architecture.md``):

* :mod:`jaxcfl.pde`: the one-layer CNN's gradient-descent PDE: problems, right-hand sides,
  schemes, the integrator, sweeps, the CFL bounds and the theory;
* :mod:`jaxcfl.nn`: any Flax model and optax optimiser in lockstep copies, the last-bit
  perturbations, the CFL guard, the nondeterminism protocol, the paper's networks and data;
* ``jaxcfl._core`` (private): what both halves share, re-exported here where users need it;
* the front end: ``jaxcfl`` on the command line, :mod:`jaxcfl.experiments`, :mod:`jaxcfl.plot`.

This module exports the entry points and the types users hold; the primitives live in
:mod:`jaxcfl.pde` and :mod:`jaxcfl.nn`.
"""

from jaxcfl import pde
from jaxcfl._core import determinism, distributed, spectral, statistics
from jaxcfl._core.classify import Rule, classify
from jaxcfl._core.curvature import (
    MaxStableLR,
    SharpnessTrajectory,
    hessian_eigenpairs,
    max_stable_lr,
    sharpness,
    sharpness_trajectory,
)
from jaxcfl._core.determinism import divergence, enable_deterministic_mode, fingerprint, run_in_processes
from jaxcfl._core.images import checkerboard, load_image
from jaxcfl._core.lazy import lazy_getattr
from jaxcfl._core.rounding import scaled_update
from jaxcfl._core.search import log_bisect
from jaxcfl._core.canonical import canonical_convs
from jaxcfl._core.spectral import Eigenpairs, lanczos_extremes, top_eigenpairs
from jaxcfl._version import __version__
from jaxcfl.nn import CFLGuardState, cfl_guard, data, guard_state, limits, perturb, perturb_update, perturbed_sgd
from jaxcfl.nn import ulp_perturb
from jaxcfl.pde import (
    MODELS,
    SCHEMES,
    Diagnostics,
    EmpiricalBounds,
    GuardSchedule,
    Hyper,
    Problem,
    SaveAt,
    Setup,
    SweepResult,
    SweepSpec,
    Trajectory,
    config_mesh,
    diagnose,
    empirical_bounds,
    heat,
    integrate,
    integrate_many,
    integrate_sharpness,
    make_hyper,
    make_problem,
    sweep,
    theory,
)

# The networks and the engine need Flax, whose import costs most of a second; they load on
# first use, so that the PDE side starts fast. ``jaxcfl.train`` is the paper's preset
# (``jaxcfl.train.train(TrainConfig(...), ks)``), the same namespace as ``jaxcfl.nn.preset``.
_LAZY = {
    "nn": ("jaxcfl.nn", None),
    "nets": ("jaxcfl.nn.nets", None),
    "train": ("jaxcfl.nn._preset", None),
    "plot": ("jaxcfl.plot", None),
    "experiments": ("jaxcfl.experiments", None),
    "TrainConfig": ("jaxcfl.nn._preset", "TrainConfig"),
    "TrainResult": ("jaxcfl.nn._lockstep", "TrainResult"),
    "Lockstep": ("jaxcfl.nn._lockstep", "Lockstep"),
    "Copies": ("jaxcfl.nn._lockstep", "Copies"),
    "LockstepState": ("jaxcfl.nn._lockstep", "LockstepState"),
    "sensitivity": ("jaxcfl.nn._protocol", "sensitivity"),
    "SensitivityReport": ("jaxcfl.nn._protocol", "SensitivityReport"),
}


__getattr__ = lazy_getattr("jaxcfl", globals(), _LAZY)


__all__ = [
    # the groups and namespaces
    "pde", "nn", "theory", "heat", "statistics", "determinism", "distributed", "spectral", "perturb", "limits",
    "data", "nets", "train", "plot", "experiments",
    # the PDE side's entry points and the types users hold
    "Problem", "Hyper", "Setup", "make_problem", "make_hyper", "MODELS", "SCHEMES", "GuardSchedule",
    "integrate", "integrate_many", "SaveAt", "Trajectory", "Diagnostics", "diagnose",
    "sweep", "SweepSpec", "SweepResult", "config_mesh", "empirical_bounds", "EmpiricalBounds",
    "checkerboard", "load_image",
    # curvature: sharpness, the largest stable lr
    "sharpness", "hessian_eigenpairs", "sharpness_trajectory", "SharpnessTrajectory", "integrate_sharpness",
    "max_stable_lr", "MaxStableLR",
    # the network side
    "Lockstep", "Copies", "LockstepState", "TrainResult", "TrainConfig", "sensitivity", "SensitivityReport",
    "perturb_update", "perturbed_sgd", "ulp_perturb", "cfl_guard", "CFLGuardState", "guard_state",
    # determinism
    "enable_deterministic_mode", "fingerprint", "divergence", "run_in_processes",
    # numerical tools
    "scaled_update", "lanczos_extremes", "top_eigenpairs", "Eigenpairs", "log_bisect", "classify", "Rule",
    "canonical_convs",
    "__version__",
]


def __dir__() -> list[str]:
    return sorted(__all__)
