"""jaxcfl: numerical stability of deep-network training as the discretisation of a PDE."""

from jaxcfl import heat, theory
from jaxcfl.images import checkerboard
from jaxcfl.integrate import Diagnostics, Trajectory, diagnose, integrate
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
)
from jaxcfl.rounding import scaled_update
from jaxcfl.schemes import SCHEMES, State, euler_step, init, nesterov_step
from jaxcfl.spectral import lanczos_extremes

__version__ = "0.1.0"

__all__ = [
    "MODELS",
    "POOLS",
    "SCHEMES",
    "Diagnostics",
    "Hyper",
    "Problem",
    "State",
    "Trajectory",
    "checkerboard",
    "correlate",
    "correlate_adjoint",
    "diagnose",
    "euler_step",
    "gradient",
    "gradient_fn",
    "heat",
    "init",
    "integrate",
    "lanczos_extremes",
    "loss",
    "make_hyper",
    "make_problem",
    "nesterov_step",
    "scaled_update",
    "theory",
]
