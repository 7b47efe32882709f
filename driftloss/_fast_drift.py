"""A faster, memory-bounded evaluation of exactly the drift of DESIGN §2 (``compute_drift``'s contract).

Same numbers as the reference in ``_drift.py`` up to float rounding, computed with less work:

- one distance computation shared by all temperatures; all temperatures stacked on one axis;
- the "both" kernel from two exponentials per entry and temperature instead of three: with
  h = exp((min_j d - d) / 2tau) and g = exp((min_i d - d) / 2tau) (shifted so the largest entry
  of each row / column is exactly 1),
      A_ij = h_ij g_ij / (||h_i.|| ||g_.j||) * w_j = exp(½ log_softmax_j + ½ log_softmax_i) * w_j,
  and h, g underflow only where A itself is below float range (DESIGN §7's concern);
- the row and column normalizations and weights are folded into the drift product
  (F = a s- A+y+ - r s+ A-y- - (a - r) s- s+ x, DESIGN §2 step 4), with the block sums s-, s+ read
  off an extra column of ones;
- work is cut into blocks of problems and rows, so memory is O(block) rather than O(problems*N*J).
  When a block holds only part of the rows, the column statistics need every row: a first pass
  gives S and each column's minimum distance, a second the column sums of g^2 per temperature, and
  the third the drift (distances are recomputed in each pass instead of stored).

Only the leading ``...`` dims are flattened to one problem axis L; nothing loops per problem.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import array_api_compat

from driftloss._distances import DIRECT_MAX_FEATURES
from driftloss._drift import RMS_FLOOR_SQ, SCALE_FLOOR, SELF_PENALTY, DriftOptions, kernel_columns

# Entries of the largest [L_block, T, rows, J] temporary; about 64 MiB per float32 array.
DEFAULT_BLOCK_ELEMENTS = 1 << 24


def fast_drift(x: Any, pos: Any, neg: Any, weights: tuple[Any, Any, Any], opts: DriftOptions,
               *, xp: Any, matmul: Callable[[Any, Any], Any],
               device: Callable[[Any], Any] = array_api_compat.device,
               block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> tuple[Any, Any, dict[str, Any]]:
    """``compute_drift`` (same arguments and results) by blocks of at most ``block_elements`` entries.

    x [..., N, D], pos [..., P, D], neg [..., M, D] or None; weights (x_w [..., N], neg_w [..., M]
    or None, pos_w [..., P]) at full shape; device(a) gives a's device (None for traced arrays).
    Returns (V [..., N, D], s, stats) as ``compute_drift``.
    """
    lead, n, d_feat = tuple(x.shape[:-2]), x.shape[-2], x.shape[-1]
    n_probs = math.prod(lead)
    y, w, n_neg = kernel_columns(x, pos, neg, weights, opts, xp=xp)
    j = y.shape[-2]
    x, y, w = (xp.reshape(x, (n_probs, n, d_feat)), xp.reshape(y, (n_probs, j, d_feat)),
               xp.reshape(w, (n_probs, j)))

    # Centre by the columns' mean: distances keep float32 accuracy and F is translation invariant.
    centre = xp.mean(y, axis=-2, keepdims=True)
    xc, yc = x - centre, y - centre
    ctx = _Context(xc=xc, yc=yc, w=w, n_neg=n_neg, opts=opts, xp=xp, matmul=matmul, device=device(x))
    n_taus = len(opts.taus)
    blocks = _blocks(n_probs, n, j * n_taus, block_elements)
    single = len(blocks) == 1
    rows_split = blocks[0][3] - blocks[0][2] < n

    # Pass 1: S (and, when rows are split, each column's smallest distance to a row other than itself).
    col_min = None
    if single:
        dist = ctx.distances(0, n_probs, 0, n)
        wsum = xp.sum(dist * xp.expand_dims(w, axis=-2))
    else:
        wsum, mins = 0.0, []
        for p0, p1, r0, r1 in blocks:
            dist = ctx.distances(p0, p1, r0, r1)
            wsum = wsum + xp.sum(dist * xp.expand_dims(w[p0:p1, ...], axis=-2))
            if rows_split and opts.kernel == "both":
                mask = ctx.self_mask(r0, r1)
                masked = dist if mask is None else xp.where(mask, xp.inf, dist)
                mins.append((p0, r0, xp.min(masked, axis=-2)))
        if mins:
            col_min = _combine_column_minima(mins, n_probs, xp)
    sums = xp.stack([wsum, n * xp.sum(w)])
    if opts.cross_replica_sum is not None:
        sums = opts.cross_replica_sum(sums)
    scale = sums[0] / xp.clip(sums[1], min=1e-30)
    unit = xp.clip(scale, min=SCALE_FLOOR)
    if opts.normalize:
        s = xp.clip(scale / math.sqrt(d_feat), min=SCALE_FLOOR)
        ctx.dist_unit, ctx.penalty = unit, SELF_PENALTY
    else:
        s = 1.0
        ctx.dist_unit, ctx.penalty = None, SELF_PENALTY * unit

    # Pass 2 (rows split, "both" kernel only): column sums of g^2 per temperature, [L, T, 1, J].
    col_stats = None
    if col_min is not None:
        col_min = ctx.penalized_column_min(col_min)
        per_block = {}
        for p0, p1, r0, r1 in blocks:
            d_hat = ctx.scaled(ctx.distances(p0, p1, r0, r1), r0, r1)
            g = ctx.column_factor_terms(d_hat, col_min[p0:p1, ...])
            part = xp.sum(g * g, axis=-2, keepdims=True)
            per_block[p0] = part if p0 not in per_block else per_block[p0] + part
        col_sq = xp.concat([per_block[p0] for p0 in sorted(per_block)], axis=0)
        col_stats = (col_min, col_sq)

    # Pass 3: the drift of each block, per temperature.
    f_blocks: dict[int, list[Any]] = {}
    neighbours = xp.zeros((n_taus,), dtype=x.dtype, device=device(x))
    for p0, p1, r0, r1 in blocks:
        dist = dist if single else ctx.distances(p0, p1, r0, r1)
        f, nb = ctx.block_drift(ctx.scaled(dist, r0, r1), p0, p1, r0, r1, col_stats)
        f_blocks.setdefault(p0, []).append(f)
        if opts.with_stats:
            neighbours = neighbours + nb
    f = xp.concat([xp.concat(f_blocks[p0], axis=-2) for p0 in sorted(f_blocks)], axis=0)  # [L, T, N, D]
    f = f / s

    # lambda_tau from the global mean of F_tau^2, then V = sum_tau F_tau / lambda_tau.
    sq = xp.sum(f * f, axis=(0, 2, 3))  # [T]
    count = float(n_probs * n * d_feat)
    if opts.cross_replica_sum is None:
        ms = sq / count
    else:
        total = opts.cross_replica_sum(
            xp.concat([sq, xp.asarray([count], dtype=sq.dtype, device=device(sq))]))
        ms = total[:n_taus] / total[n_taus]
    if opts.normalize:
        f = f / xp.reshape(xp.sqrt(xp.clip(ms, min=RMS_FLOOR_SQ)), (1, n_taus, 1, 1))
    v = xp.reshape(xp.sum(f, axis=1), (*lead, n, d_feat))

    stats: dict[str, Any] = {}
    if opts.with_stats:
        stats = {
            "scale": scale,
            "feature_scale": xp.asarray(s, dtype=x.dtype, device=device(x)),
            "drift_rms": xp.sqrt(ms),
            "neighbours": neighbours / float(n_probs * n),
        }
    return v, s, stats


def _blocks(n_probs: int, n: int, row_elements: int, budget: int) -> list[tuple[int, int, int, int]]:
    """(p0, p1, r0, r1) blocks of problems x rows with (p1-p0)*(r1-r0)*row_elements <= budget.

    Whole problems are grouped while one fits; otherwise one problem per block, split by rows.
    """
    per_problem = n * row_elements
    if per_problem <= budget:
        step = max(1, budget // per_problem)
        return [(p, min(p + step, n_probs), 0, n) for p in range(0, n_probs, step)]
    rows = max(1, budget // row_elements)
    return [(p, p + 1, r, min(r + rows, n)) for p in range(n_probs) for r in range(0, n, rows)]


def _combine_column_minima(mins: list[tuple[int, int, Any]], n_probs: int, xp: Any) -> Any:
    """Per-block column minima [1, J] (row-split blocks of one problem each) -> [L, J]."""
    per_problem: dict[int, Any] = {}
    for p0, _, m in mins:
        per_problem[p0] = m if p0 not in per_problem else xp.minimum(per_problem[p0], m)
    return xp.concat([per_problem[p] for p in range(n_probs)], axis=0)


class _Context:
    """The per-call arrays and the block computations of ``fast_drift``."""

    def __init__(self, *, xc, yc, w, n_neg, opts, xp, matmul, device):
        self.xc, self.yc, self.w, self.device = xc, yc, w, device
        self.n_neg, self.opts, self.xp, self.matmul = n_neg, opts, xp, matmul
        self.y2 = xp.sum(yc * yc, axis=-1)  # [L, J]
        self.dist_unit = None  # S floored, when distances are normalized
        self.penalty = None  # added to a sample's own (scaled) distance
        dt, dev = xc.dtype, device
        taus = opts.taus
        # Exponent factors [1, T, 1, 1]: 1/(2 tau) for the "both" halves, 1/tau otherwise.
        half = 0.5 if opts.kernel == "both" else 1.0
        rates = xp.asarray([half / t for t in taus], dtype=dt, device=dev)
        self.rate = xp.reshape(rates, (1, len(taus), 1, 1))
        self.y4 = xp.expand_dims(yc, axis=1)  # [L, 1, J, D]

    def self_mask(self, r0: int, r1: int) -> Any:
        """[rows, J] True where row i meets its own column (x counts as negatives), else None."""
        if not self.opts.x_as_negatives:
            return None
        xp, dev = self.xp, self.device
        rows = xp.expand_dims(xp.arange(r0, r1, device=dev), axis=-1)
        return rows == xp.expand_dims(xp.arange(self.yc.shape[-2], device=dev), axis=-2)

    def distances(self, p0: int, p1: int, r0: int, r1: int) -> Any:
        """d [p, rows, J] in the input units; exactly 0 on the self pairs."""
        xp = self.xp
        xb = self.xc[p0:p1, r0:r1, :]
        if xb.shape[-1] <= DIRECT_MAX_FEATURES:  # as the reference: exact differences for few features
            diff = xp.expand_dims(xb, axis=-2) - xp.expand_dims(self.yc[p0:p1, ...], axis=-3)
            d = xp.sqrt(xp.sum(diff * diff, axis=-1))
        else:
            x2 = xp.expand_dims(xp.sum(xb * xb, axis=-1), axis=-1)
            prod = self.matmul(xb, xp.matrix_transpose(self.yc[p0:p1, ...]))
            d = xp.sqrt(xp.clip(x2 + xp.expand_dims(self.y2[p0:p1, ...], axis=-2) - 2 * prod, min=0))
        mask = self.self_mask(r0, r1)
        return d if mask is None else xp.where(mask, 0.0, d)

    def scaled(self, dist: Any, r0: int, r1: int) -> Any:
        """d-hat [p, rows, J]: d / S (normalize) plus the self penalty."""
        xp = self.xp
        d_hat = dist if self.dist_unit is None else dist / self.dist_unit
        mask = self.self_mask(r0, r1)
        return d_hat if mask is None else xp.where(mask, d_hat + self.penalty, d_hat)

    def penalized_column_min(self, col_min: Any) -> Any:
        """Column minima of d-hat [L, J] from minima of d excluding self pairs [L, J]."""
        xp = self.xp
        m = col_min if self.dist_unit is None else col_min / self.dist_unit
        if self.opts.x_as_negatives:
            n, j = self.xc.shape[-2], self.yc.shape[-2]
            is_x = xp.arange(j, device=self.device) < n
            m = xp.where(is_x, xp.minimum(m, self.penalty + 0.0 * m), m)
        return m

    def column_factor_terms(self, d_hat: Any, col_min: Any) -> Any:
        """g = exp((min_i d - d) / 2tau) [p, T, rows, J], given the column minima [p, J]."""
        xp = self.xp
        return xp.exp(xp.expand_dims(xp.expand_dims(col_min, axis=-2) - d_hat, axis=1) * self.rate)

    def block_drift(self, d_hat: Any, p0: int, p1: int, r0: int, r1: int, col_stats: Any) -> tuple[Any, Any]:
        """F [p, T, rows, D] (centred coordinates, input units) and the neighbour sums [T]."""
        xp, opts = self.xp, self.opts
        e = xp.expand_dims(d_hat, axis=1)  # [p, 1, rows, J]
        row_f = col_f = None
        if opts.kernel == "both":
            h = xp.exp((xp.min(e, axis=-1, keepdims=True) - e) * self.rate)
            row_f = 1.0 / xp.linalg.vector_norm(h, axis=-1, keepdims=True)
            if col_stats is None:
                g = xp.exp((xp.min(e, axis=-2, keepdims=True) - e) * self.rate)
                col_f = 1.0 / xp.linalg.vector_norm(g, axis=-2, keepdims=True)
            else:
                col_min, col_sq = col_stats
                g = self.column_factor_terms(d_hat, col_min[p0:p1, ...])
                col_f = 1.0 / xp.sqrt(col_sq[p0:p1, ...])
            k = h * g
        elif opts.kernel == "y":
            k = xp.exp((xp.min(e, axis=-1, keepdims=True) - e) * self.rate)
            row_f = 1.0 / xp.sum(k, axis=-1, keepdims=True)
        else:
            k = xp.exp(-e * self.rate)
        w = xp.reshape(self.w[p0:p1, ...], (p1 - p0, 1, 1, -1))  # [p, 1, 1, J]
        if opts.affinity_floor > 0 or opts.with_stats:
            a = _scale(_scale(k, row_f), col_f)
            if opts.affinity_floor > 0:
                a = xp.clip(a, min=math.sqrt(opts.affinity_floor))
            neighbours = _neighbour_sums(a * w, xp) if opts.with_stats else None
            if opts.affinity_floor > 0:
                k, row_f, col_f = a, None, None
        else:
            neighbours = None
        col_w = w if col_f is None else col_f * w  # [p, T or 1, 1, J]
        y = self.y4[p0:p1, ...]  # [p, 1, J, D]
        nn = self.n_neg
        # Fold the column factors into whichever operand is smaller: the kernel block or the points.
        if k.shape[-2] <= y.shape[-1]:
            kw = k * col_w  # [p, T, rows, J]
            pb, t, rows, j = kw.shape
            # Temperatures stacked into the rows of one product (no broadcast copy of the points).
            kw3 = xp.reshape(kw, (pb, t * rows, j))
            y3 = self.yc[p0:p1, ...]  # [p, J, D]
            z_neg = xp.reshape(self.matmul(kw3[..., :nn], y3[..., :nn, :]), (pb, t, rows, -1))
            z_pos = xp.reshape(self.matmul(kw3[..., nn:], y3[..., nn:, :]), (pb, t, rows, -1))
            s_neg = xp.sum(kw[..., :nn], axis=-1, keepdims=True)  # [p, T, rows, 1]
            s_pos = xp.sum(kw[..., nn:], axis=-1, keepdims=True)
        else:
            cw = xp.matrix_transpose(col_w)  # [p, T or 1, J, 1]
            yw = y * cw  # [p, T or 1, J, D]
            k_neg, k_pos = k[..., :nn], k[..., nn:]
            z_neg, z_pos = self.matmul(k_neg, yw[..., :nn, :]), self.matmul(k_pos, yw[..., nn:, :])
            s_neg, s_pos = self.matmul(k_neg, cw[..., :nn, :]), self.matmul(k_pos, cw[..., nn:, :])
        z_neg, z_pos = _scale(z_neg, row_f), _scale(z_pos, row_f)
        s_neg, s_pos = _scale(s_neg, row_f), _scale(s_pos, row_f)
        a_, r_ = opts.attraction, opts.repulsion
        f = a_ * (s_neg * z_pos) - r_ * (s_pos * z_neg)
        if a_ != r_:
            f = f - (a_ - r_) * (s_neg * s_pos) * xp.expand_dims(self.xc[p0:p1, r0:r1, :], axis=1)
        return f, neighbours


def _scale(a: Any, factor: Any) -> Any:
    return a if factor is None else a * factor


def _neighbour_sums(a: Any, xp: Any) -> Any:
    """Sum over problems and rows of exp(entropy of the row of A normalized to 1) -> [T].

    a [p, T, rows, J]; divided by the number of rows this is ``effective_neighbours`` per tau.
    """
    total = xp.sum(a, axis=-1, keepdims=True)
    p = a / xp.where(total > 0, total, 1)
    plogp = xp.where(p > 0, p * xp.log(xp.where(p > 0, p, 1)), 0)
    return xp.sum(xp.exp(-xp.sum(plogp, axis=-1)), axis=(0, 2))
