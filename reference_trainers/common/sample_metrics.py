"""Sample-based distances between a generated set and a held-out target set (NumPy, float64).

energy_distance: 2 E|X-Y| - E|X-X'| - E|Y-Y'|, the V-statistic (all pairs, self pairs included), so
                 identical sets give exactly 0 and point masses at distance a give 2a.
mmd:             sqrt of the biased (V-statistic) MMD^2 with the Gaussian kernel
                 k(x, y) = exp(-|x-y|^2 / (2 sigma^2)), sigma = MMD_BANDWIDTH = 0.25 (data units; the
                 toy modes have std 0.1-0.25, the targets span ~6).
modes_covered:   a mode counts as covered if at least ``min_fraction`` of its fair share n/K of the
                 samples fall in its region (toy_data.Target.assign_modes).
"""

from __future__ import annotations

import numpy as np

MMD_BANDWIDTH = 0.25
MIN_MODE_FRACTION = 0.25


def _pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a_i - b_j| [n, m] for a [n, D], b [m, D] (broadcast difference: exact for offset data)."""
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Energy distance between samples x [n, D] and y [m, D] (V-statistic)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    dxy = _pairwise_distances(x, y).mean()
    dxx = _pairwise_distances(x, x).mean()
    dyy = _pairwise_distances(y, y).mean()
    return float(2 * dxy - dxx - dyy)


def mmd(x: np.ndarray, y: np.ndarray, bandwidth: float = MMD_BANDWIDTH) -> float:
    """MMD (sqrt of biased MMD^2, Gaussian kernel of std ``bandwidth``) between x [n, D] and y [m, D]."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)

    def k(a, b):
        return np.exp(-(_pairwise_distances(a, b) ** 2) / (2 * bandwidth**2)).mean()

    return float(np.sqrt(max(k(x, x) + k(y, y) - 2 * k(x, y), 0.0)))


def modes_covered(assignments: np.ndarray, modes_total: int | None,
                  min_fraction: float = MIN_MODE_FRACTION) -> int | None:
    """Number of modes holding at least min_fraction * n / modes_total of the n samples.

    assignments: [n] mode index per sample, -1 for samples in no mode. None when modes_total is None.
    """
    if modes_total is None:
        return None
    assignments = np.asarray(assignments)
    counts = np.bincount(assignments[assignments >= 0], minlength=modes_total)
    return int((counts >= min_fraction * len(assignments) / modes_total).sum())


def sample_metrics(generated: np.ndarray, held_out: np.ndarray, reference: np.ndarray, target) -> dict:
    """All metrics of a generated set [n, 2] against held-out target samples [n, 2].

    reference: a second independent target sample [n, 2]; energy_distance_reference = ED(held_out,
    reference) is what a perfect generator would score at this sample size.
    """
    in_mode = target.assign_modes(generated)
    return {
        "energy_distance": energy_distance(generated, held_out),
        "energy_distance_reference": energy_distance(reference, held_out),
        "mmd": mmd(generated, held_out),
        "mmd_reference": mmd(reference, held_out),
        "mmd_bandwidth": MMD_BANDWIDTH,
        "modes_covered": modes_covered(in_mode, target.modes_total),
        "modes_total": target.modes_total,
        "fraction_in_modes": None if target.modes_total is None else float((in_mode >= 0).mean()),
        "n_samples": len(generated),
    }
