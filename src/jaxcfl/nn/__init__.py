"""The network side: any Flax model and optax optimiser, trained in lockstep copies that
differ in one source of variation, with last-bit perturbations (Sun et al., JMLR 2024,
Section 6 and appendix E) and a CFL guard.

:class:`Lockstep` runs the copies in one compiled step; :func:`sensitivity` is the
nondeterminism protocol built on it; :func:`perturb_update` and :func:`perturbed_sgd`
are the optax transforms that perturb the last bit; :func:`cfl_guard` caps the learning
rate at the stability limit of :mod:`limits`. :mod:`nets`, :mod:`data` and
:mod:`preset` hold the paper's networks, datasets and set-ups.

The parts that need Flax (the engine, the networks, the preset, the protocol) load on
first use, so that ``import jaxcfl`` stays fast.
"""

from jaxcfl._core.lazy import lazy_getattr
from jaxcfl.nn import _data as data
from jaxcfl.nn import _limits as limits
from jaxcfl.nn import _perturb as perturb
from jaxcfl.nn._guard import CFLGuardState, cfl_guard, guard_state, guarded_lr, refresh_due
from jaxcfl.nn._perturb import perturb_update, perturbed_sgd, ulp_perturb

_LAZY = {
    "nets": ("jaxcfl.nn.nets", None),
    "preset": ("jaxcfl.nn._preset", None),
    "Lockstep": ("jaxcfl.nn._lockstep", "Lockstep"),
    "Copies": ("jaxcfl.nn._lockstep", "Copies"),
    "LockstepState": ("jaxcfl.nn._lockstep", "LockstepState"),
    "CopyState": ("jaxcfl.nn._lockstep", "CopyState"),
    "StepFunction": ("jaxcfl.nn._lockstep", "StepFunction"),
    "TrainResult": ("jaxcfl.nn._lockstep", "TrainResult"),
    "nnx_model": ("jaxcfl.nn._lockstep", "nnx_model"),
    "functional_model": ("jaxcfl.nn._lockstep", "functional_model"),
    "TrainConfig": ("jaxcfl.nn._preset", "TrainConfig"),
    "train": ("jaxcfl.nn._preset", "train"),
    "sensitivity": ("jaxcfl.nn._protocol", "sensitivity"),
    "SensitivityReport": ("jaxcfl.nn._protocol", "SensitivityReport"),
}


__getattr__ = lazy_getattr("jaxcfl.nn", globals(), _LAZY)


__all__ = [
    "Lockstep", "Copies", "LockstepState", "CopyState", "StepFunction", "TrainResult", "nnx_model",
    "functional_model",
    "sensitivity", "SensitivityReport",
    "perturb_update", "perturbed_sgd", "ulp_perturb", "perturb",
    "cfl_guard", "CFLGuardState", "guard_state", "guarded_lr", "refresh_due", "limits",
    "TrainConfig", "train", "preset", "nets", "data",
]


def __dir__() -> list[str]:
    return sorted(__all__)
