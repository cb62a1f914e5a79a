"""The 1-D heat equation with forward Euler: Section 3 of Sun et al. (2024).

Section 3 of the paper ("A PDE-based explanation of extreme numerical
sensitivities ...") shows the effect on the simplest example: ``u_t = u_xx``
on 31 nodes ``i = 0..30`` with ``dx = 1``. The ends are held with
``u_xx = 0``, so the end nodes never change. The initial data is a tent,
``u0[i] = i/10`` for ``i < 15`` and ``(30 - i)/10`` otherwise. Forward Euler
updates the interior nodes::

    u_i <- u_i + dt/dx^2 (u_{i+1} - 2 u_i + u_{i-1})

The scheme is stable when ``dt <= dx^2/2`` (the CFL condition). The paper uses
``dt = 0.4`` (stable) and ``dt = 0.8`` (unstable), with snapshots at
``t = 0.8, 2.4, 4``. A one-ulp change to the initial data is damped when the
CFL condition holds and amplified when it fails (see
:func:`perturbation_growth`).

Everything here is pure JAX. The number of steps is static and ``dt`` is a
traced value, so changing ``dt`` with the same step count does not recompile.
Arrays are float32 by default, float64 under ``jax.enable_x64(True)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax
from jax.typing import ArrayLike, DTypeLike

from jaxcfl._core import validate as v
__all__ = [
    "PerturbationGrowth",
    "perturbation_growth",
    "snapshots",
    "solve",
    "step",
    "tent",
    "von_neumann_factor",
]

PAPER_TIMES = (0.8, 2.4, 4.0)
"""Times of the snapshots in the paper's Figure 1 (Section 3)."""


class PerturbationGrowth(NamedTuple):
    """Result of :func:`perturbation_growth`.

    Attributes:
      delta: array of shape ``(steps + 1,)``; ``delta[k]`` is
        ``max |u_k - u~_k|`` between the plain and the perturbed run after
        ``k`` steps (``delta[0]`` is the one-ulp change itself).
      factor: measured growth of ``delta`` per step, the geometric mean of
        ``delta[k+1] / delta[k]`` over the last half of the steps where both
        are nonzero and finite (NaN if there are none).
      von_neumann: the von Neumann factor ``max_j |G_j|`` of the grid
        (:func:`von_neumann_factor`).
    """

    delta: Array
    factor: float
    von_neumann: float


# ---------------------------------------------------------------------------
# checks


def _float_dtype(dtype: DTypeLike | None) -> np.dtype:
    """``dtype``, or JAX's default float (float32, float64 under x64)."""
    return jnp.zeros((), dtype if dtype is not None else float).dtype


def _check_dt(dt: Any) -> Any:
    return v.check_positive("dt", dt)


def _check_n(n: Any) -> int:
    return v.check_int("n", n, minimum=3)


def _concrete_float(name: str, value: Any) -> float:
    """``value`` as a host float; it sets a static step count, so it cannot be traced."""
    if not v.is_concrete(value):
        raise TypeError(f"{name} must be a concrete number here (it sets the number of steps), got a traced value")
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != ():
        raise ValueError(f"{name} must be a scalar, got shape {arr.shape}")
    return float(arr)


def _check_grid(name: str, u: ArrayLike) -> Array:
    """A floating array whose last axis is the grid, at least 3 nodes long."""
    u = jnp.asarray(u)
    if u.ndim < 1 or u.shape[-1] < 3:
        raise ValueError(f"{name} must have at least 3 grid nodes on its last axis, got shape {u.shape}")
    if not jnp.issubdtype(u.dtype, jnp.floating):
        u = u.astype(_float_dtype(None))
    v.check_finite(name, u)
    return u


MAX_STEPS = 10_000_000
"""The most steps :func:`solve` and :func:`snapshots` take unless told ``max_steps=None`` (about a minute on a CPU)."""


def _n_steps(dt: float, t: float, max_steps: int | None = MAX_STEPS) -> int:
    """``round(t / dt)``, the number of steps that reach ``t``; refused above ``max_steps``."""
    steps = round(t / dt)
    if max_steps is not None and steps > max_steps:
        raise ValueError(f"reaching t = {t:g} with dt = {dt:g} takes {steps:.3g} steps, more than max_steps={max_steps:g}; "
                         f"take a larger dt, or pass max_steps=None (--long on the command line) to run it anyway")
    return int(steps)


# ---------------------------------------------------------------------------
# the scheme


def tent(n: int = 31, dtype: DTypeLike | None = None) -> Array:
    """The tent initial condition of Section 3.

    ``u0[i] = i/10`` for ``i < n//2`` and ``(n-1-i)/10`` otherwise; for
    ``n = 31`` this is the paper's ``i/10`` for ``i < 15``, ``(30-i)/10``
    otherwise (peak 1.5 at the middle node, zero at both ends).

    Args:
      n: number of grid nodes, at least 3.
      dtype: floating dtype; defaults to JAX's default float (float32, or
        float64 under ``jax.enable_x64``).

    Returns:
      An array of shape ``(n,)``; each entry is ``i/10`` correctly rounded to
      ``dtype``.

    Example:
      >>> from jaxcfl import heat
      >>> heat.tent(7).tolist()  # doctest: +ELLIPSIS
      [0.0, 0.1..., 0.2..., 0.3..., 0.2..., 0.1..., 0.0]
    """
    n = _check_n(n)
    i = np.arange(n)
    # i/10 in float64 on the host, then one rounding to ``dtype``.
    values = np.where(i < n // 2, i, n - 1 - i) / 10.0
    return jnp.asarray(values, dtype=_float_dtype(dtype))


def _step(u: Array, r: Array) -> Array:
    """Forward Euler on the interior nodes (last axis), ``r = dt/dx^2``."""
    lap = (u[..., 2:] - 2 * u[..., 1:-1]) + u[..., :-2]
    return u.at[..., 1:-1].set(u[..., 1:-1] + r * lap)


def step(u: ArrayLike, dt: ArrayLike, dx: ArrayLike = 1.0) -> Array:
    """One forward-Euler step of ``u_t = u_xx`` (Section 3); the ends are held fixed.

    ``u_i <- u_i + dt/dx^2 (u_{i+1} - 2 u_i + u_{i-1})`` for the interior
    nodes; ``u_0`` and ``u_{n-1}`` are returned unchanged (``u_xx = 0`` there).

    Args:
      u: grid values on the last axis (leading axes are a batch), at least 3
        nodes.
      dt: time step, > 0. May be traced (the function is ``jit``-compatible).
      dx: grid spacing, > 0.

    Returns:
      ``u`` after one step, same shape and dtype.
    """
    u = _check_grid("u", u)
    _check_dt(dt)
    v.check_positive("dx", dx)
    dt = jnp.asarray(dt, dtype=u.dtype)
    dx = jnp.asarray(dx, dtype=u.dtype)
    return _step(u, dt / (dx * dx))


@functools.partial(jax.jit, static_argnames=("steps",))
def _run(u0: Array, dt: Array, dx: Array, steps: int) -> Array:
    """``steps`` forward-Euler steps from ``u0``; only ``steps`` is static."""
    r = dt / (dx * dx)
    return lax.fori_loop(0, steps, lambda _, u: _step(u, r), u0)


@functools.partial(jax.jit, static_argnames=("steps",))
def _run_record(u0: Array, dt: Array, dx: Array, at: Array, steps: int) -> Array:
    """Run ``steps`` steps and keep ``u`` after ``at[m]`` steps in row ``m``."""
    r = dt / (dx * dx)
    out = jnp.broadcast_to(u0, at.shape + u0.shape)
    keep = (at == 0).reshape(at.shape + (1,) * u0.ndim)
    out = jnp.where(keep, u0, out)

    def body(k, carry):
        u, out = carry
        u = _step(u, r)
        keep = (at == k + 1).reshape(at.shape + (1,) * u.ndim)
        return u, jnp.where(keep, u, out)

    _, out = lax.fori_loop(0, steps, body, (u0, out))
    return out


@functools.partial(jax.jit, static_argnames=("steps",))
def _run_pair(u0: Array, u1: Array, dt: Array, dx: Array, steps: int) -> Array:
    """``max |u - u~|`` after each of ``0..steps`` steps of both runs."""
    r = dt / (dx * dx)

    def body(carry, _):
        u, w = carry
        u, w = _step(u, r), _step(w, r)
        return (u, w), jnp.max(jnp.abs(u - w))

    _, delta = lax.scan(body, (u0, u1), None, length=steps)
    return jnp.concatenate([jnp.max(jnp.abs(u0 - u1))[None], delta])


def _setup(dt: Any, u0: ArrayLike | None, dx: Any, n: int) -> tuple[float, Array, Array, Array]:
    dt_f = _concrete_float("dt", _check_dt(dt))
    v.check_positive("dx", dx)
    u0 = tent(_check_n(n)) if u0 is None else _check_grid("u0", u0)
    return dt_f, u0, jnp.asarray(dt, dtype=u0.dtype), jnp.asarray(dx, dtype=u0.dtype)


def solve(dt: ArrayLike, t_end: float, *, u0: ArrayLike | None = None, dx: ArrayLike = 1.0, n: int = 31,
          max_steps: int | None = MAX_STEPS) -> Array:
    """``u`` at ``t_end`` by forward Euler (Section 3).

    Takes exactly ``round(t_end / dt)`` steps (Python ``round`` of the float
    ratio: ``t_end = 2.4, dt = 0.8`` gives 3 steps). The step count is static
    and ``dt`` is traced in the compiled loop, so another ``dt`` with the same
    step count reuses the compiled code.

    Args:
      dt: time step, finite and > 0 (stable for ``dt <= dx^2 / 2``).
      t_end: final time, finite and >= 0.
      u0: initial data (grid on the last axis); defaults to :func:`tent`.
      dx: grid spacing, > 0.
      n: number of nodes of the default tent, at least 3; ignored when ``u0``
        is given.
      max_steps: refuse a run of more steps (``ValueError``); ``None``: no limit.

    Returns:
      ``u`` after ``round(t_end / dt)`` steps, with the shape and dtype of ``u0``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxcfl import heat
      >>> stable = heat.solve(0.4, 4.0)     # 10 steps, CFL holds: damped
      >>> unstable = heat.solve(0.8, 4.0)   # 5 steps, CFL fails: oscillates and grows
      >>> bool(jnp.max(jnp.abs(stable)) <= 1.5), bool(jnp.max(jnp.abs(unstable)) > 1.5)
      (True, True)
      >>> float(stable[0]), float(stable[-1])  # the ends never change
      (0.0, 0.0)
    """
    t = _concrete_float("t_end", v.check_nonnegative("t_end", t_end))
    dt_f, u0, dt_a, dx_a = _setup(dt, u0, dx, n)
    return _run(u0, dt_a, dx_a, steps=_n_steps(dt_f, t, max_steps))


def snapshots(dt: ArrayLike, times: Sequence[float] = PAPER_TIMES, **kw: Any) -> Array:
    """``u`` at each of ``times``, from one forward-Euler run (Figure 1 of Section 3).

    Row ``m`` equals ``solve(dt, times[m], **kw)``: it holds ``u`` after
    ``round(times[m] / dt)`` steps.

    Args:
      dt: time step, finite and > 0.
      times: snapshot times, each finite and >= 0 (any order); the default
        is the paper's ``(0.8, 2.4, 4.0)``.
      **kw: ``u0``, ``dx``, ``n`` and ``max_steps`` as in :func:`solve`.

    Returns:
      An array of shape ``(len(times), n)`` (or ``(len(times),) + u0.shape``).
    """
    unknown = set(kw) - {"u0", "dx", "n", "max_steps"}
    if unknown:
        raise TypeError(f"snapshots() got unexpected keyword arguments {sorted(unknown)}")
    ts = np.asarray(v.check_nonnegative("times", times), dtype=np.float64)
    if ts.ndim != 1 or ts.size == 0:
        raise ValueError(f"times must be a non-empty 1-D sequence, got shape {ts.shape}")
    dt_f, u0, dt_a, dx_a = _setup(dt, kw.get("u0"), kw.get("dx", 1.0), kw.get("n", 31))
    at = np.array([_n_steps(dt_f, float(t), kw.get("max_steps", MAX_STEPS)) for t in ts], dtype=np.int32)
    return _run_record(u0, dt_a, dx_a, jnp.asarray(at), steps=int(at.max()))


# ---------------------------------------------------------------------------
# stability


def von_neumann_factor(dt: float, dx: float = 1.0, n: int | None = 31) -> float:
    """Largest amplification ``|G|`` of one forward-Euler step (Section 3).

    A discrete sine mode ``sin(j pi i / (n-1))`` is multiplied each step by
    ``G_j = 1 - 4 r sin^2(j pi / (2 (n-1)))`` with ``r = dt / dx^2``. With the
    ends fixed the grid carries the modes ``j = 1..n-2``; this returns
    ``max_j |G_j|``. With ``n=None`` it returns the continuous bound
    ``max_{theta in [0, pi]} |1 - 4 r sin^2(theta/2)| = max(1, |1 - 4 r|)``,
    which exceeds 1 exactly when ``dt > dx^2 / 2``.

    For ``n = 31``: ``dt = 0.4`` gives about 0.9956 (the slowest mode ``j = 1``
    decays slowly) and ``dt = 0.8`` about 2.191 (the ``j = 29`` mode grows).

    Args:
      dt: time step, finite and > 0.
      dx: grid spacing, finite and > 0.
      n: number of grid nodes (at least 3), or ``None`` for the continuous bound.

    Returns:
      The factor as a Python float.
    """
    r = _concrete_float("dt", _check_dt(dt)) / _concrete_float("dx", v.check_positive("dx", dx)) ** 2
    if n is None:
        return max(1.0, abs(1.0 - 4.0 * r))
    n = _check_n(n)
    j = np.arange(1, n - 1)
    g = 1.0 - 4.0 * r * np.sin(j * np.pi / (2 * (n - 1))) ** 2
    return float(np.max(np.abs(g)))


def _growth_factor(delta: np.ndarray) -> float:
    """Geometric mean of ``delta[k+1]/delta[k]`` over the last half of the steps."""
    steps = delta.size - 1
    lo, hi = delta[steps // 2 : steps], delta[steps // 2 + 1 :]
    ok = (lo > 0) & (hi > 0) & np.isfinite(lo) & np.isfinite(hi)
    if not np.any(ok):
        return math.nan
    return float(np.exp(np.mean(np.log(hi[ok]) - np.log(lo[ok]))))


def perturbation_growth(
    dt: float,
    steps: int,
    *,
    index: int | None = None,
    dx: float = 1.0,
    n: int = 31,
    dtype: DTypeLike | None = None,
) -> PerturbationGrowth:
    """How a last-bit change of the initial data evolves (Section 3).

    Runs the :func:`tent` and a copy with one interior entry moved by one ulp
    (``jnp.nextafter`` toward ``+inf``), both by forward Euler in ``dtype``,
    and records their largest difference after every step.

    How the measurement compares with von Neumann analysis:

    * ``dt = 0.8`` (CFL fails, ``n = 31``): the difference grows geometrically
      and ``factor`` approaches ``von_neumann`` (about 2.19), the
      amplification of the highest sine mode ``j = 29``. It stays slightly
      below (about 2.15-2.18 after 30-60 steps, float32 or float64) because
      the next odd modes (``|G_27|`` about 2.12) fade only slowly. In float32
      the last bit reaches the leading digits in about 20 steps.
    * ``dt = 0.4`` (CFL holds): every mode is damped, so the difference never
      leaves rounding level: it decays, often to exactly 0 (then ``factor``
      is NaN), or sits at an ulp or two, where ``factor`` measures rounding
      noise and is about 1, not growth.

    Args:
      dt: time step, finite and > 0.
      steps: number of steps, a positive int.
      index: interior node to perturb, ``1 <= index <= n-2``; defaults to the
        middle node ``n // 2`` (the tent's peak).
      dx: grid spacing, finite and > 0.
      n: number of grid nodes, at least 3.
      dtype: floating dtype; defaults to JAX's default float (float32, or
        float64 under ``jax.enable_x64``).

    Returns:
      A :class:`PerturbationGrowth` with ``delta`` (shape ``(steps + 1,)``),
      the measured ``factor`` and the ``von_neumann`` factor.
    """
    steps = v.check_int("steps", steps, minimum=1)
    n = _check_n(n)
    if index is None:
        index = n // 2
    index = v.check_int("index", index, minimum=1)
    if index > n - 2:
        raise ValueError(f"index must be an interior node, 1 <= index <= {n - 2}, got {index}")
    vn = von_neumann_factor(dt, dx, n)
    u0 = tent(n, dtype)
    u1 = u0.at[index].set(jnp.nextafter(u0[index], jnp.asarray(jnp.inf, u0.dtype)))
    dt_a = jnp.asarray(dt, dtype=u0.dtype)
    dx_a = jnp.asarray(dx, dtype=u0.dtype)
    delta = _run_pair(u0, u1, dt_a, dx_a, steps=steps)
    return PerturbationGrowth(delta=delta, factor=_growth_factor(np.asarray(delta, dtype=np.float64)), von_neumann=vn)
