"""The PDE side: gradient descent on the one-layer windowed-kernel CNN as the discretisation
of a PDE (Sun et al., JMLR 2024, Sections 3-5 and appendices A-D).

Values, not names: a :class:`Problem` holds the image and its correlation back-end, a
:class:`Hyper` the traced numbers, a :class:`Setup` the right-hand side and the scheme.
A right-hand side is a :class:`Model`, a scheme a :class:`Scheme` with its step-size
controller (:class:`ConstantStep`, or the CFL guard :class:`CFLController`); every entry point
takes them as values or by name, and nothing below asks for a name.
:func:`integrate` steps one configuration, :func:`sweep` a grid, :func:`empirical_bounds`
finds the CFL bounds, and :mod:`theory` (Von Neumann amplifiers, CFL bounds, the windowed
spectrum) and :mod:`heat` (Section 3) say what to expect.
"""

from jaxcfl.pde import _heat as heat
from jaxcfl.pde import _theory as theory
from jaxcfl.pde._bounds import EmpiricalBounds, empirical_bounds
from jaxcfl.pde._controllers import CFLController, ConstantStep, StepSizeController
from jaxcfl.pde._integration import Diagnostics, SaveAt, Solution, Trajectory, diagnose, integrate, integrate_many, solve
from jaxcfl.pde._operators import (
    DenseOperator,
    FFTOperator,
    SeparableOperator,
    choose_operator,
    separable_factors,
    separable_pays,
)
from jaxcfl.pde._problem import POOLS, Hyper, Problem, correlate, correlate_adjoint, make_hyper, normal_operator, with_dense_operator, with_separable_operator
from jaxcfl.pde._setup import make_problem
from jaxcfl.pde._rhs import MODELS, Model, get_model, gradient, gradient_fn, logit, loss
from jaxcfl.pde._setup import Setup
from jaxcfl.pde._schemes import (
    SCHEMES,
    GuardSchedule,
    Scheme,
    State,
    euler_step,
    get_scheme,
    guarded_euler_step,
    init,
    nesterov_step,
)
from jaxcfl.pde._sharpness import integrate_sharpness, one_layer_loss
from jaxcfl.pde._sweeps import SweepResult, SweepSpec, config_mesh, sweep

__all__ = [
    # the problem and its numbers
    "Problem", "Hyper", "make_problem", "make_hyper", "POOLS",
    "FFTOperator", "SeparableOperator", "DenseOperator", "choose_operator", "separable_factors", "separable_pays",
    "with_dense_operator", "with_separable_operator", "correlate", "correlate_adjoint", "normal_operator",
    # right-hand sides (eqs 11-13, 20, 28, 35) and the loss (eq 2)
    "MODELS", "Model", "get_model", "Setup", "gradient", "gradient_fn", "logit", "loss",
    # schemes (eqs 21, 37-38) and the guard on the PDE
    "SCHEMES", "Scheme", "get_scheme", "State", "init", "euler_step", "nesterov_step", "guarded_euler_step",
    "GuardSchedule", "StepSizeController", "ConstantStep", "CFLController",
    # integration, sweeps, bounds
    "SaveAt", "Solution", "Trajectory", "Diagnostics", "diagnose", "solve", "integrate", "integrate_many",
    "SweepSpec", "SweepResult", "config_mesh", "sweep", "EmpiricalBounds", "empirical_bounds",
    "integrate_sharpness", "one_layer_loss",
    # the theory
    "theory", "heat",
]
