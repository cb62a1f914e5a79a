"""Sharpness along the one-layer CNN's PDE (appendix F): :func:`integrate_sharpness`.

The generic Hessian tools (:func:`jaxcfl.sharpness`, :func:`jaxcfl.sharpness_trajectory`)
know nothing of the PDE; this module gives them the loss of eq 2 and steps it with
:func:`jaxcfl.integrate`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike

from jaxcfl._core import validate as v
from jaxcfl._core.curvature import SharpnessTrajectory, _setup, _track
from jaxcfl.pde._integration import integrate
from jaxcfl.pde._problem import Hyper, Problem, check_kernel
from jaxcfl.pde._rhs import Model, get_model, loss
from jaxcfl.pde._schemes import Scheme, get_scheme
from jaxcfl.pde._state import init

__all__ = ["integrate_sharpness", "one_layer_loss"]


def one_layer_loss(kernel: Array, problem: Problem, hyper: Hyper) -> Array:
    """The one-layer CNN's loss (eq 2, with weight decay ``hyper.alpha``) as ``loss_fn(params, *args)``.

    ``jaxcfl.pde.loss(problem, kernel, hyper)`` with the kernel first, for
    :func:`sharpness`, :func:`sharpness_trajectory` and :func:`max_stable_lr`:
    ``sharpness(one_layer_loss, kernel, problem, hyper)`` (``hyper`` unbatched;
    its ``alpha`` is the weight decay, so pass no ``alpha`` to those functions).
    """
    return loss(problem, kernel, hyper)


def integrate_sharpness(
    problem: Problem,
    kernel: ArrayLike,
    hyper: Hyper,
    *,
    scheme: str | Scheme = "gd",
    model: str | Model = "nonlinear",
    steps: int = 1000,
    every: int = 10,
    iterations: int | None = None,
    key: Array | None = None,
) -> SharpnessTrajectory:
    """Sharpness of the one-layer CNN's loss along :func:`jaxcfl.integrate`.

    Runs :func:`jaxcfl.integrate` in chunks of ``every`` steps (continuing from
    its state) and records the loss of eq 2 and its sharpness
    (:func:`one_layer_loss`). For ``model="nonlinear"`` with ``scheme="gd"`` the
    stepped gradient is exactly that loss's gradient; for the linearised models
    the stepped operator's spectrum is :func:`jaxcfl.theory.windowed_spectrum`,
    and the sharpness here is still that of the true loss.

    Args:
      problem: from :func:`jaxcfl.make_problem`.
      kernel: the initial ``w x w`` kernel.
      hyper: one (unbatched) configuration from :func:`jaxcfl.make_hyper`.
      scheme, model: as in :func:`jaxcfl.integrate`.
      steps, every, iterations, key: as in :func:`sharpness_trajectory`.

    Returns:
      :class:`SharpnessTrajectory`; ``threshold`` is the scheme's stability limit
      (:func:`jaxcfl.theory.stability_limit`: ``2 / lr`` for ``gd``) and ``params``
      the final kernel.
    """
    from jaxcfl.pde._theory import stability_limit

    scheme, model = get_scheme(scheme), get_model(model)
    steps = v.check_int("steps", steps, minimum=1)
    every = v.check_int("every", every, minimum=1)
    if not isinstance(hyper, Hyper):
        raise TypeError(f"hyper must be a jaxcfl.Hyper (use jaxcfl.make_hyper), got {type(hyper).__name__}")
    if np.ndim(hyper.lr) != 0:
        raise ValueError(f"hyper must be one configuration (scalar fields), got lr of shape {np.shape(hyper.lr)}")
    kernel = jnp.asarray(kernel, problem.dtype)
    check_kernel(problem, kernel)
    s = _setup(one_layer_loss, kernel, (problem, hyper), 0.0)
    lr = float(hyper.lr)

    def advance(state, n):
        return integrate(problem, state, hyper, scheme=scheme, model=model, steps=n, record_every=n).state

    return _track(s, advance, init(kernel), lambda state: state.kernel, lr=lr,
                  threshold=stability_limit(scheme, lr, float(hyper.mu)), steps=steps, every=every,
                  iterations=iterations, key=key)
