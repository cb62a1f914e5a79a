"""``plot_sharpness``: to be moved into :mod:`jaxcfl.plot` (kept apart while plot.py is edited)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxcfl.plot import _pyplot


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
    plt = _pyplot()
    if not isinstance(trajectories, Sequence):
        trajectories = [trajectories]
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 4.8))
    else:
        fig = ax.figure
    cmap = plt.get_cmap("viridis")
    for i, traj in enumerate(trajectories):
        colour = cmap(i / max(1, len(trajectories) - 1)) if len(trajectories) > 1 else "C0"
        label = labels[i] if labels is not None else f"lr = {traj.lr:g}"
        ax.plot(traj.step, np.asarray(traj.sharpness, float), color=colour, lw=1.2, label=label)
        name = "2/lr" if np.isclose(traj.threshold * traj.lr, 2.0) else "stability limit"
        ax.axhline(traj.threshold, color=colour, ls="--", lw=1.0, label=f"{name} = {traj.threshold:.4g}")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("sharpness (largest Hessian eigenvalue)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
