"""Plots: stability maps with the theoretical CFL curves, loss and divergence curves, sharpness
(Edge of Stability) and appendix F's max-stable-lr ratio.

matplotlib is imported lazily (the Agg backend is used when no display is set),
so importing :mod:`jaxcfl` never needs it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxcfl._core.io import atomic_open
from jaxcfl._core.classify import STATUSES

STATUS_COLOURS = {"stable": "#4c9f70", "restrained": "#e0a030", "divergent": "#c8423a"}


def pyplot():
    """``matplotlib.pyplot``, imported on first use; the Agg backend when no display is set and the
    current backend is an interactive one (so that plots save on a headless machine)."""
    import matplotlib

    if not os.environ.get("DISPLAY") and matplotlib.get_backend().lower() not in ("agg", "pdf", "svg"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cell_edges(values: np.ndarray) -> np.ndarray:
    """Cell edges for log-spaced centres (a single value gets a +-10% cell)."""
    v = np.log(np.asarray(values, float))
    if v.size == 1:
        return np.exp(v + np.log([0.9, 1.1]))
    mid = (v[1:] + v[:-1]) / 2
    return np.exp(np.concatenate([[2 * v[0] - mid[0]], mid, [2 * v[-1] - mid[-1]]]))


def theory_curves(result, lr: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"paper": (alpha_min(lr), alpha_max(lr)), "windowed": (...)}`` for a sweep's problem."""
    from jaxcfl.pde import _theory as theory
    from jaxcfl.pde._rhs import get_model

    spec = result.spec  # a jaxcfl.SweepSpec
    if result.image is None:
        raise ValueError("result carries no image; theory curves need the sweep's image")
    curves = {}
    setup = spec.setup
    common = dict(scheme=setup.scheme, momentum=setup.momentum)
    if get_model(setup.model).paper_bounds:
        pairs = [theory.alpha_bounds(result.image, x, a=setup.a, beta=setup.beta, pool=setup.pool, **common) for x in lr]
        curves["paper"] = (np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]))
    spectrum = theory.windowed_spectrum(result.image, spec.kernel_size, model=setup.model, a=setup.a, beta=setup.beta,
                                        pool=setup.pool, label=setup.label, bias=setup.bias)
    pairs = [theory.bounds_from_spectrum(spectrum, x, **common) for x in lr]
    curves["windowed"] = (np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]))
    return curves


def stability_map(result, *, ax=None, theory: bool = True, title: str | None = None):
    """Draw a sweep's ``lr x alpha`` statuses with the paper and windowed CFL curves.

    Args:
      result: a :class:`jaxcfl.SweepResult`.
      ax: matplotlib axes (a new figure if ``None``).
      theory: overlay ``alpha_min(lr)`` and ``alpha_max(lr)`` from the paper's
        formulas (linear model) and from the exact windowed spectrum.

    Returns:
      The matplotlib figure.
    """
    plt = pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 4.8))
    else:
        fig = ax.figure
    codes = np.vectorize(STATUSES.index)(result.status).T  # rows: alpha
    cmap = ListedColormap([STATUS_COLOURS[s] for s in STATUSES])
    ax.pcolormesh(cell_edges(result.lr), cell_edges(result.alpha), codes, cmap=cmap, vmin=-0.5, vmax=2.5, shading="flat")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _readable_log_ticks(ax.xaxis, cell_edges(result.lr))
    handles = [Patch(color=STATUS_COLOURS[s], label=s) for s in STATUSES]
    if theory:
        fine = np.geomspace(cell_edges(result.lr)[0], cell_edges(result.lr)[-1], 200)
        styles = {"paper": dict(color="k", ls="--"), "windowed": dict(color="navy", ls="-")}
        for name, (lo, hi) in theory_curves(result, fine).items():
            ax.plot(fine, np.where(lo > 0, lo, np.nan), lw=1.5, **styles[name], label=f"{name} alpha_min")
            ax.plot(fine, np.where(hi > 0, hi, np.nan), lw=1.5, alpha=0.7, **styles[name], label=f"{name} alpha_max")
        handles = handles + ax.get_legend_handles_labels()[0]
    ax.set_ylim(cell_edges(result.alpha)[0], cell_edges(result.alpha)[-1])
    ax.set_xlabel("learning rate (dt)")
    ax.set_ylabel("weight decay alpha")
    spec = result.spec  # a jaxcfl.SweepSpec
    ax.set_title(title or f"{spec.setup.scheme}, {spec.setup.model} model, kernel {spec.kernel_size}, {spec.steps} steps")
    ax.legend(handles=handles, fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def _readable_log_ticks(axis, edges: np.ndarray) -> None:
    """Labelled ticks at 1, 2, 3 and 5 times the powers of ten on an axis shorter than about 1.5
    decades, at 1, 2 and 5 up to 3 decades, else at the powers of ten alone (matplotlib labels
    every minor tick on a short axis: 3x10^-5 and 4x10^-5 run together); the other ticks stay,
    unlabelled."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    decades = np.log10(edges[-1] / edges[0])
    subs = (1.0, 2.0, 3.0, 5.0) if decades < 1.5 else (1.0, 2.0, 5.0) if decades < 3 else (1.0,)

    def label(x, _pos):
        exponent = int(np.floor(np.log10(x) + 1e-9))
        mantissa = x / 10.0 ** exponent
        return f"$10^{{{exponent}}}$" if round(mantissa) == 1 else f"${round(mantissa):d}\\times10^{{{exponent}}}$"

    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(label))
    axis.set_minor_locator(LogLocator(base=10, subs=np.arange(1, 10)))
    axis.set_minor_formatter(NullFormatter())


def panels(n: int, *, width: float = 6.4, height: float = 4.8):
    """A figure of ``n`` side-by-side axes (Agg when headless); returns ``(fig, axes)``."""
    fig, axes = pyplot().subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, list(axes[0])


def loss_curves(iterations: np.ndarray, curves: np.ndarray, labels: Sequence[str], *, statuses: Sequence[str] | None = None,
                ax=None, title: str = "", ylabel: str = "loss", loglog: bool = True):
    """Loss (or any positive quantity) against iteration, one line per run, coloured by status."""
    plt = pyplot()
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 4.8))
    else:
        fig = ax.figure
    curves = np.asarray(curves, float)
    cmap = plt.get_cmap("viridis")
    for i, (curve, label) in enumerate(zip(curves, labels)):
        colour = STATUS_COLOURS[statuses[i]] if statuses is not None else cmap(i / max(1, len(labels) - 1))
        text = f"{label} ({statuses[i]})" if statuses is not None else label
        ax.plot(iterations, np.where(np.isfinite(curve), curve, np.nan), color=colour, label=text, lw=1.2)
    if loglog:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def moving_average(values: np.ndarray, window: int = 100) -> np.ndarray:
    """Trailing moving average (the paper's Figure 4 right uses a window of 100)."""
    values = np.asarray(values, float)
    window = max(1, min(window, values.size))
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def _axes(ax=None):
    """``(figure, axes)``: those of ``ax``, or a new 6.4 x 4.8 figure."""
    if ax is None:
        return pyplot().subplots(figsize=(6.4, 4.8))
    return ax.figure, ax


def _finish(fig, ax, xlabel: str, ylabel: str, title: str):
    """Axis labels, title and legend; returns the (tightened) figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_sharpness(trajectories, *, labels: Sequence[str] | None = None, ax=None, title: str = "", log: bool = False):
    """Sharpness against step with the ``2 / lr`` line: the Edge of Stability plot (Cohen et al. 2021).

    Args:
      trajectories: one :class:`jaxcfl.sharpness.SharpnessTrajectory` or a sequence
        (e.g. one per learning rate); each is drawn with its ``threshold`` as a dashed
        horizontal line of the same colour.
      labels: legend labels (default ``"lr = ..."``).
      ax: matplotlib axes (a new figure if ``None``).
      title: the axes title.
      log: logarithmic sharpness axis.

    Returns:
      The matplotlib figure.
    """
    if not isinstance(trajectories, Sequence):
        trajectories = [trajectories]
    fig, ax = _axes(ax)
    cmap = pyplot().get_cmap("viridis")
    for i, traj in enumerate(trajectories):
        colour = cmap(i / max(1, len(trajectories) - 1)) if len(trajectories) > 1 else "C0"
        label = labels[i] if labels is not None else f"lr = {traj.lr:g}"
        ax.plot(traj.step, np.asarray(traj.sharpness, float), color=colour, lw=1.2, label=label)
        name = "2/lr" if np.isclose(traj.threshold * traj.lr, 2.0) else "stability limit"
        ax.axhline(traj.threshold, color=colour, ls="--", lw=1.0, label=f"{name} = {traj.threshold:.4g}")
    if log:
        ax.set_yscale("log")
    return _finish(fig, ax, "iteration", "sharpness (largest Hessian eigenvalue)", title)


def ratio_vs_alpha(rows: Sequence[Mapping[str, Any]], *, predicted: bool = True, ax=None,
                   title: str = "Appendix F: largest stable lr / (2/alpha)"):
    """Appendix F's figure: ``max_lr / (2 / alpha)`` against ``alpha`` (log x), one line per model.

    Args:
      rows: mappings with ``"model"``, ``"alpha"`` and ``"ratio"`` (``None``/NaN: not found),
        e.g. the rows of ``jaxcfl reproduce appendix-f``; optionally ``"predicted_ratio"``.
      predicted: also draw ``predicted_ratio`` (eq 50 for a quadratic, ``alpha / (alpha + l_max)``)
        dotted in the model's colour, where the rows have it.
      ax: matplotlib axes (a new figure if ``None``).
      title: the axes title.

    Returns:
      The matplotlib figure, with the horizontal line at 1 (eq 51: ``dt < 2 / alpha``).

    References:
      Sun et al., JMLR 25(174) 2024, appendix F, eqs 50-51 and its figure.
    """
    fig, ax = _axes(ax)
    as_float = lambda x: np.nan if x is None else float(x)
    models = list(dict.fromkeys(r["model"] for r in rows))
    for i, model in enumerate(models):
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["alpha"])
        alpha = np.array([r["alpha"] for r in mine], float)
        ax.plot(alpha, [as_float(r["ratio"]) for r in mine], "o-", color=f"C{i}", lw=1.5, label=model)
        guess = np.array([as_float(r.get("predicted_ratio")) for r in mine])
        if predicted and np.isfinite(guess).any():
            ax.plot(alpha, guess, ":", color=f"C{i}", lw=1.2, label=f"{model}: alpha/(alpha + l_max)")
    ax.axhline(1.0, color="k", ls="--", lw=1.0, label="2/alpha (eq 51)")
    ax.set_xscale("log")
    return _finish(fig, ax, "weight decay alpha", "max stable lr / (2/alpha)", title)


def save(fig: Any, path: str | os.PathLike) -> str:
    """Save a figure (PNG by extension) and close it; returns the path."""
    path = Path(path)
    with atomic_open(path, "wb") as fh:  # a reader never sees half a figure
        fig.savefig(fh, dpi=120, format=path.suffix.lstrip(".") or "png")
    pyplot().close(fig)
    return str(path)
