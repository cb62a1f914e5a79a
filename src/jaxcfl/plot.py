"""Plots: stability maps with the theoretical CFL curves, loss and divergence curves.

matplotlib is imported lazily (the Agg backend is used when no display is set),
so importing :mod:`jaxcfl` never needs it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxcfl.classify import STATUSES

STATUS_COLOURS = {"stable": "#4c9f70", "restrained": "#e0a030", "divergent": "#c8423a"}


def _pyplot():
    import matplotlib

    if not os.environ.get("DISPLAY") and matplotlib.get_backend().lower() not in ("agg", "pdf", "svg"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _edges(values: np.ndarray) -> np.ndarray:
    """Cell edges for log-spaced centres (a single value gets a +-10% cell)."""
    v = np.log(np.asarray(values, float))
    if v.size == 1:
        return np.exp(v + np.log([0.9, 1.1]))
    mid = (v[1:] + v[:-1]) / 2
    return np.exp(np.concatenate([[2 * v[0] - mid[0]], mid, [2 * v[-1] - mid[-1]]]))


def theory_curves(result, lr: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"paper": (alpha_min(lr), alpha_max(lr)), "windowed": (...)}`` for a sweep's problem."""
    from jaxcfl import theory

    spec = result.spec
    if result.image is None:
        raise ValueError("result carries no image; theory curves need the sweep's image")
    curves = {}
    common = dict(scheme=spec["scheme"], momentum=spec["momentum"])
    if spec["model"] == "linear":
        pairs = [theory.alpha_bounds(result.image, x, a=spec["a"], beta=spec["beta"], pool=spec["pool"], **common) for x in lr]
        curves["paper"] = (np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]))
    spectrum = theory.windowed_spectrum(result.image, spec["kernel_size"], model=spec["model"], a=spec["a"], beta=spec["beta"],
                                        pool=spec["pool"], label=spec["label"], bias=spec["bias"])
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
    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 4.8))
    else:
        fig = ax.figure
    codes = np.vectorize(STATUSES.index)(result.status).T  # rows: alpha
    cmap = ListedColormap([STATUS_COLOURS[s] for s in STATUSES])
    ax.pcolormesh(_edges(result.lr), _edges(result.alpha), codes, cmap=cmap, vmin=-0.5, vmax=2.5, shading="flat")
    ax.set_xscale("log")
    ax.set_yscale("log")
    handles = [Patch(color=STATUS_COLOURS[s], label=s) for s in STATUSES]
    if theory:
        fine = np.geomspace(_edges(result.lr)[0], _edges(result.lr)[-1], 200)
        styles = {"paper": dict(color="k", ls="--"), "windowed": dict(color="navy", ls="-")}
        for name, (lo, hi) in theory_curves(result, fine).items():
            ax.plot(fine, np.where(lo > 0, lo, np.nan), lw=1.5, **styles[name], label=f"{name} alpha_min")
            ax.plot(fine, np.where(hi > 0, hi, np.nan), lw=1.5, alpha=0.7, **styles[name], label=f"{name} alpha_max")
        handles = handles + ax.get_legend_handles_labels()[0]
    ax.set_ylim(_edges(result.alpha)[0], _edges(result.alpha)[-1])
    ax.set_xlabel("learning rate (dt)")
    ax.set_ylabel("weight decay alpha")
    spec = result.spec
    ax.set_title(title or f"{spec['scheme']}, {spec['model']} model, kernel {spec['kernel_size']}, {spec['steps']} steps")
    ax.legend(handles=handles, fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def panels(n: int, *, width: float = 6.4, height: float = 4.8):
    """A figure of ``n`` side-by-side axes (Agg when headless); returns ``(fig, axes)``."""
    fig, axes = _pyplot().subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, list(axes[0])


def loss_curves(iterations: np.ndarray, curves: np.ndarray, labels: Sequence[str], *, statuses: Sequence[str] | None = None,
                ax=None, title: str = "", ylabel: str = "loss", loglog: bool = True):
    """Loss (or any positive quantity) against iteration, one line per run, coloured by status."""
    plt = _pyplot()
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


def save(fig: Any, path: str | os.PathLike) -> str:
    """Save a figure (PNG by extension) and close it; returns the path."""
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return str(path)
