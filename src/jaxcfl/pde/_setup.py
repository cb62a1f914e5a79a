"""The set-up of a run: :func:`make_problem` builds the :class:`Problem` for an image and a
right-hand side, and :class:`Setup` records the right-hand side, the scheme and the model's
constants (everything but ``lr``, ``alpha``, ``k`` and the data) that the sweeps, the bounds
and their manifests share.

It sits above the containers (:mod:`jaxcfl.pde._problem`), the right-hand sides
(:mod:`jaxcfl.pde._rhs`) and the schemes (:mod:`jaxcfl.pde._schemes`), which know nothing
of each other's registries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from jaxcfl._core import validate as v
from jaxcfl.pde._operators import OPERATORS, FFTOperator, choose_operator
from jaxcfl.pde._problem import POOLS, Hyper, Problem, make_hyper
from jaxcfl.pde._controllers import GuardSchedule, StepSizeController
from jaxcfl.pde._rhs import Model, RightHandSide, get_model
from jaxcfl.pde._schemes import Scheme, get_scheme

__all__ = ["make_problem", "Setup", "setup_from"]


def make_problem(
    image: ArrayLike,
    kernel_size: int,
    *,
    pool: str = "sum",
    dtype: DTypeLike | None = None,
    operator: str = "auto",
    max_rank: int | None = None,
    model: str | Model | None = None,
) -> Problem:
    """Set up the one-layer CNN problem for ``image`` and a ``kernel_size`` window.

    Args:
      image: any finite 2-D array (e.g. :func:`jaxcfl.checkerboard`).
      kernel_size: ``w``; the kernel and its window are ``w x w``.
      pool: ``"sum"`` (the equations) or ``"mean"`` (Figure 4).
      dtype: floating dtype; defaults to the image's floating dtype, else JAX's default.
      operator: the correlation back-end (:mod:`jaxcfl.pde._operators`): ``"fft"``
        (any image), ``"separable"`` (a low-rank image), ``"dense"`` (the
        assembled ``W C^T C W``; linearised models only) or ``"auto"``
        (:func:`jaxcfl.pde.choose_operator`: separable when the image is
        concrete, has at most ``max_rank`` factors and they pay, else FFT; with
        a linearised ``model``, dense where that is cheaper still).
      max_rank: the most factors to look for (default: the largest rank for
        which the separable products are cheaper than the FFTs, at most
        ``AUTO_MAX_RANK = 8``).
      model: the right-hand side that will be stepped (:data:`jaxcfl.MODELS`),
        if known; only whether it is linearised (:attr:`jaxcfl.pde.Model.linearised`)
        matters: it informs ``"auto"`` and refuses ``"dense"`` for ``"nonlinear"``.

    Raises:
      ValueError: for a non-2-D or non-finite image, a kernel larger than the
        image, an unknown pool or operator, or ``operator="separable"`` with an
        image that is traced or has no factorisation of rank ``<= max_rank``.
    """
    v.check_image(image)
    kernel_size = v.check_int("kernel_size", kernel_size, minimum=1)
    v.check_choice("pool", pool, POOLS)
    v.check_choice("operator", operator, OPERATORS)
    linearised = None if model is None else get_model(model).linearised
    shape = np.shape(image)
    if kernel_size > min(shape):
        raise ValueError(f"kernel_size={kernel_size} is larger than the image of shape {shape}; it must be <= {min(shape)}")
    if dtype is None:
        src = np.asarray(image).dtype if v.is_concrete(image) else jnp.asarray(image).dtype
        dtype = src if jnp.issubdtype(src, jnp.floating) else float
    dtype = jax.dtypes.canonicalize_dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating) or jnp.finfo(dtype).bits < 32:
        raise ValueError(f"dtype {np.dtype(dtype).name} is not supported (the image's own dtype unless dtype= is given); "
                         f"use float32 or float64: convert the image, e.g. image.astype('float32')")
    if v.is_concrete(image):
        with np.errstate(all="ignore"):
            peak = np.max(np.abs(np.asarray(image, np.float64)))
        if peak > float(jnp.finfo(dtype).max):
            raise ValueError(f"image holds {peak:.3g}, which overflows to inf in {np.dtype(dtype).name}; "
                             f"rescale the image or compute in float64 (jax.enable_x64)")
    img = jnp.asarray(image, dtype)
    backend = choose_operator(operator, image, img, kernel_size, linearised=linearised, max_rank=max_rank)
    # Ibar = C^T 1, by FFT whatever the back-end (it does not enter any stability bound).
    fft = backend if isinstance(backend, FFTOperator) else FFTOperator.build(img, kernel_size)
    window_sum = fft.adjoint(jnp.ones(fft.output_shape, dtype))
    return Problem(image=img, window_sum=window_sum, backend=backend, pool=pool)


# --- the set-up of a run ---------------------------------------------------------

_GUARD_FIELDS = ("safety", "guard")


@dataclasses.dataclass(frozen=True)
class Setup:
    """The model constants and the scheme of a run: everything but ``lr``, ``alpha``, ``k`` and the data.

    Frozen and validated on construction. ``model`` and ``scheme`` are given as values
    (:class:`~jaxcfl.pde.Model`, :class:`~jaxcfl.pde.Scheme`) or by name, and stored as values:
    a name is parsed here, once. :meth:`hyper` packs it with ``lr`` and ``alpha`` into the
    traced :class:`~jaxcfl.Hyper`; :meth:`to_dict` and :meth:`from_dict` round-trip it
    through a JSON manifest, which records the names.

    Attributes:
      model: the right-hand side, a :class:`~jaxcfl.pde.Model` (given as one or by a name of
        :data:`MODELS`); ``str(setup.model)`` is its name.
      scheme: the scheme, a :class:`~jaxcfl.pde.Scheme` (given as one or by name: ``"gd"``,
        eq 21, ``"nesterov"``, eqs 37-38, ``"guarded_gd"``, or an alias).
      pool: ``"sum"`` or ``"mean"`` (the ``c`` of eq 1).
      beta, a, label, bias: the model's constants (:class:`~jaxcfl.Hyper`).
      momentum: Nesterov's ``mu``.
      safety, guard: the CFL guard of the ``guarded_gd`` scheme: its margin (``Hyper.safety``)
        and its :class:`~jaxcfl.GuardSchedule`; recorded by :meth:`to_dict` only for
        that scheme.

    Example:
      >>> import jaxcfl
      >>> s = jaxcfl.Setup(model="nonlinear", scheme="euler", beta=5.0)
      >>> s.scheme.name, s.to_dict()["scheme"], jaxcfl.Setup.from_dict(s.to_dict()) == s
      ('gd', 'gd', True)
    """

    model: Model = "linear"  # type: ignore[assignment]  # a name is parsed in __post_init__
    scheme: Scheme = "gd"  # type: ignore[assignment]
    pool: str = "sum"
    beta: float = 1.0
    a: float = -0.5
    label: float = 1.0
    bias: float = 0.0
    momentum: float = 0.9
    safety: float = 0.9
    guard: GuardSchedule = GuardSchedule()

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", get_model(self.model))
        object.__setattr__(self, "scheme", get_scheme(self.scheme))
        v.check_safety("safety", self.safety)
        if np.ndim(self.safety) != 0:
            raise ValueError(f"safety must be a real scalar in a Setup, got shape {np.shape(self.safety)}")
        object.__setattr__(self, "safety", float(self.safety))
        if isinstance(self.guard, Mapping):  # its JSON form (from_dict)
            object.__setattr__(self, "guard", GuardSchedule(**self.guard))
        if not isinstance(self.guard, GuardSchedule):
            raise TypeError(f"guard must be a jaxcfl.GuardSchedule, got {type(self.guard).__name__}")
        v.check_choice("pool", self.pool, POOLS)
        for name in ("beta", "a", "label", "bias"):
            v.check_finite(name, getattr(self, name))
        v.check_unit_interval("momentum", self.momentum)
        for name in ("beta", "a", "label", "bias", "momentum"):
            value = getattr(self, name)
            if np.ndim(value) != 0:
                raise ValueError(f"{name} must be a real scalar in a Setup, got shape {np.shape(value)}")
            object.__setattr__(self, name, float(value))

    @property
    def rhs(self) -> RightHandSide:
        """The right-hand side ``G`` of :attr:`model`."""
        return self.model.gradient

    @property
    def guarded(self) -> bool:
        """Whether the scheme's step-size controller adapts the step (the CFL guard: ``guarded_gd``)."""
        return self.scheme.guarded

    @property
    def controller(self) -> StepSizeController:
        """The scheme's step-size controller with this set-up's :attr:`guard` as its schedule
        (its margin is :attr:`safety`, through :meth:`hyper`)."""
        return self.scheme.controller.with_schedule(self.guard)

    def hyper(self, lr: ArrayLike, alpha: ArrayLike, *, k: ArrayLike = 1.0, dtype: DTypeLike | None = None) -> Hyper:
        """:func:`~jaxcfl.make_hyper` with this set-up's constants; every field broadcast to ``lr``/``alpha``'s shape."""
        return make_hyper(lr, alpha, beta=self.beta, a=self.a, label=self.label, bias=self.bias, k=k,
                          mu=self.momentum, safety=self.safety, dtype=dtype)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form. The guard's numbers appear only for a guarded scheme, so an unguarded
        set-up keeps the identity (result-folder manifest) it had before the guard existed."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.update(model=self.model.name, scheme=self.scheme.name, guard=dataclasses.asdict(self.guard))
        if not self.guarded:
            for name in _GUARD_FIELDS:
                del out[name]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Setup:
        """The set-up recorded by :meth:`to_dict` (other keys, e.g. a sweep's, are ignored)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"Setup.from_dict needs a mapping, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls) if f.name not in _GUARD_FIELDS or f.name in data]
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"Setup.from_dict: missing {', '.join(missing)}")
        return cls(**{n: data[n] for n in names})

    def theory_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`jaxcfl.theory.windowed_alpha_bounds` for this set-up."""
        return dict(a=self.a, beta=self.beta, scheme=self.scheme, momentum=self.momentum, model=self.model,
                    pool=self.pool, label=self.label, bias=self.bias)


def setup_from(setup: Setup | None, caller: str, **fields: Any) -> Setup:
    """The :class:`Setup` of a public entry point that takes either ``setup=`` or the set-up's
    fields as keywords (``None``: not given). Both at once is refused, naming the keywords."""
    given = {name: value for name, value in fields.items() if value is not None}
    if setup is None:
        return Setup(**given)
    if not isinstance(setup, Setup):
        raise TypeError(f"setup must be a jaxcfl.Setup, got {type(setup).__name__} {setup!r:.60}")
    if given:
        raise TypeError(f"{caller}: pass the set-up either as setup= or as keywords, not both; got setup= and "
                        f"{', '.join(given)} (use dataclasses.replace(setup, ...) to change a Setup)")
    return setup
