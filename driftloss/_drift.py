"""The normalized multi-temperature drift of docs/design.md §2, on stop-gradient copies of the inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from driftloss._backends import backend_for
from driftloss._distances import pairwise_distances
from driftloss._field import drift_from_affinity
from driftloss._kernel import affinity, effective_neighbours
from driftloss._progress import reference_energy_distance

SELF_PENALTY = 100.0  # added to a sample's distance to itself, in units of the mean distance
SCALE_FLOOR = 1e-3  # lower bound of S and s (docs/design.md §2 step 2)
RMS_FLOOR_SQ = 1e-8  # lower bound of mean(F^2) before the square root (step 4)


@dataclass(frozen=True)
class DriftOptions:
    taus: tuple[float, ...]
    x_as_negatives: bool = True
    normalize: bool = True
    kernel: str = "both"
    affinity_floor: float = 0.0
    attraction: float = 1.0
    repulsion: float = 1.0
    with_stats: bool = False
    # Sums a small array across replicas (all-reduce); S and lambda then use global statistics.
    cross_replica_sum: Any = None


def compute_drift(x: Any, pos: Any, neg: Any, weights: tuple[Any, Any, Any], opts: DriftOptions,
                  *, xp: Any, matmul: Any, device: Any, after: Any = None) -> tuple[Any, Any, dict[str, Any]]:
    """``reference_drift``, or the backend's faster equivalent when it has one (torch, JAX).

    ``after``: arrays (no gradient) that the fast drift's work waits for where a compiler would
    otherwise order it freely (``fast_drift``'s); None, or ignored, elsewhere."""
    fast = backend_for(xp).compute_drift
    if fast is not None:
        out = fast(x, pos, neg, weights, opts, xp=xp, matmul=matmul, device=device,
                   **({} if after is None else {"after": after}))
        if out is not None:
            return out
    return reference_drift(x, pos, neg, weights, opts, xp=xp, matmul=matmul, device=device)


def column_parts(x: Any, pos: Any, neg: Any, weights: tuple[Any, Any, Any],
                 opts: DriftOptions) -> tuple[list[Any], list[Any], int]:
    """The kernel's columns in parts, negatives first: ([x (if x_as_negatives), neg (if any), pos],
    their weights [..., N] / [..., M] / [..., P], the number of negative columns)."""
    x_w, neg_w, pos_w = weights
    cols = [x] if opts.x_as_negatives else []
    col_w = [x_w] if opts.x_as_negatives else []
    if neg is not None:
        cols.append(neg)
        col_w.append(neg_w)
    n_neg = sum(c.shape[-2] for c in cols)
    return [*cols, pos], [*col_w, pos_w], n_neg


def kernel_columns(x: Any, pos: Any, neg: Any, weights: tuple[Any, Any, Any], opts: DriftOptions,
                   *, xp: Any) -> tuple[Any, Any, int]:
    """The kernel's columns, negatives first: y [..., J, D] = [x (if x_as_negatives); neg; pos],
    their weights w [..., J], and the number of negative columns."""
    cols, col_w, n_neg = column_parts(x, pos, neg, weights, opts)
    return xp.concat(cols, axis=-2), xp.concat(col_w, axis=-1), n_neg


def reference_drift(x: Any, pos: Any, neg: Any, weights: tuple[Any, Any, Any], opts: DriftOptions,
                    *, xp: Any, matmul: Any, device: Any) -> tuple[Any, Any, dict[str, Any]]:
    """Drift of every generated sample, summed over temperatures (the reference computation).

    x [..., N, D], pos [..., P, D], neg [..., M, D] or None, all in the compute dtype and
    already cut from the autodiff graph; weights = (x_w [..., N], neg_w [..., M] or None,
    pos_w [..., P]) broadcast to full shape.
    Returns (V [..., N, D], s, stats): with normalize, V = sum_tau F_tau / lambda_tau in units of
    the feature scale s (0-d array); without, V = sum_tau F_tau in raw units and s = 1.0.
    """
    n, d_feat = x.shape[-2], x.shape[-1]
    y, w, n_neg = kernel_columns(x, pos, neg, weights, opts, xp=xp)

    dist = pairwise_distances(x, y, xp=xp, matmul=matmul)  # [..., N, J]
    self_mask = None
    if opts.x_as_negatives:
        dev = device(x)
        rows = xp.expand_dims(xp.arange(n, device=dev), axis=-1)
        self_mask = rows == xp.expand_dims(xp.arange(y.shape[-2], device=dev), axis=-2)  # [N, J]
        dist = xp.where(self_mask, 0.0, dist)  # exact zero where the Gram form leaves rounding

    # S: weighted mean distance over all problems, rows and columns (self distances included).
    scale, unit, s = feature_scale(xp.sum(dist * xp.expand_dims(w, axis=-2)), n * xp.sum(w), d_feat, opts, xp)
    if opts.normalize:
        dist_hat = dist / unit
        penalty = SELF_PENALTY
    else:
        dist_hat = dist
        penalty = SELF_PENALTY * unit
    if self_mask is not None:
        dist_hat = xp.where(self_mask, dist_hat + penalty, dist_hat)

    # Centre the coordinates: F is translation invariant and the product loses less in float32.
    centre = xp.mean(y, axis=-2, keepdims=True)
    yc, xc = y - centre, x - centre

    v = None
    rms, neighbours = [], []
    for tau in opts.taus:
        a = affinity(-dist_hat / tau, w, kernel=opts.kernel, floor=opts.affinity_floor, xp=xp)
        f = drift_from_affinity(a, yc, xc, n_neg=n_neg, attraction=opts.attraction,
                                repulsion=opts.repulsion, xp=xp, matmul=matmul) / s
        ms = _global_mean_square(f, opts.cross_replica_sum, xp, device)
        term = f / xp.sqrt(xp.clip(ms, min=RMS_FLOOR_SQ)) if opts.normalize else f
        v = term if v is None else v + term
        if opts.with_stats:
            rms.append(xp.sqrt(ms))
            neighbours.append(effective_neighbours(a, xp=xp))

    stats: dict[str, Any] = {}
    if opts.with_stats:
        stats = {
            "scale": scale,
            "feature_scale": xp.asarray(s, dtype=x.dtype, device=device(x)),
            "drift_rms": xp.stack(rms),
            "neighbours": xp.stack(neighbours),
            "energy_distance": reference_energy_distance(
                x, pos, weights[0], weights[2], unit if opts.normalize else None, opts.cross_replica_sum,
                xp=xp, matmul=matmul, device=device(x)),
        }
    return v, s, stats


def feature_scale(weighted_sum: Any, weight_total: Any, d_feat: int, opts: DriftOptions,
                  xp: Any) -> tuple[Any, Any, Any]:
    """(S, S floored, s) from the sums of w * d and of w (across replicas when opts says so):
    S the weighted mean distance, s = S / sqrt(D) floored with normalize, else 1.0 (step 2).
    The sums are 0-d, or [G] for G separate segments of problems (then so are S and s)."""
    sums = xp.stack([weighted_sum, weight_total])
    if opts.cross_replica_sum is not None:
        sums = opts.cross_replica_sum(sums)
    scale = sums[0, ...] / xp.clip(sums[1, ...], min=1e-30)
    s = xp.clip(scale / math.sqrt(d_feat), min=SCALE_FLOOR) if opts.normalize else 1.0
    return scale, xp.clip(scale, min=SCALE_FLOOR), s


def _global_mean_square(f: Any, cross_replica_sum: Any, xp: Any, device: Any) -> Any:
    """mean(f**2) over all problems, rows and dims, across replicas when a sum is given."""
    if cross_replica_sum is None:
        return xp.mean(f * f)
    count = xp.asarray(float(math.prod(f.shape)), dtype=f.dtype, device=device(f))
    sums = cross_replica_sum(xp.stack([xp.sum(f * f), count]))
    return sums[0] / sums[1]
