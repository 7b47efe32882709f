"""What a training run reports (rank 0): log.txt (one JSON line per logged step), TensorBoard scalars
(loss, drift RMS and energy distance per feature group, learning rate, gradient norm, img/s, the split of the
step's time) and sample grids."""

from __future__ import annotations

import json
import os

import numpy as np
import torch


def progress(stats: dict) -> dict:
    """The energy distance (generated vs real, in units of the group's mean distance; it falls as the
    generator approaches the data) of the raw-sample group and its mean over all groups."""
    ed = {name: float(s["energy_distance"]) for name, s in stats.items() if "energy_distance" in s}
    if not ed:
        return {}
    return {"energy_distance_global": ed.get("global", float("nan")),
            "energy_distance_mean": sum(ed.values()) / len(ed)}


class RunLog:
    """log.txt in ``out`` and, if ``tensorboard``, events in ``out``/tensorboard."""

    def __init__(self, out: str, taus: tuple[float, ...], tensorboard: bool):
        os.makedirs(out, exist_ok=True)
        self.path, self.taus, self.writer = os.path.join(out, "log.txt"), tuple(taus), None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(out, "tensorboard"))

    def step(self, summary: dict, stats: dict, alpha: torch.Tensor) -> None:
        """summary: {step, loss, img_per_s, lr, grad_norm, time: {part: s}, energy_distance_*};
        stats: per group {loss, drift_rms [T], energy_distance}; alpha [G]."""
        with open(self.path, "a") as f:
            f.write(json.dumps(summary) + "\n")
        if self.writer is None:
            return
        step, add = summary["step"], self.writer.add_scalar
        for key in ("loss", "lr", "grad_norm", "img_per_s"):
            add(f"train/{key}", summary[key], step)
        add("train/alpha_mean", float(alpha.mean()), step)
        for part, seconds in summary["time"].items():
            add(f"time/{part}", seconds, step)
        for name, s in stats.items():
            add(f"loss/{name}", float(s["loss"]), step)
            if "energy_distance" in s:
                add(f"energy_distance/{name}", float(s["energy_distance"]), step)
            for tau, rms in zip(self.taus, s["drift_rms"].tolist()):
                add(f"drift_rms/{name}/tau={tau}", rms, step)

    def grid(self, images: np.ndarray, step: int) -> None:
        """The first 64 images [n, H, W, 3] uint8 of a sample grid, as a TensorBoard image."""
        if self.writer is not None:
            self.writer.add_images("samples", torch.from_numpy(images[:64]), step, dataformats="NHWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
