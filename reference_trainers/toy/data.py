"""2-D toy targets, their modes, and the generator initializations of the paper's Fig. 3.

All sampling is NumPy with an explicit ``np.random.Generator`` so the torch and JAX trainers see
the same data stream, and a run is reproducible from (seed, step) alone.

Targets (coordinates roughly in [-3, 3]):
  bimodal:      two Gaussians at (-2, 0) and (2, 0), std 0.25          modes: 2
  8gaussians:   eight Gaussians on a circle of radius 2, std 0.1       modes: 8
  checkerboard: uniform on the 8 black cells of a 4x4 board, cell 1.0  modes: the 8 cells
  swissroll:    a noisy 2-D spiral                                     modes: none (continuous)

A "mode" is a region: a disc of radius 3 std around a Gaussian centre, or a filled checkerboard cell.
``Target.assign_modes`` maps points to the index of the region they fall in (-1 outside all).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TARGETS = ("bimodal", "8gaussians", "checkerboard", "swissroll")
INITS = ("between", "far", "collapsed")


@dataclass(frozen=True)
class Target:
    """A 2-D target distribution.

    centers: [K, 2] Gaussian centres (mixtures) or cell lower-left corners (checkerboard); [0, 2] if none.
    std:     Gaussian std (mixtures), cell side (checkerboard), noise std (swiss roll).
    """

    name: str
    centers: np.ndarray
    std: float

    @property
    def modes_total(self) -> int | None:
        """Number of modes, or None for a continuous target without natural modes."""
        return None if self.name == "swissroll" else len(self.centers)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n samples [n, 2] float32."""
        if self.name in ("bimodal", "8gaussians"):
            idx = rng.integers(len(self.centers), size=n)
            pts = self.centers[idx] + self.std * rng.standard_normal((n, 2))
        elif self.name == "checkerboard":
            idx = rng.integers(len(self.centers), size=n)
            pts = self.centers[idx] + self.std * rng.random((n, 2))
        else:  # swissroll: angle t in [1.5 pi, 4.5 pi], radius proportional to t, scaled to ~[-3, 3]
            t = 1.5 * np.pi * (1 + 2 * rng.random(n))
            pts = np.stack([t * np.cos(t), t * np.sin(t)], axis=1) / 4.5
            pts = pts + self.std * rng.standard_normal((n, 2))
        return pts.astype(np.float32)

    def assign_modes(self, points: np.ndarray) -> np.ndarray:
        """Mode index [n] (int) of each point [n, 2]: -1 when it lies in no mode region."""
        points = np.asarray(points, dtype=np.float64)
        if self.modes_total is None:
            return np.full(len(points), -1)
        if self.name == "checkerboard":
            p = points[:, None, :]
            inside = np.all((p >= self.centers) & (p < self.centers + self.std), axis=-1)   # [n, K]
            return np.where(inside.any(axis=1), inside.argmax(axis=1), -1)
        d = np.linalg.norm(points[:, None, :] - self.centers[None], axis=-1)           # [n, K]
        nearest = d.argmin(axis=1)
        return np.where(d.min(axis=1) <= 3.0 * self.std, nearest, -1)


def make_target(name: str) -> Target:
    """The target called ``name`` (one of TARGETS)."""
    if name == "bimodal":
        return Target(name, np.array([[-2.0, 0.0], [2.0, 0.0]]), 0.25)
    if name == "8gaussians":
        angles = np.arange(8) * (2 * np.pi / 8)
        return Target(name, 2.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1), 0.1)
    if name == "checkerboard":
        corners = [(i - 2.0, j - 2.0) for i in range(4) for j in range(4) if (i + j) % 2 == 0]
        return Target(name, np.array(corners), 1.0)
    if name == "swissroll":
        return Target(name, np.zeros((0, 2)), 0.05)
    raise ValueError(f"unknown target {name!r}; choose one of {TARGETS}")


def initial_output(target: Target, init: str) -> tuple[np.ndarray, float]:
    """Where the generator's samples start (Fig. 3): (centre [2], spread).

    The trainers implement an init by setting the last layer's bias to ``centre`` and multiplying its
    weights by a factor that makes the initial outputs' std about ``spread`` (no pre-fit):
      between:   the mean of the target (between the modes), spread 0.1
      far:       (6, 6), far from every mode (the target lies within radius ~3), spread 0.1
      collapsed: on the first mode (centre of mode 0, spread = that mode's size), i.e. mode collapse
    """
    if init == "between":
        return np.zeros(2), 0.1
    if init == "far":
        return np.array([6.0, 6.0]), 0.1
    if init == "collapsed":
        if target.name == "checkerboard":
            return target.centers[0] + target.std / 2, target.std / 4
        if target.name == "swissroll":  # the outer end of the spiral
            t = 4.5 * np.pi
            return np.array([t * np.cos(t), t * np.sin(t)]) / 4.5, 0.1
        return target.centers[0].copy(), target.std
    raise ValueError(f"unknown init {init!r}; choose one of {INITS}")


def step_batch(target: Target, seed: int, step: int, n_gen: int, n_pos: int,
               noise_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(noise [n_gen, noise_dim], real [n_pos, 2]) float32 for one training step.

    Drawn from a generator keyed on (seed, step) alone, so a resumed run sees exactly the data of an
    uninterrupted one without saving RNG state.
    """
    rng = np.random.default_rng([seed, step])
    noise = rng.standard_normal((n_gen, noise_dim)).astype(np.float32)
    return noise, target.sample(rng, n_pos)


def eval_batch(target: Target, seed: int, n: int,
               noise_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(noise [n, noise_dim], held-out target [n, 2], independent reference target [n, 2]) for evaluation.

    Keyed on a stream the training steps never use.
    """
    rng = np.random.default_rng([seed, 2**62])
    noise = rng.standard_normal((n, noise_dim)).astype(np.float32)
    return noise, target.sample(rng, n), target.sample(rng, n)
