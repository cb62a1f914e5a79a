"""jaxcfl: numerical stability of deep-network training as the discretisation of a PDE."""

from jaxcfl import data, heat, nets, perturb, theory
from jaxcfl.bisect import EmpiricalBounds, empirical_bounds, log_bisect
from jaxcfl.classify import Rule, classify
from jaxcfl.curvature import MaxStableLR, SharpnessTrajectory, integrate_sharpness, max_stable_lr, sharpness, sharpness_trajectory
from jaxcfl.determinism import divergence, enable_deterministic_mode, fingerprint, run_in_processes
from jaxcfl.perturb import perturb_update, perturbed_sgd, ulp_perturb
from jaxcfl.images import checkerboard
from jaxcfl.integration import Diagnostics, Trajectory, diagnose, integrate, integrate_many
from jaxcfl.problem import (
    MODELS,
    POOLS,
    Hyper,
    Problem,
    correlate,
    correlate_adjoint,
    gradient,
    gradient_fn,
    loss,
    make_hyper,
    make_problem,
    normal_operator,
    separable_factors,
    separable_pays,
    with_dense_operator,
    with_separable_operator,
)
from jaxcfl.rounding import scaled_update
from jaxcfl.schemes import SCHEMES, State, euler_step, init, nesterov_step
from jaxcfl.spectral import lanczos_extremes
from jaxcfl.sweeps import SweepResult, config_mesh, sweep
from jaxcfl import train  # the module: jaxcfl.train.train(config, ks, ...)
from jaxcfl.train import TrainConfig, TrainResult

from jaxcfl._version import __version__

__all__ = [
    "MODELS",
    "POOLS",
    "SCHEMES",
    "Diagnostics",
    "EmpiricalBounds",
    "Rule",
    "SweepResult",
    "Hyper",
    "Problem",
    "State",
    "Trajectory",
    "checkerboard",
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
    "heat",
    "init",
    "integrate",
    "integrate_many",
    "integrate_sharpness",
    "MaxStableLR",
    "max_stable_lr",
    "lanczos_extremes",
    "log_bisect",
    "loss",
    "make_hyper",
    "make_problem",
    "nesterov_step",
    "nets",
    "normal_operator",
    "perturb",
    "perturb_update",
    "perturbed_sgd",
    "run_in_processes",
    "scaled_update",
    "separable_factors",
    "separable_pays",
    "sharpness",
    "SharpnessTrajectory",
    "sharpness_trajectory",
    "sweep",
    "theory",
    "train",
    "TrainConfig",
    "TrainResult",
    "ulp_perturb",
    "with_dense_operator",
    "with_separable_operator",
]
