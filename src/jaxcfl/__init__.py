"""jaxcfl: numerical stability of deep-network training as the discretisation of a PDE."""

from jaxcfl import data, heat, perturb, statistics, theory
from jaxcfl.bounds import EmpiricalBounds, empirical_bounds
from jaxcfl.search import log_bisect
from jaxcfl.classify import Rule, classify
from jaxcfl.curvature import (
    MaxStableLR,
    SharpnessTrajectory,
    hessian_eigenpairs,
    integrate_sharpness,
    max_stable_lr,
    sharpness,
    sharpness_trajectory,
)
from jaxcfl.determinism import divergence, enable_deterministic_mode, fingerprint, run_in_processes
from jaxcfl.guard import CFLGuardState, cfl_guard, guard_state, guarded_lr, refresh_due
from jaxcfl.perturb import perturb_update, perturbed_sgd, ulp_perturb
from jaxcfl.images import checkerboard, load_image
from jaxcfl.integration import Diagnostics, SaveAt, Trajectory, diagnose, integrate, integrate_many
from jaxcfl.model import MODELS, Setup, gradient, gradient_fn, loss
from jaxcfl.operators import separable_factors, separable_pays
from jaxcfl.problem import (
    POOLS,
    Hyper,
    Problem,
    correlate,
    correlate_adjoint,
    make_hyper,
    make_problem,
    normal_operator,
    with_dense_operator,
    with_separable_operator,
)
from jaxcfl.rounding import scaled_update
from jaxcfl.schemes import SCHEMES, GuardSchedule, State, euler_step, guarded_euler_step, init, nesterov_step
from jaxcfl.spectral import Eigenpairs, lanczos_extremes, top_eigenpairs
from jaxcfl.sweeps import SweepResult, SweepSpec, config_mesh, sweep
from jaxcfl._version import __version__

# The networks and the trainer need Flax, whose import costs most of a second; they load on
# first use, so that the PDE core starts fast. ``jaxcfl.train`` is the module
# (``jaxcfl.train.train(config, ks, ...)``).
_LAZY = {"nets": ("jaxcfl.nets", None), "train": ("jaxcfl.train", None), "plot": ("jaxcfl.plot", None),
         "TrainConfig": ("jaxcfl.train", "TrainConfig"), "TrainResult": ("jaxcfl.lockstep", "TrainResult"),
         "lockstep": ("jaxcfl.lockstep", None), "Lockstep": ("jaxcfl.lockstep", "Lockstep"),
         "Copies": ("jaxcfl.lockstep", "Copies"), "LockstepState": ("jaxcfl.lockstep", "LockstepState"),
         "sensitivity": ("jaxcfl.protocol", "sensitivity"),
         "SensitivityReport": ("jaxcfl.protocol", "SensitivityReport")}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'jaxcfl' has no attribute {name!r}")
    import importlib

    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "MODELS",
    "POOLS",
    "SCHEMES",
    "CFLGuardState",
    "Copies",
    "Lockstep",
    "LockstepState",
    "SensitivityReport",
    "Diagnostics",
    "Eigenpairs",
    "EmpiricalBounds",
    "GuardSchedule",
    "Rule",
    "SaveAt",
    "Setup",
    "SweepResult",
    "SweepSpec",
    "Hyper",
    "Problem",
    "State",
    "Trajectory",
    "cfl_guard",
    "checkerboard",
    "load_image",
    "classify",
    "config_mesh",
    "correlate",
    "correlate_adjoint",
    "diagnose",
    "data",
    "divergence",
    "enable_deterministic_mode",
    "empirical_bounds",
    "euler_step",
    "fingerprint",
    "gradient",
    "gradient_fn",
    "guard_state",
    "guarded_euler_step",
    "guarded_lr",
    "heat",
    "hessian_eigenpairs",
    "init",
    "integrate",
    "integrate_many",
    "integrate_sharpness",
    "MaxStableLR",
    "max_stable_lr",
    "lanczos_extremes",
    "lockstep",
    "log_bisect",
    "loss",
    "make_hyper",
    "make_problem",
    "nesterov_step",
    "nets",
    "normal_operator",
    "perturb",
    "perturb_update",
    "plot",
    "refresh_due",
    "perturbed_sgd",
    "run_in_processes",
    "scaled_update",
    "separable_factors",
    "separable_pays",
    "sensitivity",
    "sharpness",
    "SharpnessTrajectory",
    "sharpness_trajectory",
    "statistics",
    "sweep",
    "theory",
    "top_eigenpairs",
    "train",
    "TrainConfig",
    "TrainResult",
    "ulp_perturb",
    "with_dense_operator",
    "with_separable_operator",
]
