"""Optimisers' stability thresholds, as objects: what the sharpness of a run is held against.

On a quadratic mode of curvature ``l`` an optimiser with learning rate ``lr`` is stable while its
sharpness stays below a threshold (the edge of stability, Cohen et al. 2021 and 2022):

* :class:`GradientDescent`: ``l < 2 / lr`` (forward Euler, eq 21);
* :class:`HeavyBall`, momentum ``mu`` (PyTorch/optax convention): ``l < 2 (1 + mu) / lr``;
* :class:`Nesterov`: ``l < 2 (1 + mu) / ((1 + 2 mu) lr)`` (eqs 37-38);
* :class:`Adam`: the *preconditioned* sharpness ``lambda_max(P^-1/2 H P^-1/2)``, with
  ``P = diag(sqrt(v_hat) + eps)`` read from Adam's state, below ``(2 + 2 beta1) / ((1 - beta1) lr)``
  (38 / lr for beta1 = 0.9; Cohen et al., "Adaptive Gradient Methods at the Edge of Stability").

The SGD constants are :func:`jaxcfl.limits.momentum_limit`'s. Each object gives ``threshold``
and ``scale(opt_state)``: the per-parameter factor ``P^-1/2`` by which the Hessian is preconditioned
(``None`` for SGD), so that one sharpness routine measures every optimiser against its own limit.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxcfl._core import validate as v
from jaxcfl._core.stability import momentum_limit

__all__ = ["momentum_limit", "Adam", "GradientDescent", "HeavyBall", "Limit", "Nesterov"]


@dataclasses.dataclass(frozen=True)
class Limit:
    """An optimiser's stability threshold on the (preconditioned) sharpness."""

    lr: float

    def __post_init__(self) -> None:
        v.check_positive("lr", self.lr)

    @property
    def threshold(self) -> float:
        raise NotImplementedError

    @property
    def description(self) -> str:
        raise NotImplementedError

    def scale(self, opt_state: Any) -> Any:
        """The factor ``P^-1/2`` (a pytree like the parameters) of the preconditioned Hessian; ``None``: none."""
        return None

    @property
    def alpha(self) -> float:
        """The weight decay that enters the Hessian (coupled weight decay of SGD; none for AdamW's)."""
        return float(getattr(self, "weight_decay", 0.0))

    @property
    def preconditioned(self) -> bool:
        return False

    def to_dict(self) -> dict[str, Any]:
        return {"optimizer": type(self).__name__, **dataclasses.asdict(self), "threshold": self.threshold,
                "description": self.description}


@dataclasses.dataclass(frozen=True)
class GradientDescent(Limit):
    """Plain gradient descent: sharpness below ``2 / lr`` (``weight_decay``: coupled, in the Hessian)."""

    weight_decay: float = 0.0

    @property
    def threshold(self) -> float:
        return float(momentum_limit(0.0)) / self.lr

    @property
    def description(self) -> str:
        return "2 / lr"


@dataclasses.dataclass(frozen=True)
class HeavyBall(Limit):
    """SGD with heavy-ball momentum ``mu``: sharpness below ``2 (1 + mu) / lr``."""

    momentum: float = 0.9
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        v.check_unit_interval("momentum", self.momentum)
        v.check_nonnegative("weight_decay", self.weight_decay)

    @property
    def threshold(self) -> float:
        return float(momentum_limit(self.momentum)) / self.lr

    @property
    def description(self) -> str:
        return "2 (1 + mu) / lr"


@dataclasses.dataclass(frozen=True)
class Nesterov(HeavyBall):
    """SGD with Nesterov momentum ``mu``: sharpness below ``2 (1 + mu) / ((1 + 2 mu) lr)``."""

    @property
    def threshold(self) -> float:
        return float(momentum_limit(self.momentum, nesterov=True)) / self.lr

    @property
    def description(self) -> str:
        return "2 (1 + mu) / ((1 + 2 mu) lr)"


@dataclasses.dataclass(frozen=True)
class Adam(Limit):
    """Adam or AdamW: the preconditioned sharpness below ``(2 + 2 beta1) / ((1 - beta1) lr)``."""

    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        super().__post_init__()
        v.check_unit_interval("b1", self.b1)
        v.check_unit_interval("b2", self.b2)
        v.check_positive("eps", self.eps)

    @property
    def threshold(self) -> float:
        return (2 + 2 * self.b1) / ((1 - self.b1) * self.lr)

    @property
    def description(self) -> str:
        return "(2 + 2 beta1) / ((1 - beta1) lr)"

    @property
    def preconditioned(self) -> bool:
        return True

    def scale(self, opt_state: Any) -> Any:
        """``(sqrt(v_hat) + eps)^-1/2`` from the ``optax.ScaleByAdamState`` in ``opt_state``."""
        found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
                 if isinstance(s, optax.ScaleByAdamState)]
        if not found:
            raise ValueError("Adam limit: the optimiser state holds no optax.ScaleByAdamState (is it Adam?)")
        state = found[0]
        count = jnp.maximum(jnp.asarray(state.count, jnp.float32), 1.0)
        correction = 1 - jnp.asarray(self.b2, jnp.float32) ** count
        return jax.tree.map(lambda nu: (jnp.sqrt(nu / correction) + self.eps) ** -0.5, state.nu)
