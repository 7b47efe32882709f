"""Figures of a toy run (matplotlib, Agg): samples over training, drift quivers, loss/drift curves.

Every function takes NumPy arrays and a path, and writes one PNG.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_LIMIT = 3.5  # axis half-width that shows every target (the "far" init starts outside it)


_REAL = {"s": 3, "c": "0.7", "linewidths": 0, "label": "real (target) samples"}


def _scatter_axes(ax, target_pts: np.ndarray, pts: np.ndarray | None, title: str, limit: float,
                  label: str = "generated") -> None:
    """Target samples in grey, then ``pts`` (if any) in blue, in a square frame of half-width ``limit``."""
    ax.scatter(target_pts[:, 0], target_pts[:, 1], **_REAL)
    if pts is not None:
        ax.scatter(pts[:, 0], pts[:, 1], s=2, c="tab:blue", linewidths=0, label=label)
    ax.set_xlim(-limit, limit)
    ax.set_ylim(-limit, limit)
    ax.set_aspect("equal")
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=9)


def _limit_for(*point_sets: np.ndarray, quantile: float = 1.0) -> float:
    """Axis half-width: the target's frame, widened when samples lie outside it (far init); with
    quantile < 1 a few stray points do not widen it."""
    extent = max(float(np.quantile(np.abs(p).max(axis=1), quantile)) for p in point_sets)
    return _LIMIT if extent <= _LIMIT else min(extent * 1.1, 12.0)


def _legend_below(fig, ax) -> None:
    """One legend for the figure (the entries of ``ax``), under the panels (constrained layout)."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8, markerscale=4,
               frameon=False)


def plot_snapshots(snapshots: list[tuple[int, np.ndarray]], target_pts: np.ndarray, path: str,
                   title: str = "") -> None:
    """A row of scatter plots (Fig. 3/4 style): the EMA generator's samples [n, 2] at each step (blue),
    the target's samples in grey; shared coordinates x1, x2."""
    limit = _limit_for(target_pts, *(p for _, p in snapshots))
    fig, axes = plt.subplots(1, len(snapshots), figsize=(2.2 * len(snapshots), 3.2), squeeze=False,
                             sharex=True, sharey=True, layout="constrained")
    for ax, (step, pts) in zip(axes[0], snapshots):
        _scatter_axes(ax, target_pts, pts, f"step {step}", limit, label="generated (EMA generator)")
        ax.set_xlabel("x1", fontsize=8)
    axes[0, 0].set_ylabel("x2", fontsize=8)
    fig.suptitle(title, fontsize=10)
    _legend_below(fig, axes[0, 0])
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_drift_quiver(x: np.ndarray, v_plus: np.ndarray, v_minus: np.ndarray, pos: np.ndarray, path: str,
                      title: str = "") -> None:
    """Three panels at generated points x [n, 2]: attraction V+, repulsion -V-, and V = V+ - V-.

    v_plus, v_minus: [n, 2] (Eq. 8-11; V- is the mean shift toward the negatives, so -V- is the push
    the sample receives). pos [m, 2]: the positives they were computed with (grey). Arrows are drawn to
    scale in the coordinates of the points (an arrow ends where x + V would be).
    """
    limit = _limit_for(pos, x, quantile=0.9)
    fields = (("V⁺: attraction toward the real samples", v_plus, "tab:green"),
              ("−V⁻: repulsion from the generated samples", -v_minus, "tab:red"),
              ("V = V⁺ − V⁻: the drift", v_plus - v_minus, "tab:blue"))
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 4.5), sharex=True, sharey=True, layout="constrained")
    for ax, (name, v, color) in zip(axes, fields):
        _scatter_axes(ax, pos, None, name, limit)
        ax.scatter(x[:, 0], x[:, 1], s=3, c="k", linewidths=0, label="generated samples x")
        ax.quiver(x[:, 0], x[:, 1], v[:, 0], v[:, 1], color=color, angles="xy", scale_units="xy", scale=1,
                  width=0.004)
        ax.set_xlabel("x1", fontsize=8)
    axes[0].set_ylabel("x2", fontsize=8)
    fig.suptitle(title, fontsize=10)
    _legend_below(fig, axes[0])
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(loss: np.ndarray, drift_rms: np.ndarray, taus: tuple[float, ...], path: str,
                title: str = "", energy_distance: np.ndarray | None = None) -> None:
    """Loss [steps], energy distance [steps] (stats["energy_distance"]; may cover only the last steps,
    or be None / empty: no panel) and unnormalized drift RMS per tau [steps, T] over training (log scales).

    The loss is flat by design (mean normalized drift^2, about the number of taus); the energy distance
    is the curve that shows progress; lambda_tau can rise from a collapsed start and floors at 1e-4.
    """
    steps = np.arange(1, len(loss) + 1)
    with_ed = energy_distance is not None and len(energy_distance) > 0
    fig, axes = plt.subplots(1, 3 if with_ed else 2, figsize=(13.5 if with_ed else 9, 3.3))
    ax_loss, ax_rms = axes[0], axes[-1]
    ax_loss.plot(steps, loss, lw=0.8)
    ax_loss.set_title("drifting loss (= mean normalized drift^2)", fontsize=9)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    if with_ed:
        ax_ed = axes[1]
        ed = np.asarray(energy_distance, dtype=np.float64)
        ed_steps = steps[len(steps) - len(ed):]
        window = max(1, len(ed) // 60)
        ax_ed.plot(ed_steps, ed, lw=0.5, color="tab:green", alpha=0.35, label="each step")
        if window > 1:
            smooth = np.convolve(ed, np.ones(window) / window, mode="valid")
            ax_ed.plot(ed_steps[window - 1:], smooth, lw=1.3, color="tab:green",
                       label=f"mean of {window} steps")
        ax_ed.set_yscale("log")
        ax_ed.set_title("energy distance (stats['energy_distance'])", fontsize=9)
        ax_ed.set_xlabel("step")
        ax_ed.set_ylabel("ED / S (generated vs real batch)")
        ax_ed.legend(fontsize=8)
    for t, tau in enumerate(taus):
        ax_rms.plot(steps, drift_rms[:, t], lw=0.8, label=f"tau={tau}")
    if len(drift_rms) and np.nanmin(drift_rms) < 1e-3:
        ax_rms.axhline(1e-4, color="0.5", lw=0.8, ls=":", label="floor 1e-4")
    ax_rms.set_yscale("log")
    ax_rms.set_title("unnormalized drift RMS (lambda_tau)", fontsize=9)
    ax_rms.set_xlabel("step")
    ax_rms.set_ylabel("drift_rms")
    ax_rms.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
