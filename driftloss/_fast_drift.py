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
  the third the drift (distances are recomputed in each pass instead of stored). Blocks have equal
  sizes but for a remainder block, and each pass runs through a ``BlockLoop``: a Python loop of
  slices by default, one ``lax.scan`` per block size under JAX (adapters/jax_fast.py), where an
  unrolled loop lets XLA schedule all blocks' temporaries together.

Only the leading ``...`` dims are flattened to one problem axis L; nothing loops per problem.
The problems may come in segments, each with its own S, s and lambda as if it were a call of its
own (``drifting_loss_groups`` stacks the feature groups of one shape so): statistics are then
summed per segment ([G]-shaped) and handed back to each problem by its segment index.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import array_api_compat

from driftloss._distances import DIRECT_MAX_FEATURES
from driftloss._drift import RMS_FLOOR_SQ, SELF_PENALTY, DriftOptions, feature_scale, kernel_columns

# Entries of the largest [L_block, T, rows, J] temporary; about 64 MiB per float32 array.
DEFAULT_BLOCK_ELEMENTS = 1 << 24
# On a CPU, eager libraries make one pass over memory per elementwise op, so blocks are sized to stay
# in cache: whole problems grouped up to CPU_CACHE_ELEMENTS entries (b2-class at width 0.025, one
# thread: NumPy 1.1 s vs 3.4 s for the core, torch 1.6 s vs 3.7 s with 64 MiB blocks). A larger problem
# stays whole up to CPU_BLOCK_ELEMENTS (splitting its rows recomputes its distances in three passes);
# beyond that its rows are split, which bounds memory.
CPU_CACHE_ELEMENTS = 1 << 18
CPU_BLOCK_ELEMENTS = DEFAULT_BLOCK_ELEMENTS


def cpu_block_elements(x: Any, pos: Any, neg: Any, opts: DriftOptions, cache: int = CPU_CACHE_ELEMENTS,
                       block: int = CPU_BLOCK_ELEMENTS) -> int:
    """The block budget of ``fast_drift`` for eager CPU libraries (see CPU_CACHE_ELEMENTS)."""
    n_cols = pos.shape[-2] + (0 if neg is None else neg.shape[-2])
    n_cols += x.shape[-2] if opts.x_as_negatives else 0
    per_problem = x.shape[-2] * n_cols * len(opts.taus)
    return cache if per_problem <= cache else min(per_problem, block)


def cpu_compute_drift(x: Any, pos: Any, neg: Any, weights: tuple[Any, Any, Any], opts: DriftOptions,
                      *, xp: Any, matmul: Callable[[Any, Any], Any], device: Callable[[Any], Any],
                      segments: Sequence[int] | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """``compute_drift`` on the CPU (NumPy's hook): ``fast_drift`` with ``cpu_block_elements``."""
    budget = cpu_block_elements(x, pos, neg, opts, CPU_CACHE_ELEMENTS, CPU_BLOCK_ELEMENTS)
    return fast_drift(x, pos, neg, weights, opts, xp=xp, matmul=matmul, device=device, block_elements=budget,
                      segments=segments)


def _python_run(body: Callable[[Any, Any], tuple[Any, Any]], carry: Any, starts: list[int],
                axis: int) -> tuple[Any, list[Any]]:
    """``carry, piece = body(carry, start)`` for each start in order -> (last carry, the pieces).

    Pieces that are None are dropped; the caller concatenates the others along ``axis``.
    """
    pieces = []
    for start in starts:
        carry, piece = body(carry, start)
        if piece is not None:
            pieces.append(piece)
    return carry, pieces


def _python_take(a: Any, start: Any, size: int, axis: int) -> Any:
    """a[start:start + size] along ``axis`` (a view where the backend has views)."""
    return a[(slice(None),) * axis + (slice(start, start + size), ...)]


@dataclass(frozen=True)
class BlockLoop:
    """How ``fast_drift`` runs a pass over equal-size blocks; the default is a Python loop of slices.

    run(body, carry, starts, axis) -> (carry, pieces): ``carry, piece = body(carry, start)`` chained
    over ``starts`` in order, with the pieces (piece None: none) whose concatenation along ``axis`` is
    that of every block's piece; take(a, start, size, axis) is a[start:start + size] along ``axis``
    for a ``start`` that ``run`` passes to ``body`` (a traced index under JAX's lax.scan).
    """

    run: Callable[..., tuple[Any, list[Any]]] = _python_run
    take: Callable[[Any, Any, int, int], Any] = _python_take


PYTHON_LOOP = BlockLoop()


def fast_drift(x: Any, pos: Any, neg: Any, weights: tuple[Any, Any, Any], opts: DriftOptions,
               *, xp: Any, matmul: Callable[[Any, Any], Any],
               device: Callable[[Any], Any] = array_api_compat.device,
               block_elements: int = DEFAULT_BLOCK_ELEMENTS,
               loop: BlockLoop = PYTHON_LOOP,
               segments: Sequence[int] | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """``compute_drift`` (same arguments and results) by blocks of at most ``block_elements`` entries.

    x [..., N, D], pos [..., P, D], neg [..., M, D] or None; weights (x_w [..., N], neg_w [..., M]
    or None, pos_w [..., P]) at full shape; device(a) gives a's device (None for traced arrays).
    ``loop`` runs each pass over the blocks (adapters/jax_fast.py: one lax.scan per block size).
    ``segments``: for each of the L = prod(...) problems (row-major), the index in 0..G-1 of its
    segment. Each segment has its own S, s and lambda, as if its problems were a call of their own
    (the feature groups of ``drifting_loss_groups``, evaluated in one pass); None: one segment.
    Returns (V [..., N, D], s, stats) as ``compute_drift``; with segments, s and the stats carry a
    leading [G] axis (s [G], scale [G], feature_scale [G], drift_rms [G, T], neighbours [G, T]).
    """
    lead, n, d_feat = tuple(x.shape[:-2]), x.shape[-2], x.shape[-1]
    n_probs = math.prod(lead)
    runs, counts = _segment_counts(segments, n_probs)
    y, w, n_neg = kernel_columns(x, pos, neg, weights, opts, xp=xp)
    j = y.shape[-2]
    x, y, w = (xp.reshape(x, (n_probs, n, d_feat)), xp.reshape(y, (n_probs, j, d_feat)),
               xp.reshape(w, (n_probs, j)))

    # Centre by the columns' mean: distances keep float32 accuracy and F is translation invariant.
    centre = xp.mean(y, axis=-2, keepdims=True)
    xc, yc = x - centre, y - centre
    ctx = _Context(xc=xc, yc=yc, w=w, n_neg=n_neg, opts=opts, xp=xp, matmul=matmul, device=device(x),
                   take=loop.take, runs=runs)
    n_taus, n_segs = len(opts.taus), len(counts)
    plan = _Plan(n_probs, n, j * n_taus, block_elements)
    dt, dev = x.dtype, device(x)

    # Pass 1: S per segment (and, when rows are split, each column's smallest distance to a row
    # other than itself). Sums per problem [p] are added into per-segment sums [G].
    def weighted_sums(dist, b):
        return ctx.run_sums(xp.sum(dist * xp.expand_dims(ctx.problems(w, b), axis=-2), axis=(-2, -1)), b)

    col_min = None
    if plan.single:
        dist = ctx.distances(_Block(0, n_probs, 0, n))
        wsum = weighted_sums(dist, _Block(0, n_probs, 0, n))
    else:
        wsum = xp.zeros((n_segs,), dtype=dt, device=dev)
        if plan.rows_split and opts.kernel == "both":
            def sum_and_min(carry, b):  # carry: (wsum [G], this problem's column minima [1, J])
                dist = ctx.distances(b)
                mask = ctx.self_mask(b)
                masked = dist if mask is None else xp.where(mask, xp.inf, dist)
                col_min = xp.minimum(carry[1], xp.min(masked, axis=-2))
                return (carry[0] + weighted_sums(dist, b), col_min), None

            no_min, mins = xp.full((1, j), xp.inf, dtype=dt, device=dev), []
            for p in range(n_probs):
                (wsum, m), _ = plan.sweep(loop, sum_and_min, (wsum, no_min), xp, [p])
                mins.append(m)
            col_min = xp.concat(mins, axis=0)  # [L, J]
        else:
            wsum, _ = plan.sweep(loop, lambda c, b: (c + weighted_sums(ctx.distances(b), b), None), wsum, xp)
    w_total = n * ctx.run_sums(xp.sum(w, axis=-1))
    scale, unit, s = feature_scale(wsum, w_total, d_feat, opts, xp)  # each [G] (s: 1.0 without normalize)
    if opts.normalize:
        ctx.dist_unit, ctx.penalty = ctx.per_problem(unit, 3), SELF_PENALTY
    else:
        ctx.dist_unit, ctx.penalty = None, ctx.per_problem(SELF_PENALTY * unit, 3)

    # Pass 2 (rows split, "both" kernel only): column sums of g^2 per temperature, [L, T, 1, J].
    col_stats = None
    if col_min is not None:
        col_min = ctx.penalized_column_min(col_min)

        def sum_of_squares(col_sq, b):
            g = ctx.column_factor_terms(ctx.scaled(ctx.distances(b), b), ctx.problems(col_min, b))
            return col_sq + xp.sum(g * g, axis=-2, keepdims=True), None

        zeros = xp.zeros((1, n_taus, 1, j), dtype=dt, device=dev)
        col_sq = xp.concat([plan.sweep(loop, sum_of_squares, zeros, xp, [p])[0] for p in range(n_probs)],
                           axis=0)
        col_stats = (col_min, col_sq)

    # Pass 3: the drift of each block, per temperature; the neighbour sums [G, T] ride in the carry.
    def drift(neighbours, b):
        f, nb = ctx.block_drift(ctx.scaled(dist if plan.single else ctx.distances(b), b), b, col_stats)
        return (neighbours + ctx.run_sums(nb, b) if opts.with_stats else neighbours), f

    neighbours = xp.zeros((n_segs, n_taus), dtype=dt, device=dev)
    neighbours, f = plan.sweep(loop, drift, neighbours, xp)  # [L, T, N, D]
    f = f / ctx.per_problem(s, 4)

    # lambda_tau of each segment from its mean of F_tau^2, then V = sum_tau F_tau / lambda_tau.
    sq = ctx.run_sums(xp.sum(f * f, axis=(2, 3)))  # [G, T]
    counts_nd = xp.asarray([[float(c * n * d_feat)] for c in counts], dtype=dt, device=dev)  # [G, 1]
    if opts.cross_replica_sum is None:
        ms = sq / counts_nd
    else:
        total = opts.cross_replica_sum(xp.concat([sq, counts_nd], axis=-1))
        ms = total[:, :n_taus] / total[:, n_taus:]
    if opts.normalize:
        rms = xp.sqrt(xp.clip(ms, min=RMS_FLOOR_SQ))  # [G, T]
        f = f / ctx.per_problem(rms, 4)
    v = xp.reshape(xp.sum(f, axis=1), (*lead, n, d_feat))

    stats: dict[str, Any] = {}
    if opts.with_stats:
        rows = xp.asarray([[float(c * n)] for c in counts], dtype=dt, device=dev)
        feat = s if opts.normalize else xp.ones((n_segs,), dtype=dt, device=dev)
        stats = {"scale": scale, "feature_scale": feat, "drift_rms": xp.sqrt(ms),
                 "neighbours": neighbours / rows}
    if segments is None:  # one segment: scalars and [T], as compute_drift
        stats = {k: v_[0, ...] for k, v_ in stats.items()}
        s = s[0] if opts.normalize else s
    return v, s, stats


def _segment_counts(segments: Sequence[int] | None, n_probs: int) -> tuple[list[int] | None, list[int]]:
    """(segment index of each problem or None, problems per segment) of ``fast_drift``'s argument."""
    if segments is None:
        return None, [n_probs]
    runs = [int(r) for r in segments]
    if len(runs) != n_probs or min(runs, default=0) < 0:
        raise ValueError(f"fast_drift: segments must give each of the {n_probs} problems a segment index "
                         f">= 0; got {len(runs)} entries, smallest {min(runs, default=None)}")
    counts = [0] * (max(runs, default=-1) + 1)
    for r in runs:
        counts[r] += 1
    if 0 in counts:
        raise ValueError(f"fast_drift: segment {counts.index(0)} has no problems "
                         "(segments 0..G-1 must all occur)")
    return runs, counts


@dataclass(frozen=True)
class _Block:
    """Problems p0 .. p0+problems-1, rows r0 .. r0+rows-1; p0 or r0 may be a traced index."""

    p0: Any
    problems: int
    r0: Any
    rows: int


class _Plan:
    """Equal-size blocks of problems x rows with problems*rows*row_elements <= budget.

    Whole problems are grouped while one fits (rows = N); otherwise one problem per block, split by
    rows. Each sweep runs the full blocks as one ``loop.run`` (under JAX one lax.scan: XLA keeps one
    block's temporaries alive at a time, where unrolled blocks were scheduled together) and the
    remainder block, if any, as a second.
    """

    def __init__(self, n_probs: int, n: int, row_elements: int, budget: int):
        self.n_probs, self.n = n_probs, n
        per_problem = n * row_elements
        if per_problem <= budget:
            self.problems, self.rows = min(n_probs, max(1, budget // per_problem)), n
        else:
            self.problems, self.rows = 1, max(1, budget // row_elements)
        self.rows_split = self.rows < n
        self.single = self.problems == n_probs and not self.rows_split

    def sweep(self, loop: BlockLoop, body: Callable[[Any, _Block], tuple[Any, Any]], carry: Any, xp: Any,
              problems: list[int] | None = None) -> tuple[Any, Any]:
        """body(carry, block) -> (carry, piece [p, T, rows, D] or None) over the blocks, in order.

        ``problems``: sweep only these (rows split). Returns the last carry and the pieces joined
        into [L, T, N, D] (None if there were none).
        """
        if not self.rows_split:
            pieces = []
            for starts, size in _runs(self.n_probs, self.problems):
                carry, got = loop.run(lambda c, s, size=size: body(c, _Block(s, size, 0, self.n)),
                                      carry, starts, 0)
                pieces += got
            return carry, (xp.concat(pieces, axis=0) if pieces else None)
        per_problem = []
        for p in range(self.n_probs) if problems is None else problems:
            pieces = []
            for starts, size in _runs(self.n, self.rows):
                carry, got = loop.run(lambda c, s, size=size, p=p: body(c, _Block(p, 1, s, size)),
                                      carry, starts, 2)
                pieces += got
            if pieces:
                per_problem.append(xp.concat(pieces, axis=-2))
        return carry, (xp.concat(per_problem, axis=0) if per_problem else None)


def _runs(total: int, size: int) -> list[tuple[list[int], int]]:
    """[(starts, size)] covering 0..total-1: the blocks of ``size``, then the remainder block if any."""
    full = total // size * size
    runs = [(list(range(0, full, size)), size)] if full else []
    return runs + [([full], total - full)] if full < total else runs


class _Context:
    """The per-call arrays and the block computations of ``fast_drift``."""

    def __init__(self, *, xc, yc, w, n_neg, opts, xp, matmul, device, take, runs):
        self.xc, self.yc, self.w, self.device, self.take = xc, yc, w, device, take
        self.n_neg, self.opts, self.xp, self.matmul = n_neg, opts, xp, matmul
        self.y2 = xp.sum(yc * yc, axis=-1)  # [L, J]
        self.dist_unit = None  # S floored per problem [L or 1, 1, 1], when distances are normalized
        self.penalty = None  # added to a sample's own (scaled) distance: a number or [L or 1, 1, 1]
        dt, dev = xc.dtype, device
        # Segments of problems with their own statistics: index [L] and membership [L, G] (0/1).
        self.segmented = runs is not None
        if self.segmented:
            self.run_index = xp.asarray(runs, device=dev)
            member = xp.expand_dims(self.run_index, axis=-1) == xp.arange(max(runs) + 1, device=dev)
            self.membership = xp.astype(member, dt)
        taus = opts.taus
        # Exponent factors [1, T, 1, 1]: 1/(2 tau) for the "both" halves, 1/tau otherwise.
        half = 0.5 if opts.kernel == "both" else 1.0
        rates = xp.asarray([half / t for t in taus], dtype=dt, device=dev)
        self.rate = xp.reshape(rates, (1, len(taus), 1, 1))
        self.y4 = xp.expand_dims(yc, axis=1)  # [L, 1, J, D]

    def problems(self, a: Any, b: _Block) -> Any:
        """a[block's problems] for a [L, ...]."""
        return self.take(a, b.p0, b.problems, 0)

    def run_sums(self, a: Any, b: _Block | None = None) -> Any:
        """Sums over each segment's problems [G, ...] of per-problem values a [p, ...] (block b's, or
        all L)."""
        xp = self.xp
        if not self.segmented:
            return xp.sum(a, axis=0, keepdims=True)
        member = self.membership if b is None else self.problems(self.membership, b)  # [p, G]
        member = xp.reshape(member, (*member.shape, *(1,) * (a.ndim - 1)))
        # A masked sum, not a product with the 0/1 matrix: exact, and free of TF32 settings.
        return xp.sum(member * xp.expand_dims(a, axis=1), axis=0)

    def per_problem(self, v: Any, ndim: int) -> Any:
        """Per-segment values v [G, ...] (or a number) for every problem: [L, ...] ([1, ...] without
        segments), padded with trailing unit axes to ``ndim`` dims."""
        xp = self.xp
        if isinstance(v, (int, float)):
            return v
        if self.segmented:
            v = xp.take(v, self.run_index, axis=0)
        return xp.reshape(v, (*v.shape, *(1,) * (ndim - v.ndim)))

    def of_block(self, a: Any, b: _Block) -> Any:
        """``per_problem`` values for block b's problems (numbers and [1, ...] as they are)."""
        return a if isinstance(a, (int, float)) or not self.segmented else self.problems(a, b)

    def rows(self, a: Any, b: _Block) -> Any:
        """a[block's problems, block's rows] for a [L, N, ...]."""
        a = self.problems(a, b)
        return a if b.rows == a.shape[1] else self.take(a, b.r0, b.rows, 1)

    def self_mask(self, b: _Block) -> Any:
        """[rows, J] True where row i meets its own column (x counts as negatives), else None."""
        if not self.opts.x_as_negatives:
            return None
        xp, dev = self.xp, self.device
        rows = xp.expand_dims(xp.arange(b.rows, device=dev) + b.r0, axis=-1)
        return rows == xp.expand_dims(xp.arange(self.yc.shape[-2], device=dev), axis=-2)

    def distances(self, b: _Block) -> Any:
        """d [p, rows, J] in the input units; exactly 0 on the self pairs."""
        xp = self.xp
        xb, yb = self.rows(self.xc, b), self.problems(self.yc, b)
        if xb.shape[-1] <= DIRECT_MAX_FEATURES:  # as the reference: exact differences for few features
            diff = xp.expand_dims(xb, axis=-2) - xp.expand_dims(yb, axis=-3)
            d = xp.sqrt(xp.sum(diff * diff, axis=-1))
        else:
            x2 = xp.expand_dims(xp.sum(xb * xb, axis=-1), axis=-1)
            prod = self.matmul(xb, xp.matrix_transpose(yb))
            d = xp.sqrt(xp.clip(x2 + xp.expand_dims(self.problems(self.y2, b), axis=-2) - 2 * prod, min=0))
        mask = self.self_mask(b)
        return d if mask is None else xp.where(mask, 0.0, d)

    def scaled(self, dist: Any, b: _Block) -> Any:
        """d-hat [p, rows, J]: d / S (normalize) plus the self penalty."""
        xp = self.xp
        d_hat = dist if self.dist_unit is None else dist / self.of_block(self.dist_unit, b)
        mask = self.self_mask(b)
        return d_hat if mask is None else xp.where(mask, d_hat + self.of_block(self.penalty, b), d_hat)

    def penalized_column_min(self, col_min: Any) -> Any:
        """Column minima of d-hat [L, J] from minima of d excluding self pairs [L, J]."""
        xp = self.xp
        m = col_min if self.dist_unit is None else col_min / self.dist_unit[..., 0]
        if self.opts.x_as_negatives:
            n, j = self.xc.shape[-2], self.yc.shape[-2]
            is_x = xp.arange(j, device=self.device) < n
            penalty = self.penalty if isinstance(self.penalty, (int, float)) else self.penalty[..., 0]
            m = xp.where(is_x, xp.minimum(m, penalty + 0.0 * m), m)
        return m

    def column_factor_terms(self, d_hat: Any, col_min: Any) -> Any:
        """g = exp((min_i d - d) / 2tau) [p, T, rows, J], given the column minima [p, J]."""
        xp = self.xp
        return xp.exp(xp.expand_dims(xp.expand_dims(col_min, axis=-2) - d_hat, axis=1) * self.rate)

    def block_drift(self, d_hat: Any, b: _Block, col_stats: Any) -> tuple[Any, Any]:
        """F [p, T, rows, D] (centred coordinates, input units) and the neighbour sums [p, T]."""
        xp, opts = self.xp, self.opts
        e = xp.expand_dims(d_hat, axis=1)  # [p, 1, rows, J]
        row_f = col_f = None
        if opts.kernel == "both":
            h = xp.exp((xp.min(e, axis=-1, keepdims=True) - e) * self.rate)
            row_f = 1.0 / xp.linalg.vector_norm(h, axis=-1, keepdims=True)
            if col_stats is None:
                g = xp.exp((xp.min(e, axis=-2, keepdims=True) - e) * self.rate)
                # not vector_norm: torch's reduces across rows 13x slower than sum(g * g) on the CPU
                col_f = 1.0 / xp.sqrt(xp.sum(g * g, axis=-2, keepdims=True))
            else:
                col_min, col_sq = col_stats
                g = self.column_factor_terms(d_hat, self.problems(col_min, b))
                col_f = 1.0 / xp.sqrt(self.problems(col_sq, b))
            k = h * g
        elif opts.kernel == "y":
            k = xp.exp((xp.min(e, axis=-1, keepdims=True) - e) * self.rate)
            row_f = 1.0 / xp.sum(k, axis=-1, keepdims=True)
        else:
            k = xp.exp(-e * self.rate)
        w = xp.reshape(self.problems(self.w, b), (b.problems, 1, 1, -1))  # [p, 1, 1, J]
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
        y = self.problems(self.y4, b)  # [p, 1, J, D]
        nn = self.n_neg
        # Fold the column factors into whichever operand is smaller: the kernel block or the points.
        if k.shape[-2] <= y.shape[-1]:
            kw = k * col_w  # [p, T, rows, J]
            pb, t, rows, j = kw.shape
            # Temperatures stacked into the rows of one product (no broadcast copy of the points).
            kw3 = xp.reshape(kw, (pb, t * rows, j))
            y3 = self.problems(self.yc, b)  # [p, J, D]
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
            f = f - (a_ - r_) * (s_neg * s_pos) * xp.expand_dims(self.rows(self.xc, b), axis=1)
        return f, neighbours


def _scale(a: Any, factor: Any) -> Any:
    return a if factor is None else a * factor


def _neighbour_sums(a: Any, xp: Any) -> Any:
    """Sum over rows of exp(entropy of the row of A normalized to 1), per problem -> [p, T].

    a [p, T, rows, J]; divided by the number of rows this is ``effective_neighbours`` per tau.
    """
    total = xp.sum(a, axis=-1, keepdims=True)
    p = a / xp.where(total > 0, total, 1)
    plogp = xp.where(p > 0, p * xp.log(xp.where(p > 0, p, 1)), 0)
    return xp.sum(xp.exp(-xp.sum(plogp, axis=-1)), axis=2)
