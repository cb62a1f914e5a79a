"""The FFT back-end's pruned transforms, and the integrator's sharing of a record's correlation with a step."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.lib.stride_tricks import sliding_window_view

import jaxcfl
from jaxcfl.pde import _operators as ops
from jaxcfl.pde._integration import SaveAt, solve
from jaxcfl.pde._rhs import loss
from jaxcfl.pde._state import init


def _np_correlate(image, kernel):
    return np.einsum("xyij,ij->xy", sliding_window_view(image, kernel.shape), kernel)


def _np_adjoint(image, u, w):
    return np.einsum("ijxy,xy->ij", sliding_window_view(image, u.shape)[:w, :w], u)


def _tol(dtype):
    return 1e-12 if jnp.dtype(dtype) == jnp.float64 else 2e-6


# --- the transforms ---------------------------------------------------------------------

@pytest.mark.parametrize("rows, cols, shape", [(3, 5, (8, 6)), (8, 6, (8, 6)), (1, 1, (5, 7)), (4, 7, (9, 7))])
@pytest.mark.slow_in_float64
def test_pruned_transforms_match_numpy_rfft2(dtype, rows, cols, shape):
    rng = np.random.default_rng(rows * 10 + cols)
    x = rng.standard_normal((rows, cols))
    got = np.asarray(ops._rfft2_t(jnp.asarray(x, dtype), shape))
    want = np.fft.rfft2(x, s=shape).T  # transposed: (shape[1] // 2 + 1, shape[0])
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=_tol(dtype) * np.abs(want).max())
    # The inverse keeps the top-left block of irfft2 (any block size up to the full shape).
    spectrum = np.fft.rfft2(rng.standard_normal(shape))
    for out in [(rows, cols), shape, (1, shape[1])]:
        got = np.asarray(ops._irfft2_t(jnp.asarray(spectrum.T, jnp.result_type(dtype, jnp.complex64)), shape, out))
        want = np.fft.irfft2(spectrum, s=shape)[: out[0], : out[1]]
        np.testing.assert_allclose(got, want, atol=_tol(dtype) * np.abs(want).max())


def test_pruned_transforms_agree_with_the_unpruned_jax_ones():
    """The same 1-D passes as ``jnp.fft.rfft2``/``irfft2`` of the padded arrays: equal to float32 rounding."""
    rng = np.random.default_rng(0)
    shape = (64, 48)
    k = jnp.asarray(rng.standard_normal((9, 9)), jnp.float32)
    full = jnp.fft.rfft2(k, s=shape)
    np.testing.assert_allclose(np.asarray(ops._rfft2_t(k, shape)).T, np.asarray(full), rtol=0,
                               atol=1e-6 * float(jnp.max(jnp.abs(full))))
    inv = jnp.fft.irfft2(full, s=shape)[:20, :30]
    np.testing.assert_allclose(np.asarray(ops._irfft2_t(full.T, shape, (20, 30))), np.asarray(inv), rtol=0,
                               atol=1e-6 * float(jnp.max(jnp.abs(inv))))


@settings(max_examples=6, deadline=None)
@given(n0=st.integers(1, 12), n1=st.integers(1, 12), w=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_fft_operator_matches_dense_correlations(n0, n1, w, seed):
    """Any image shape (odd, even, non-square) and kernel size: ``C``, ``C^T`` and their adjointness."""
    w = min(w, n0, n1)
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((n0, n1))
    op = ops.FFTOperator.build(jnp.asarray(image, jnp.float32), w)
    k, u = rng.standard_normal((w, w)), rng.standard_normal(op.output_shape)
    z = np.asarray(op.correlate(jnp.asarray(k, jnp.float32)), np.float64)
    adj = np.asarray(op.adjoint(jnp.asarray(u, jnp.float32)), np.float64)
    scale = np.abs(image).sum() * max(np.abs(k).max(), np.abs(u).max())
    assert z.shape == op.output_shape and adj.shape == (w, w)
    np.testing.assert_allclose(z, _np_correlate(image, k), atol=2e-6 * scale)
    np.testing.assert_allclose(adj, _np_adjoint(image, u, w), atol=2e-6 * scale)
    # <C K, u> = <K, C^T u>
    assert abs(np.sum(z * u) - np.sum(k * adj)) <= 1e-5 * scale * u.size
    np.testing.assert_allclose(np.asarray(op.image_hat), np.fft.rfft2(image), atol=1e-5 * np.abs(image).sum())


@pytest.mark.slow_in_float64
def test_fft_operator_under_vmap_equals_single_calls(dtype):
    rng = np.random.default_rng(1)
    op = ops.FFTOperator.build(jnp.asarray(rng.standard_normal((20, 17)), dtype), 5)
    ks = jnp.asarray(rng.standard_normal((3, 5, 5)), dtype)
    batched = jax.jit(jax.vmap(op.normal))(ks)
    single = jax.jit(op.normal)
    for i in range(3):
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(single(ks[i])), rtol=_tol(dtype),
                                   atol=_tol(dtype) * float(jnp.max(jnp.abs(batched))))


# --- records share the step's correlation ----------------------------------------------------

@pytest.mark.parametrize("save, steps", [(SaveAt(1), 5), (SaveAt(3, offset=1, initial=False), 10), (SaveAt(4), 11)])
def test_recorded_losses_are_those_of_the_recorded_kernels(save, steps):
    """The rotated record loop (record, then advance) records the state at each record iteration."""
    rng = np.random.default_rng(2)
    prob = jaxcfl.make_problem(rng.standard_normal((14, 13)).astype(np.float32), 4, operator="fft")
    hyper = jaxcfl.make_hyper(0.02, 0.5)
    k0 = jnp.asarray(rng.standard_normal((4, 4)) * 0.3, jnp.float32)
    sol = solve(prob, init(k0), hyper, scheme="gd", model="nonlinear", steps=steps, save=save)
    iterations = save.iterations(steps)
    np.testing.assert_array_equal(sol.diagnostics.iteration, iterations)
    step = jax.jit(lambda k: k - hyper.lr * jaxcfl.pde.gradient(prob, k, hyper, "nonlinear"))
    loss_of = jax.jit(lambda k: loss(prob, k, hyper))
    kernels = [k0]
    for _ in range(steps):
        kernels.append(step(kernels[-1]))
    for i, t in enumerate(iterations):
        np.testing.assert_allclose(sol.diagnostics.loss[i], loss_of(kernels[t]), rtol=1e-5)
        np.testing.assert_allclose(sol.diagnostics.kernel_norm[i], np.linalg.norm(np.asarray(kernels[t])), rtol=1e-5)
    assert int(sol.state.iteration) == steps


def _fft_counts_per_loop_body(hlo: str) -> list[int]:
    """FFT instructions of each while-loop body of an optimised HLO module, nested loops not included."""
    bodies, comps, name = {}, {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            name = head.group(1)
            comps[name] = []
        elif name is not None:
            comps[name].append(line)
    for lines in comps.values():
        for line in lines:
            m = re.search(r"\bwhile\(.*body=%?([\w.\-]+)", line)
            if m:
                bodies[m.group(1)] = True

    def count(comp, seen):
        n = 0
        for line in comps.get(comp, []):
            n += bool(re.search(r"= \S+ fft\(", line))
            if re.search(r"\bwhile\(", line):
                continue  # a nested loop is its own body
            for callee in re.findall(r"(?:calls|to_apply|branch_computations|called_computations)=\{?%?([\w.\-, %]+)", line):
                for c in re.split(r"[,\s%]+", callee):
                    if c and c not in seen:
                        seen.add(c)
                        n += count(c, seen)
        return n

    return [count(b, {b}) for b in bodies]


@pytest.mark.parametrize("stride", [1, 3])
def test_a_recorded_loss_costs_no_extra_transforms(stride):
    """gd on the nonlinear model: each loop body runs the gradient's eight 1-D FFT passes (``C K`` and
    ``C^T u``, two each way); the recorded loss's ``C K`` is the gradient's own (XLA's CSE), not four more."""
    rng = np.random.default_rng(3)
    prob = jaxcfl.make_problem(rng.standard_normal((16, 16)).astype(np.float32), 4, operator="fft")
    hyper = jaxcfl.make_hyper(0.01, 1.0)
    run = jax.jit(lambda k: solve(prob, init(k), hyper, scheme="gd", model="nonlinear", steps=4 * stride,
                                  save=SaveAt(stride, initial=False)).diagnostics.loss)
    hlo = run.lower(jnp.ones((4, 4), jnp.float32)).compile().as_text()
    counts = [n for n in _fft_counts_per_loop_body(hlo) if n]
    assert counts and all(n == 8 for n in counts), counts
