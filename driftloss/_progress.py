"""A progress statistic for ``return_stats``: the energy distance between x and the positives.

The loss cannot show progress (its value is mean(V^2), each temperature's term at unit RMS: T to T^2
for T temperatures by construction), and the unnormalized drift RMS lambda_tau can rise from a collapsed
start and, far from the data, sits below its floor (1e-4) at small tau. The energy distance between the
generated samples and the positives falls as q approaches p from any start.

Per problem, with x [N, D], pos [P, D], weights a [N] (x_weight) and b [P] (pos_weight), A = sum a,
B = sum b and d the Euclidean distance (the V-statistic of the weighted sets, self pairs included):

    ED = 2 sum_ij a_i b_j d(x_i, pos_j) / (A B)
           - sum_ii' a_i a_i' d(x_i, x_i') / A^2 - sum_jj' b_j b_j' d(pos_j, pos_j') / B^2

It is the squared MMD of the two weighted empirical measures under the energy kernel, hence >= 0 for
any sample (log plots never see a negative value), exactly 0 for identical weighted sets, and a
weight k counts as k copies of a point. Its price is a known bias: at p = q it is about
E d(x, x') / N + E d(pos, pos') / P (in units of S: ~ 1/N + 1/P), a floor for a perfect generator.
(The unbiased U-statistic, without the self pairs, is 0 in expectation at p = q but goes negative.)
Weights are probability masses: a problem whose x weights are all 0 scores 0. neg is not the target
and takes no part. ``stats["energy_distance"]`` is the mean of ED over the problems (of one call, or
of one group of ``drifting_loss_groups``), divided by max(S, 1e-3) with normalize=True (scale-free:
comparable across groups and runs), in raw units without.

The x-pos and x-x sums run over the kernel's own distances: the blocked drift (_fast_drift.py) takes
them in its first pass with ``row_weighted_sums``; the pos-pos sum is the only new work.
"""

from __future__ import annotations

import math
from typing import Any

from driftloss._distances import DIRECT_MAX_FEATURES, pairwise_distances


def pair_sums(dist: Any, row_w: Any, col_w: Any, *, xp: Any) -> Any:
    """sum_ij row_w_i col_w_j dist_ij per problem: dist [..., R, C], row_w [..., R], col_w [..., C]
    -> [...]."""
    return xp.sum(row_weighted_sums(dist, row_w, xp=xp) * col_w, axis=-1)


def row_weighted_sums(dist: Any, row_w: Any, *, xp: Any) -> Any:
    """sum_i row_w_i dist_ij: dist [..., R, C], row_w [..., R] -> [..., C]."""
    return xp.sum(dist * xp.expand_dims(row_w, axis=-1), axis=-2)


def self_distances(rows: Any, points: Any, r0: Any, *, xp: Any, matmul: Any, device: Any) -> Any:
    """d(points_{r0+i}, points_j) [..., R, K] for rows = points[..., r0:r0+R, :] [..., R, D] of points
    [..., K, D] (``rows is points`` for all of them), exactly 0 on the self pairs. ``r0`` may be a traced
    index (a lax.scan's); ``device``: the points' device (None when traced).

    For D <= 4 by exact differences, one coordinate at a time (no [..., R, K, D] array, whose sum over a
    short last axis is slow: the toy's 256 positives took 1.8 ms, 0.4 ms so, on NumPy), else by
    |a|^2 + |b|^2 - 2 a.b on points centred by their mean (as ``pairwise_distances``, with one centring, one
    set of norms and one product for both sides), the self pairs set to 0 where that leaves a rounding
    distance."""
    if rows.shape[-1] <= DIRECT_MAX_FEATURES:  # exact differences: x - x is 0
        d2 = None
        for k in range(rows.shape[-1]):
            t = xp.expand_dims(rows[..., k], axis=-1) - xp.expand_dims(points[..., k], axis=-2)  # [..., R, K]
            d2 = t * t if d2 is None else d2 + t * t
        return xp.sqrt(d2)
    centre = xp.mean(points, axis=-2, keepdims=True)
    pc = points - centre
    rc = pc if rows is points else rows - centre
    p2 = xp.sum(pc * pc, axis=-1)  # [..., K]
    r2 = p2 if rows is points else xp.sum(rc * rc, axis=-1)
    d2 = xp.expand_dims(r2, axis=-1) + (xp.expand_dims(p2, axis=-2) - 2 * matmul(rc, xp.matrix_transpose(pc)))
    d = xp.sqrt(xp.clip(d2, min=0))
    row = xp.expand_dims(xp.arange(rows.shape[-2], device=device) + r0, axis=-1)
    return xp.where(row == xp.expand_dims(xp.arange(points.shape[-2], device=device), axis=-2), 0.0, d)


def coefficients(x_w: Any, pos_w: Any, *, xp: Any) -> tuple[Any, Any, Any]:
    """Per problem, the factors of the three pair sums in ED: (2 / (A B), -1 / A^2, -1 / B^2), each [...],
    for x_w [..., N] and pos_w [..., P]; all 0 where A = 0 (such a problem scores 0)."""
    a_tot, b_tot = xp.sum(x_w, axis=-1), xp.sum(pos_w, axis=-1)
    has_x = a_tot > 0
    a_safe = xp.where(has_x, a_tot, 1.0)
    b_safe = xp.where(b_tot > 0, b_tot, 1.0)
    zero = xp.zeros_like(a_tot)
    return (xp.where(has_x, 2.0 / (a_safe * b_safe), zero), xp.where(has_x, -1.0 / (a_safe * a_safe), zero),
            xp.where(has_x, -1.0 / (b_safe * b_safe), zero))


def energy_distance_per_problem(x: Any, pos: Any, x_w: Any, pos_w: Any, *, xp: Any, matmul: Any,
                                device: Any) -> Any:
    """ED of each problem [...] in the input units, for x [..., N, D], pos [..., P, D] and their
    weights x_w [..., N], pos_w [..., P] (the formula of the module docstring; dense)."""
    c_xp, c_xx, c_pp = coefficients(x_w, pos_w, xp=xp)
    cross = pair_sums(pairwise_distances(x, pos, xp=xp, matmul=matmul), x_w, pos_w, xp=xp)
    within_x, within_pos = (
        pair_sums(self_distances(a, a, 0, xp=xp, matmul=matmul, device=device), w, w, xp=xp)
        for a, w in ((x, x_w), (pos, pos_w)))
    return c_xp * cross + c_xx * within_x + c_pp * within_pos


def mean_energy_distance(summed: Any, problems: Any, unit: Any, cross_replica_sum: Any, *, xp: Any) -> Any:
    """stats["energy_distance"]: the sum of ED over problems ``summed`` (0-d, or [G] per segment) over
    the number of problems ``problems`` (same shape, an array), across replicas when a sum is given,
    divided by ``unit`` (max(S, 1e-3); None: raw units)."""
    if cross_replica_sum is not None:
        both = cross_replica_sum(xp.stack([summed, problems]))
        summed, problems = both[0, ...], both[1, ...]
    mean = summed / problems
    return mean if unit is None else mean / unit


def reference_energy_distance(x: Any, pos: Any, x_w: Any, pos_w: Any, unit: Any, cross_replica_sum: Any,
                              *, xp: Any, matmul: Any, device: Any) -> Any:
    """stats["energy_distance"] (0-d) of one call: the mean over its problems of
    ``energy_distance_per_problem``, divided by ``unit`` (None: raw units)."""
    per_problem = energy_distance_per_problem(x, pos, x_w, pos_w, xp=xp, matmul=matmul, device=device)
    count = xp.asarray(float(math.prod(per_problem.shape)), dtype=per_problem.dtype, device=device)
    return mean_energy_distance(xp.sum(per_problem), count, unit, cross_replica_sum, xp=xp)
