"""Figures of a toy run (matplotlib, Agg): samples over training, drift quivers, loss/drift curves.

Every function takes NumPy arrays and a path, and writes one PNG.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_LIMIT = 3.5  # axis half-width that shows every target (the "far" init starts outside it)


def _scatter_axes(ax, target_pts: np.ndarray, pts: np.ndarray | None, title: str, limit: float) -> None:
    ax.scatter(target_pts[:, 0], target_pts[:, 1], s=2, c="0.75", linewidths=0)
    if pts is not None:
        ax.scatter(pts[:, 0], pts[:, 1], s=2, c="tab:blue", linewidths=0)
    ax.set_xlim(-limit, limit)
    ax.set_ylim(-limit, limit)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)


def _limit_for(*point_sets: np.ndarray) -> float:
    """Axis half-width: the target's frame, widened when samples lie outside it (far init)."""
    extent = max(float(np.abs(p).max()) for p in point_sets)
    return _LIMIT if extent <= _LIMIT else min(extent * 1.1, 12.0)


def plot_snapshots(snapshots: list[tuple[int, np.ndarray]], target_pts: np.ndarray, path: str,
                   title: str = "") -> None:
    """A row of scatter plots (Fig. 3/4 style): generated samples [n, 2] at each step, target in grey."""
    limit = _limit_for(target_pts, *(p for _, p in snapshots))
    fig, axes = plt.subplots(1, len(snapshots), figsize=(2.2 * len(snapshots), 2.5), squeeze=False)
    for ax, (step, pts) in zip(axes[0], snapshots):
        _scatter_axes(ax, target_pts, pts, f"step {step}", limit)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_drift_quiver(x: np.ndarray, v_plus: np.ndarray, v_minus: np.ndarray, pos: np.ndarray, path: str,
                      title: str = "") -> None:
    """Three panels at generated points x [n, 2]: attraction V+, repulsion -V-, and V = V+ - V-.

    v_plus, v_minus: [n, 2] (Eq. 8-11; V- is the mean shift toward the negatives, so -V- is the push
    the sample receives). pos [m, 2]: the positives they were computed with (grey).
    """
    limit = _limit_for(pos, x)
    fields = (("attraction V+", v_plus, "tab:green"), ("repulsion -V-", -v_minus, "tab:red"),
              ("total V", v_plus - v_minus, "tab:blue"))
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    for ax, (name, v, color) in zip(axes, fields):
        _scatter_axes(ax, pos, None, name, limit)
        ax.scatter(x[:, 0], x[:, 1], s=3, c="k", linewidths=0)
        ax.quiver(x[:, 0], x[:, 1], v[:, 0], v[:, 1], color=color, angles="xy", scale_units="xy", scale=1,
                  width=0.004)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(loss: np.ndarray, drift_rms: np.ndarray, taus: tuple[float, ...], path: str,
                title: str = "") -> None:
    """Loss [steps] and unnormalized drift RMS per tau [steps, T] over training (log scale)."""
    steps = np.arange(1, len(loss) + 1)
    fig, (ax_loss, ax_rms) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax_loss.plot(steps, loss, lw=0.8)
    ax_loss.set_title("drifting loss (= mean normalized drift^2)", fontsize=9)
    ax_loss.set_xlabel("step")
    ax_loss.set_yscale("log")
    for t, tau in enumerate(taus):
        ax_rms.plot(steps, drift_rms[:, t], lw=0.8, label=f"tau={tau}")
    ax_rms.set_yscale("log")
    ax_rms.set_title("unnormalized drift RMS (lambda_tau)", fontsize=9)
    ax_rms.set_xlabel("step")
    ax_rms.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
