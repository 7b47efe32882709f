"""The README's monitoring figure: stats["energy_distance"] next to stats["drift_rms"] on the toy, per init.

    python -m reference_trainers.toy.monitoring_figure --out docs/images/monitoring.png
    python -m reference_trainers.toy.monitoring_figure --steps 600 --out /tmp/monitoring.png   # quicker

Trains the default torch toy run (reference_trainers.toy.toy2d: 8 Gaussians, 3,000 steps, N = P = 256) from
each init of reference_trainers.toy.data.INITS and plots, per init, the energy distance of each step's batch
(top) and the unnormalized drift RMS lambda_tau for tau = 0.02 and 0.2 (bottom). Prints each init's fall
factor: the mean energy distance over the first 1% of steps over its mean over the last 10%.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from reference_trainers.toy import toy2d  # noqa: E402
from reference_trainers.toy.config import ToyConfig  # noqa: E402
from reference_trainers.toy.data import INITS  # noqa: E402

SHOWN_TAUS = (0.02, 0.2)
RMS_SHOWN_FROM = 1e-6  # lower end of the drift RMS axis (the far start's first steps lie far below)


def fall_factor(energy_distance: np.ndarray) -> float:
    """Mean over the first 1% of steps (at least one) over the mean over the last 10% (at least one)."""
    ed = np.asarray(energy_distance, dtype=np.float64)
    return float(ed[:max(1, len(ed) // 100)].mean() / ed[-max(1, len(ed) // 10):].mean())


def trailing_mean(values: np.ndarray) -> np.ndarray:
    """At each step t (1-based), the mean over steps ceil(0.9 t)..t: a smoothing that reads on a log axis."""
    csum = np.concatenate([[0.0], np.cumsum(values)])
    t = np.arange(1, len(values) + 1)
    start = t - np.maximum(1, t // 10)
    return (csum[t] - csum[start]) / (t - start)


def train_inits(cfg: ToyConfig, inits: tuple[str, ...]) -> dict:
    """init -> (energy_distance [steps], drift_rms [steps, T], loss [steps]) of one run each."""
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for init in inits:
            one = dataclasses.replace(cfg, init=init, out=os.path.join(tmp, init))
            run, _, _ = toy2d.train(one)
            ed = np.asarray(run.energy_distance)
            runs[init] = (ed, np.asarray(run.drift_rms), np.asarray(run.loss))
            late = ed[-max(1, len(ed) // 10):].mean()
            print(f"{init}: energy distance {ed[0]:.3g} at step 1 -> {late:.3g} (last 10%), fall factor "
                  f"{fall_factor(ed):.0f}x; loss {np.mean(run.loss):.2f} on average", flush=True)
    return runs


def plot(runs: dict, taus: tuple[float, ...], path: str, steps: int) -> None:
    """Top row: energy distance per init; bottom row: lambda_tau for SHOWN_TAUS, with the 1e-4 floor."""
    fig, axes = plt.subplots(2, len(runs), figsize=(3.6 * len(runs), 5.4), sharex=True, squeeze=False)
    for col, (init, (ed, rms, _)) in enumerate(runs.items()):
        x = np.arange(1, len(ed) + 1)
        ax = axes[0, col]
        ax.plot(x, ed, lw=0.4, color="tab:green", alpha=0.35, label="each step")
        ax.plot(x, trailing_mean(ed), lw=1.4, color="tab:green", label="mean over the last 10% of steps")
        ax.set_yscale("log")
        ax.set_title(f"{init} init: energy distance ÷{fall_factor(ed):.0f} (fall_factor)", fontsize=9)
        ax.set_ylabel("stats['energy_distance']  (ED / S)", fontsize=8)
        ax.legend(fontsize=7)
        ax = axes[1, col]
        for tau, color in zip(SHOWN_TAUS, ("tab:blue", "tab:orange")):
            if tau in taus:
                ax.plot(x, rms[:, taus.index(tau)], lw=0.6, color=color, label=f"τ = {tau:g}")
        ax.axhline(1e-4, color="0.4", lw=0.8, ls=":", label="floor 1e-4")
        ax.set_yscale("log")
        clipped = np.nanmin(rms) < RMS_SHOWN_FROM
        if clipped:  # the first steps of a far start: ~1e-15, no sample is near the data at small tau
            ax.set_ylim(bottom=RMS_SHOWN_FROM)
        ax.set_title(f"{init} init: drift RMS λ_τ" + (" (axis from 1e-6)" if clipped else ""), fontsize=9)
        ax.set_ylabel("stats['drift_rms']", fontsize=8)
        ax.set_xlabel("step (log scale)")
        ax.set_xscale("log")
        ax.legend(fontsize=7)
    fig.suptitle(f"Toy 2-D, 8 Gaussians, default run ({steps} steps, N = P = 256, torch): the energy "
                 "distance falls from every start;\nλ_τ first rises (from ~0 far from the data, where "
                 "small τ sits below the 1e-4 floor) and is no distance to p", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/images/monitoring.png")
    parser.add_argument("--steps", type=int, default=ToyConfig().steps)
    parser.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = ToyConfig(steps=args.steps, seed=args.seed, progress=False, plots=False, eval_samples=500)
    runs = train_inits(cfg, tuple(args.inits))
    plot(runs, cfg.taus, args.out, args.steps)
    return {init: fall_factor(ed) for init, (ed, _, _) in runs.items()}


if __name__ == "__main__":
    main()
