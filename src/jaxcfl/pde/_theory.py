r"""Von Neumann amplifiers and CFL bounds (appendix D.3-D.5, E, F).

Every linearised model of :mod:`jaxcfl.pde._problem` has a gradient of the form
``G(K) = L K + alpha K + const``, with ``L`` symmetric. A scheme is stable when
every eigenvalue ``l`` of ``L`` satisfies ``0 < h (alpha + l) < S``:

==========  ===========================  ====================================
scheme      step ``h``                   ``S`` (exact, one eigen-mode)
==========  ===========================  ====================================
``gd``      ``dt``                       ``2``          (``|1 - h l| < 1``)
``nesterov`` ``(1 + mu) dt^2 / 2``        ``2 (1 + mu) / (1 + 2 mu)``
==========  ===========================  ====================================

The Nesterov interval is exact: one mode obeys ``K+ = x (1 + mu) K - x mu K-``
with ``x = 1 - h(alpha + l)``, and both roots of ``z^2 - x(1+mu) z + x mu`` lie
inside the unit circle iff ``-1/(1 + 2 mu) < x < 1``. ``guarded_gd`` (forward Euler
under the CFL guard) has ``gd``'s row at its nominal ``dt``. Every function here takes
these facts from the scheme's :class:`~jaxcfl.pde.Scheme` and the model's
:class:`~jaxcfl.pde.Model`, never from their names. Hence

    alpha_min = -l_min(L),    alpha_max = S / h - l_max(L).

*Paper bounds* (non-windowed, ``w -> infinity``): ``L`` is diagonalised by the
DFT with symbol ``l(w) = (c a beta / 2) |I(w)|^2`` (eq 23), giving eqs 26-27 for
``gd``; for ``nesterov`` the paper's eqs 45-47 use ``S / h = 4 / (3 dt^2)``,
the ``mu -> 1`` limit of the exact ``4 / ((1 + 2 mu) dt^2)`` (the paper states
that the damping does not matter; it does, slightly: at ``mu = 0.9`` the
exact limit is 1.43e8 for ``dt = 1e-4``, the paper's 1.33e8).

*Windowed bounds* (the system that is actually stepped, kernel confined to its
``w x w`` window): ``L = (c a beta / 2) W C^T C W`` for the linear model (plus
the rank-one term ``(c^2/4) s'(b) Ibar Ibar^T`` for the non-constant one, eq 29).
Its extreme eigenvalues are computed matrix-free by Lanczos with FFT mat-vecs
(:func:`jaxcfl.lanczos_extremes`), in float64. The paper found these
bounds only by trial (Table 5); here they are derived.

All results are returned as Python floats computed in float64: a lower bound
``-l_min`` next to an upper bound of order ``1e8`` needs more than float32's
seven digits when ``l_min`` is small.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial
from jax.typing import ArrayLike

from jaxcfl._core import validate as v
from jaxcfl.pde._problem import POOLS, as_kernel, make_hyper
from jaxcfl.pde._rhs import LINEAR, Model, RightHandSide, get_model
from jaxcfl.pde._schemes import Scheme, get_scheme
from jaxcfl.pde._setup import make_problem
from jaxcfl._core.spectral import Extremes, lanczos_extremes

__all__ = ["PAPER_MOMENTUM", "AlphaBounds", "step_size", "stability_limit", "growth_factor", "symbol",
    "amplifier", "alpha_bounds", "dt_bound", "multilayer_lr_bound", "activated_alpha_bounds",
    "windowed_spectrum", "local_spectrum", "windowed_alpha_bounds", "bounds_from_spectrum"]


class AlphaBounds(NamedTuple):
    """Stable weight decays ``alpha_min < alpha < alpha_max``."""

    alpha_min: float
    alpha_max: float


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


def _pool_scale(image_shape: tuple[int, int], kernel_size: int | None, pool: str) -> float:
    v.check_choice("pool", pool, POOLS)
    if pool == "sum":
        return 1.0
    w = 1 if kernel_size is None else kernel_size
    return 1.0 / ((image_shape[0] - w + 1) * (image_shape[1] - w + 1))


def _check_constants(**constants: float) -> None:
    """The model's constants must be finite real numbers (a NaN would make every bound NaN)."""
    for name, value in constants.items():
        v.check_finite(name, value)


def _image64(image: ArrayLike) -> np.ndarray:
    v.check_image(image)
    return np.asarray(image, dtype=np.float64)


def step_size(scheme: str | Scheme, lr: float, momentum: float = 0.9) -> float:
    """The gradient step ``h`` of a scheme: ``dt`` (eq 21) or ``(1 + mu) dt^2 / 2`` (eq 38)."""
    sch = get_scheme(scheme)
    v.check_positive("lr", lr)
    if sch.uses_momentum:
        v.check_unit_interval("momentum", momentum)
    return sch.step_size(lr, momentum)


def stability_limit(scheme: str | Scheme, lr: float, momentum: float = 0.9) -> float:
    """Exact upper limit on an eigenvalue ``alpha + l`` for stability: ``S / h``.

    ``2 / dt`` for ``gd``; ``4 / ((1 + 2 mu) dt^2)`` for ``nesterov``; in general the
    scheme's :attr:`~jaxcfl.pde.Scheme.limit` over its :attr:`~jaxcfl.pde.Scheme.step_size`.
    """
    sch = get_scheme(scheme)
    return sch.limit(momentum) / step_size(sch, lr, momentum)


def growth_factor(eigenvalue: ArrayLike, lr: float, *, scheme: str | Scheme = "gd", momentum: float = 0.9) -> np.ndarray:
    """Per-mode amplification of a linear mode with gradient eigenvalue ``alpha + l``.

    ``|1 - dt (alpha + l)|`` for ``gd`` (the ``|A(w)|`` of eq 23); the spectral
    radius of the 2x2 companion matrix ``[[x(1+mu), -x mu], [1, 0]]``,
    ``x = 1 - h (alpha + l)``, for ``nesterov`` (appendix E). A mode is stable
    iff its factor is < 1.
    """
    sch = get_scheme(scheme)
    lam = np.asarray(eigenvalue, dtype=np.float64)
    x = 1.0 - step_size(sch, lr, momentum) * lam
    return sch.factor(x, momentum)


# --- non-windowed (paper) theory ---------------------------------------------------

def symbol(
    image: ArrayLike,
    *,
    model: str | Model = "linear",
    a: float = -0.5,
    beta: float = 1.0,
    pool: str = "sum",
    label: float = 1.0,
    bias: float = 0.0,
    kernel_size: int | None = None,
) -> np.ndarray:
    """Fourier symbol ``l(w)`` of ``L`` for the non-windowed PDE, on the image's DFT grid.

    * ``linear`` (eq 23): ``(c a beta / 2) |I(w)|^2``.
    * ``nonconstant`` (eq 31): ``(c/2)(s(b) - y) beta |I(w)|^2 + (c^2/4) s'(b) |I(0)|^2 delta(w)``,
      with the discrete delta ``N0 N1 [w = 0]`` (the eigenvalue of the rank-one
      term on the periodic grid). Given ``kernel_size``, eq 33's windowed delta
      is used instead: ``|D_w(w)|^2 / w^2``, with ``D_w`` the DFT of the
      ``w x w`` box (peak ``w^2`` at ``w = 0``).
    * ``activated`` (eq 35): ``(c^2/2) s'(b) |I(0)|^2 delta(w)`` (``r' = 1``).
    * ``nonlinear``: its linearisation about ``K = 0``, the ``nonconstant`` symbol
      with ``a = s(b) - y``.
    """
    rhs = get_model(model)
    _check_constants(a=a, beta=beta, label=label, bias=bias)
    img = _image64(image)
    n0, n1 = img.shape
    c = _pool_scale(img.shape, kernel_size, pool)
    power = np.abs(np.fft.fft2(img)) ** 2
    s_b = _sigmoid(bias)
    ds_b = s_b * (1.0 - s_b)
    if kernel_size is None:
        delta = np.zeros_like(power)
        delta[0, 0] = n0 * n1
    else:
        box = np.zeros((n0, n1))
        box[:kernel_size, :kernel_size] = 1.0
        delta = np.abs(np.fft.fft2(box)) ** 2 / kernel_size**2
    # L = c a0 r1 beta C^T C (+ (c^2/2) r0 s'(b) Ibar Ibar^T for a(K)): jaxcfl.pde.Model.
    a0 = a if rhs.constant_residual else s_b - label
    lam = c * a0 * rhs.bend * beta * power if rhs.bend else np.zeros_like(power)
    if not rhs.constant_residual:
        lam = lam + 0.5 * c * c * ds_b * rhs.slope * power[0, 0] * delta
    return lam


def amplifier(
    image: ArrayLike,
    lr: float,
    alpha: float,
    *,
    model: str | Model = "linear",
    a: float = -0.5,
    beta: float = 1.0,
    pool: str = "sum",
    label: float = 1.0,
    bias: float = 0.0,
    kernel_size: int | None = None,
) -> np.ndarray:
    """The forward-Euler amplifier ``A(w) = 1 - dt (alpha + l(w))`` (eqs 23, 31, 33, D.5).

    Stability requires ``|A(w)| < 1`` for every frequency.
    """
    v.check_positive("lr", lr)
    v.check_nonnegative("alpha", alpha)
    lam = symbol(image, model=model, a=a, beta=beta, pool=pool, label=label, bias=bias, kernel_size=kernel_size)
    return 1.0 - float(lr) * (float(alpha) + lam)


PAPER_MOMENTUM = 1.0
"""The ``mu`` of the paper's closed forms: its Nesterov bounds (eqs 45-47) are the ``mu -> 1`` limit
of the exact ones; forward Euler's (eqs 24-27) do not depend on ``mu``."""


def _paper_limit(sch: Scheme, lr: float) -> float:
    # S / h at the paper's mu: eq 25, 2 / dt (gd, and the guarded gd's nominal step), and eq 45,
    # 4 / (3 dt^2) (nesterov); the paper's formulas do not have the momentum.
    return sch.limit(PAPER_MOMENTUM) / sch.step_size(lr, PAPER_MOMENTUM)


def alpha_bounds(
    image: ArrayLike,
    lr: float,
    *,
    a: float = -0.5,
    beta: float = 1.0,
    scheme: str | Scheme = "gd",
    momentum: float = 0.9,
    pool: str = "sum",
) -> AlphaBounds:
    """The paper's bounds on ``alpha`` for the non-windowed linearised PDE (lr means dt).

    ``gd``: eqs 26-27, ``-(a beta/2) max|I|^2 < alpha < 2/dt - (a beta/2) min|I|^2``.
    ``nesterov``: eqs 46-47, the same with ``4/(3 dt^2)`` for ``2/dt``. The paper's
    formulas do not involve ``momentum`` (accepted for a uniform signature).
    For ``a beta > 0`` the roles of min and max swap (same rule, general sign).

    Example:
      >>> import jaxcfl
      >>> lo, hi = jaxcfl.theory.alpha_bounds(jaxcfl.checkerboard(256), 1e-4, scheme="nesterov")
      >>> f"{lo:.3g} {hi:.3g}"
      '1.07e+09 1.33e+08'
    """
    sch = get_scheme(scheme)
    step_size(sch, lr, momentum)  # validates lr and momentum
    lam = symbol(image, model=LINEAR, a=a, beta=beta, pool=pool)
    return AlphaBounds(-float(lam.min()), _paper_limit(sch, float(lr)) - float(lam.max()))


def dt_bound(
    image: ArrayLike,
    alpha: float,
    *,
    a: float = -0.5,
    beta: float = 1.0,
    scheme: str | Scheme = "gd",
    pool: str = "sum",
) -> float:
    """The paper's CFL bound on ``dt`` (eq 24-25 for ``gd``, eq 45 for ``nesterov``).

    ``dt < 2 / (alpha + max l)`` or ``dt < 2 / sqrt(3 (alpha + max l))``; ``0`` when
    the lower condition ``alpha + min l > 0`` (eq 24/47) fails, so no ``dt`` is stable.
    ``guarded_gd`` has forward Euler's bound (that of its nominal step); in general the
    bound is the scheme's :meth:`~jaxcfl.pde.Scheme.dt_limit` at :data:`PAPER_MOMENTUM`.
    """
    sch = get_scheme(scheme)
    v.check_nonnegative("alpha", alpha)
    lam = symbol(image, model=LINEAR, a=a, beta=beta, pool=pool)
    lo, hi = float(alpha) + float(lam.min()), float(alpha) + float(lam.max())
    if lo <= 0:
        return 0.0
    return sch.dt_limit(hi, PAPER_MOMENTUM)


def multilayer_lr_bound(alpha: float, f_max: float = 0.0) -> float:
    """Appendix F: ``dt < min_w 2 / (alpha + F(w))`` (eq 50), which tends to ``2 / alpha`` (eq 51)."""
    v.check_positive("alpha", alpha)
    v.check_finite("f_max", f_max)
    return 2.0 / (float(alpha) + float(f_max))


def activated_alpha_bounds(
    image: ArrayLike,
    lr: float,
    *,
    kernel_size: int | None = None,
    label: float = 1.0,
    bias: float = 0.0,
    pool: str = "sum",
    scheme: str | Scheme = "gd",
    momentum: float = 0.9,
) -> AlphaBounds:
    """D.5, the activated regime: ``alpha > -q`` and ``alpha < min(S/h, S/h - q)``.

    ``q = (c^2/2) s'(b) E`` is the eigenvalue of the rank-one term of eq 35
    (the paper's ``Ibar^2 / 8`` for ``c = 1, b = 0``). ``E = ||Ibar_W||^2``, the squared
    windowed input sum, when ``kernel_size`` is given (exact for the windowed
    system); ``N0 N1 (sum I)^2`` for the periodic non-windowed one. ``S/h`` is
    ``2/dt`` for ``gd`` and the exact Nesterov limit otherwise. The modes
    orthogonal to ``Ibar`` add ``0 < alpha``, which the paper leaves implicit.
    """
    sch = get_scheme(scheme)
    img = _image64(image)
    c = _pool_scale(img.shape, kernel_size, pool)
    s_b = _sigmoid(bias)
    if kernel_size is None:
        energy = img.size * float(img.sum()) ** 2
    else:
        energy = float(np.sum(np.asarray(_window_sum64(img, kernel_size)) ** 2))
    q = 0.5 * c * c * s_b * (1.0 - s_b) * energy
    limit = stability_limit(sch, lr, momentum)
    return AlphaBounds(-q, min(limit, limit - q))


# --- windowed theory -----------------------------------------------------------------

def _window_sum64(img: np.ndarray, kernel_size: int) -> np.ndarray:
    with jax.enable_x64(True):
        return np.asarray(make_problem(img, kernel_size).window_sum)


def _operator_matvec(grad, problem, hyper, flat):
    """``L v``: the Jacobian at ``K = 0`` of ``G(K) - alpha K`` (alpha is zero in ``hyper``)."""
    w = problem.kernel_size
    zero = jnp.zeros((w, w), flat.dtype)
    _, tangent = jax.jvp(lambda k: grad(problem, k, hyper), (zero,), (flat.reshape(w, w),))
    return tangent.reshape(-1)


def _local_matvec(grad, problem, kernel, hyper, flat):
    """``J v``: the Jacobian of ``G`` (weight decay included) at ``kernel``."""
    _, tangent = jax.jvp(lambda k: grad(problem, k, hyper), (kernel,), (flat.reshape(kernel.shape),))
    return tangent.reshape(-1)


@functools.lru_cache(maxsize=None)
def _matvec(kind, grad: RightHandSide):
    """One function per right-hand side (and kind of mat-vec), the same object on every call, so that
    Partial's tree structure (and the compiled Lanczos solver) is reused across calls."""
    return functools.partial(kind, grad)


def windowed_spectrum(
    image: ArrayLike,
    kernel_size: int,
    *,
    model: str | Model = "linear",
    a: float = -0.5,
    beta: float = 1.0,
    pool: str = "sum",
    label: float = 1.0,
    bias: float = 0.0,
    iterations: int | None = None,
) -> Extremes:
    """Extreme eigenvalues of the windowed operator ``L`` (``G = L K + alpha K + const``).

    ``L`` is the Jacobian of the model's gradient (without weight decay) at
    ``K = 0``, applied matrix-free with FFT correlations: ``(c a beta/2) W C^T C W``
    for ``linear``; plus ``(c^2/4) s'(b) Ibar Ibar^T`` with ``a = s(b) - y`` for
    ``nonconstant`` and ``nonlinear`` (eq 29); ``(c^2/2) s'(b) Ibar Ibar^T`` for
    ``activated``. Lanczos in float64, ``min(w^2, 128)`` iterations by default.
    """
    rhs = get_model(model)
    _check_constants(a=a, beta=beta, label=label, bias=bias)
    with jax.enable_x64(True):
        problem = make_problem(_image64(image), kernel_size, pool=pool, dtype=jnp.float64)
        hyper = make_hyper(1.0, 0.0, beta=beta, a=a, label=label, bias=bias, dtype=jnp.float64)
        matvec = Partial(_matvec(_operator_matvec, rhs.gradient), problem, hyper)
        start = jax.random.normal(jax.random.key(1), (kernel_size * kernel_size,), jnp.float64)
        return lanczos_extremes(matvec, start, iterations=iterations, key=jax.random.key(2))


def local_spectrum(problem, kernel: ArrayLike, hyper, *, model: str | Model = "nonlinear",
                   iterations: int | None = None) -> Extremes:
    """Extreme eigenvalues of the local operator of the PDE: the Jacobian of ``G`` at ``kernel``.

    For the nonlinear model this is the Hessian of the loss of eq 2, weight decay included;
    its top eigenvalue is what the guarded scheme (``guarded_gd``) keeps below
    ``2 safety / dt``, and a negative bottom eigenvalue is a mode that grows for every step
    size (the gradient flow itself is unstable there). Lanczos (:func:`jaxcfl.lanczos_extremes`)
    in the problem's dtype, ``min(w^2, 128)`` iterations by default.

    Args:
      problem: from :func:`jaxcfl.make_problem`.
      kernel: the ``w x w`` kernel ``K``.
      hyper: from :func:`jaxcfl.make_hyper` (``alpha`` and the model's constants are used).
      model: the right-hand side, a :class:`~jaxcfl.pde.Model` or a name of :data:`jaxcfl.MODELS`.
      iterations: Krylov dimension.
    """

    rhs = get_model(model)
    kernel = as_kernel(problem, kernel)
    matvec = Partial(_matvec(_local_matvec, rhs.gradient), problem, kernel, hyper)
    start = jax.random.normal(jax.random.key(1), (kernel.size,), kernel.dtype)
    return lanczos_extremes(matvec, start, iterations=iterations, key=jax.random.key(2))


def windowed_alpha_bounds(
    image: ArrayLike,
    kernel_size: int,
    lr: float,
    *,
    a: float = -0.5,
    beta: float = 1.0,
    scheme: str | Scheme = "gd",
    momentum: float = 0.9,
    model: str | Model = "linear",
    pool: str = "sum",
    label: float = 1.0,
    bias: float = 0.0,
    iterations: int | None = None,
) -> AlphaBounds:
    r"""Exact stability bounds on ``alpha`` for the windowed linearised scheme.

    Derivation: the stepped system is ``K+ = K - h (L + alpha) K + const`` (gd)
    or its Nesterov analogue, with ``L`` the symmetric windowed operator of
    :func:`windowed_spectrum`. In the eigenbasis of ``L`` the modes decouple and
    each is stable iff ``0 < h (alpha + l) < S`` (module docstring). All modes
    are stable iff ``-l_min < alpha < S/h - l_max``. The extreme eigenvalues
    come from Lanczos with FFT mat-vecs, so ``w = 64`` on a 256 image takes
    seconds. These are the bounds the paper found by trial (Table 5).

    Args:
      image: 2-D image.
      kernel_size: window ``w``.
      lr: ``dt`` (for ``nesterov`` the step is ``(1 + mu) dt^2/2``).
      a, beta, label, bias, pool, model: as in :func:`jaxcfl.make_problem` / :func:`jaxcfl.make_hyper`.
      scheme: a :class:`~jaxcfl.pde.Scheme` or its name (``"gd"``, ``"nesterov"``, ...).
      momentum: ``mu`` (nesterov only).
      iterations: Lanczos iterations.

    Returns:
      :class:`AlphaBounds` ``(alpha_min, alpha_max)``; ``alpha_min`` may be
      negative (no lower bound) and ``alpha_max < alpha_min`` means no stable alpha.
    """
    sch = get_scheme(scheme)
    stability_limit(sch, lr, momentum)  # validate before the expensive part
    ext = windowed_spectrum(image, kernel_size, model=model, a=a, beta=beta, pool=pool, label=label, bias=bias, iterations=iterations)
    return bounds_from_spectrum(ext, lr, scheme=sch, momentum=momentum)


def bounds_from_spectrum(spectrum: Extremes, lr: float, *, scheme: str | Scheme = "gd",
                         momentum: float = 0.9) -> AlphaBounds:
    """``(-l_min, S/h - l_max)`` from a precomputed :func:`windowed_spectrum` (reuse it across lr and schemes)."""
    return AlphaBounds(-spectrum.minimum, stability_limit(scheme, lr, momentum) - spectrum.maximum)
