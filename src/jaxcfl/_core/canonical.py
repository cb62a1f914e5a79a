"""Convolutions in the form XLA's CPU backend runs fast, inside loops too: :func:`canonical_convs`.

XLA's CPU compiler rewrites each convolution of the *entry* computation into its canonical
form, ``b01f_01io->b01f`` (input and output batch-first and channels-last, kernel ``HWIO``),
with explicit transposes around it, and runs that form with its Eigen/YNNPACK kernels. Inside
a ``while`` body (``lax.fori_loop``, ``lax.scan``) or a ``cond`` branch it does not: any other
form there is emitted as a naive loop nest, 5-50x slower, and slow to compile
(jax-ml/jax#12868). Derivatives make those forms: JAX writes the transposes and the tangents
of a convolution with permuted dimension numbers. :func:`jaxcfl.nn.nets.conv_general_dilated`
makes reverse-mode gradients canonical, but a Hessian-vector product (``jax.jvp`` of
``jax.grad``) also evaluates forward-mode tangents, and those are not: the built-in ``cnn``'s
product holds 5 non-canonical convolutions of 19, ``resnet20``'s 41 of 163.

``canonical_convs(fn)`` does the rewrite in JAX, on the traced program of ``fn``: every
convolution that is not canonical becomes the canonical one between explicit transposes, the
program XLA builds for the entry computation. Lanczos on Hessian-vector products
(:mod:`jaxcfl._core.spectral`, the CFL guard, :func:`jaxcfl.sharpness`) wraps its mat-vec in
it, so that its loop runs as fast as the same products unrolled.

The result is for evaluation, as a mat-vec is: calls (``jit``, ``remat``) are inlined, and so
are custom-derivative calls that hold a non-canonical convolution (their rules are dropped;
differentiate ``fn`` itself). A convolution inside a loop or branch *of* ``fn`` is left as it is.
A program without a non-canonical convolution is evaluated unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

__all__ = ["canonical_convs", "is_canonical", "non_canonical_convolutions"]

_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "remat2": "jaxpr", "checkpoint": "jaxpr"}
"""Call primitives whose body is inlined, and the parameter that holds it."""
_CUSTOM = {"custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr"}
"""Custom-derivative calls: inlined only when their body holds a non-canonical convolution."""


def _canonical_numbers(ndim: int) -> lax.ConvDimensionNumbers:
    """``b01f_01io->b01f`` for ``ndim``-dimensional operands."""
    spatial = tuple(range(1, ndim - 1))
    return lax.ConvDimensionNumbers((0, ndim - 1) + spatial, (ndim - 1, ndim - 2) + tuple(range(ndim - 2)),
                                    (0, ndim - 1) + spatial)


def is_canonical(dimension_numbers: lax.ConvDimensionNumbers, ndim: int) -> bool:
    """Whether a convolution's dimension numbers are XLA:CPU's canonical ``b01f_01io->b01f``."""
    return tuple(map(tuple, dimension_numbers)) == tuple(map(tuple, _canonical_numbers(ndim)))


def _sub_jaxprs(value: Any):
    """The jaxprs held by an equation parameter (a call's body, a loop's, a cond's branches)."""
    if isinstance(value, jcore.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jcore.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _sub_jaxprs(item)


def non_canonical_convolutions(jaxpr: Any) -> int:
    """How many convolutions of a (closed) jaxpr, its calls, loops and branches included, are not
    canonical: each one runs as a naive loop nest where it ends up inside a compiled loop on CPU.
    :class:`jaxcfl.Lockstep` counts them before it runs steps as a loop."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive is lax.conv_general_dilated_p:
            count += not is_canonical(eqn.params["dimension_numbers"], eqn.invars[0].aval.ndim)
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                count += non_canonical_convolutions(sub)
    return count


def _transpose(x, perm: tuple[int, ...]):
    return x if perm == tuple(range(len(perm))) else jnp.transpose(x, perm)


def _canonical_conv(lhs, rhs, *, dimension_numbers: lax.ConvDimensionNumbers, **params):
    """The convolution ``conv_general_dilated_p(lhs, rhs, ...)`` in canonical form between transposes."""
    ndim = len(dimension_numbers.lhs_spec)
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    # Axis j of a canonical operand is axis perm[j] of the given one; spatial axes keep their order.
    lhs = _transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
    rhs = _transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
    out = lax.conv_general_dilated_p.bind(lhs, rhs, dimension_numbers=_canonical_numbers(ndim), **params)
    return _transpose(out, tuple(int(i) for i in np.argsort((out_spec[0], *out_spec[2:], out_spec[1]))))


def _body(eqn) -> tuple[Any, tuple] | None:
    """``(jaxpr, consts)`` of an inlinable call (or custom-derivative call), else ``None``."""
    key = _CALLS.get(eqn.primitive.name) or _CUSTOM.get(eqn.primitive.name)
    sub = eqn.params.get(key) if key else None
    if sub is None:
        return None
    return (sub.jaxpr, tuple(sub.consts)) if hasattr(sub, "consts") else (sub, ())


def _needs_rewrite(jaxpr) -> bool:
    """Whether the program (its inlinable calls included) holds a non-canonical convolution."""
    for eqn in jaxpr.eqns:
        if eqn.primitive is lax.conv_general_dilated_p:
            if not is_canonical(eqn.params["dimension_numbers"], eqn.invars[0].aval.ndim):
                return True
        else:
            body = _body(eqn)
            if body is not None and _needs_rewrite(body[0]):
                return True
    return False


def _evaluate(jaxpr, consts, args) -> list:
    """The program's outputs (``jaxpr_as_fun``), with non-canonical convolutions rewritten and calls inlined."""
    env: dict = {}

    def read(var):
        return var.val if isinstance(var, jcore.Literal) else env[var]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        values = [read(var) for var in eqn.invars]
        body = _body(eqn)
        if eqn.primitive is lax.conv_general_dilated_p:
            outs = [_canonical_conv(*values, **eqn.params)]
        elif body is not None and (eqn.primitive.name in _CALLS or _needs_rewrite(body[0])):
            outs = _evaluate(body[0], body[1], values)
        else:
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))
            outs = outs if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs))
    return [read(var) for var in jaxpr.outvars]


def canonical_convs(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with every convolution in XLA:CPU's canonical form: fast inside loops and branches.

    Traces ``fn`` on its arguments (arrays or pytrees of arrays, positional) and evaluates the
    traced program with each non-canonical convolution written as the canonical one between
    explicit transposes (see the module docstring). The values are those of ``fn`` up to the
    summation order of the rewritten convolutions. Meant for mat-vecs that run inside a
    ``lax.fori_loop``, such as the Hessian-vector products of Lanczos; use it inside ``jit``.
    Where JAX's default backend is not the CPU, ``fn`` is called unchanged (GPU and TPU
    compilers lay out every convolution themselves).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> w = jnp.ones((3, 3, 2, 4))
      >>> conv = lambda x: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      >>> x = jnp.ones((1, 5, 5, 2))
      >>> hvp = lambda v: jax.jvp(jax.grad(lambda x: jnp.sum(conv(x) ** 2)), (x,), (v,))[1]
      >>> bool(jnp.allclose(canonical_convs(hvp)(x), hvp(x)))
      True
    """

    @functools.wraps(fn)
    def wrapped(*args):
        if jax.default_backend() != "cpu":  # GPU and TPU compilers choose convolution layouts themselves
            return fn(*args)
        closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        leaves = jax.tree.leaves(args)
        if _needs_rewrite(closed.jaxpr):
            out = _evaluate(closed.jaxpr, closed.consts, leaves)
        else:
            out = jcore.jaxpr_as_fun(closed)(*leaves)
        return jax.tree.unflatten(jax.tree.structure(shape), out)

    return wrapped
