"""A faster, memory-bounded evaluation of exactly the drift of docs/design.md §2 (compute_drift's contract).

Same numbers as the reference in ``_drift.py`` up to float rounding, computed with less work:

- one distance computation shared by all temperatures; all temperatures stacked on one axis;
- the "both" kernel from two exponentials per entry and temperature instead of three: with
  h = exp((min_j d - d) / 2tau) and g = exp((min_i d - d) / 2tau) (shifted so the largest entry
  of each row / column is exactly 1),
      A_ij = h_ij g_ij / (||h_i.|| ||g_.j||) * w_j = exp(½ log_softmax_j + ½ log_softmax_i) * w_j,
  and h, g underflow only where A itself is below float range (docs/design.md §7's concern);
- the squared distances come from one product of augmented points, [-2x, |x|^2, 1] . [y, 1, |y|^2],
  where copying the points costs less than the elementwise passes it saves (narrow points), else from
  x . y plus the squared norms; they stay in input units, with 1/S folded into the exponent rates;
- the row and column normalizations, weights, a, r and 1/s are folded into row coefficients of the
  drift product (F = a s- A+y+ - r s+ A-y- - (a - r) s- s+ x, docs/design.md §2 step 4); where the points
  are wider than the columns, the coefficients go on the kernel side and one signed product gives F;
- work is cut into blocks of problems and rows, so memory is O(block) rather than O(problems*N*J).
  With whole problems per block, a first pass gives S (and keeps the distances for the drift pass
  when they fit ``keep_elements``), a second the drift. When a block holds only part of the rows,
  the column statistics need every row: the first pass also gives each column's minimum distance,
  a second the column sums of g^2 per temperature, and the third the drift (distances recomputed
  in each pass). Blocks have equal sizes but for a remainder block, and each pass runs through a
  ``BlockLoop`` (_block_loop.py): a Python loop of slices by default, split across threads for
  NumPy, one ``lax.scan`` per block size under JAX (adapters/jax_fast.py), where an unrolled loop
  lets XLA schedule all blocks' temporaries together;
- the points are centred by the columns' mean, once for the whole call where the centred columns
  [L, J, D] fit ``column_elements`` (in place in their concat; x's rows are a view of them), else
  for each block from the caller's x, neg and pos, so that no [L, J, D] copy exists (wide feature
  maps of many locations on a GPU);
- sums of squares and the centred columns of a block take the library's one-pass forms where it has
  them (``FusedOps``; torch on accelerators: a vector norm reads its input once, and each part's
  centred rows are written into the block, not concatenated and then shifted in place);
- where the loop orders work (``BlockLoop.after``: JAX's accelerator plan), each run of blocks and each
  pass waits for the one before, through a zero added to the blocks' slices of the points: XLA would
  otherwise run them side by side, and merge a pass's recomputation of a block's columns with the
  first pass's, keeping every block's columns alive in between;
- lambda_tau's sums of squares are taken per block, and only V, not F, is joined across blocks
  (each block's F is dropped once its part of V is made); where F is large and the kernel has fewer
  columns than the points have dimensions, the blocks keep F's coefficients [p, T, rows, J] instead
  of F [p, T, rows, D], and V = (sum over tau of C / lambda) @ y takes one more product;
- the statistics' effective neighbours (exp of each kernel row's entropy) come from b = K col_w,
  which the drift product forms anyway, and log K in closed form (the exponents' arguments): one
  product and one product-sum per block instead of a log pass (the log is taken with an affinity
  floor, which has no closed form);
- the statistics' energy distance (driftloss/_progress.py) takes its x-pos and x-x sums from the first
  pass's distances (one row-weighted sum per block); the positives' own distances are a pass of their own
  over blocks of positives, the only new work.

Only the leading ``...`` dims are flattened to one problem axis L; nothing loops per problem.
The problems may come in segments, each with its own S, s and lambda as if it were a call of its
own (``drifting_loss_groups`` stacks the feature groups of one shape so): statistics are then
summed per segment ([G]-shaped) and handed back to each problem by its segment index.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import array_api_compat

from driftloss._backends import asarray_constant
from driftloss._block_loop import PYTHON_LOOP, BlockLoop, blas_on_one_thread, cpu_threads, threaded_loop
from driftloss._distances import DIRECT_MAX_FEATURES
from driftloss._drift import RMS_FLOOR_SQ, SELF_PENALTY, DriftOptions, column_parts, feature_scale
from driftloss._progress import (
    coefficients,
    mean_energy_distance,
    pair_sums,
    row_weighted_sums,
    self_distances,
)

# Entries of the largest [L_block, T, rows, J] temporary; about 64 MiB per float32 array.
DEFAULT_BLOCK_ELEMENTS = 1 << 24
# Distances [L, N, J] of a whole call kept between passes up to this many entries (64 MiB in float32);
# larger calls recompute them in the drift pass.
DEFAULT_KEEP_ELEMENTS = 1 << 24
# On a CPU, eager libraries make one pass over memory per elementwise op, so blocks are sized to stay
# in cache: whole problems grouped up to CPU_CACHE_ELEMENTS entries (b2-class at width 0.025, one
# thread: NumPy 1.1 s vs 3.4 s for the core, torch 1.6 s vs 3.7 s with 64 MiB blocks). A larger problem
# stays whole up to CPU_BLOCK_ELEMENTS (splitting its rows recomputes its distances in three passes);
# beyond that its rows are split into blocks of CPU_SPLIT_ELEMENTS, which bounds memory. Those are
# small: a 64 MiB temporary is a fresh mmap, page-faulted on every op (torch, N = P = 8192, 64-D:
# 2.1 s per step with 4 MiB blocks vs 5.4 s with 64 MiB ones, most of it system time).
CPU_CACHE_ELEMENTS = 1 << 18
CPU_BLOCK_ELEMENTS = DEFAULT_BLOCK_ELEMENTS
CPU_SPLIT_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class FusedOps:
    """Operations that a library can do in one pass over memory where their Array API form takes
    two (eager libraries run each elementwise operation as a pass of its own).

    sum_squares(xp, a, axis, keepdims) -> sum of a * a over ``axis``
    centred_concat(xp, parts, centre)  -> concat(parts, axis=-2) - centre, for parts [p, *, D] and
                                          centre [p, 1, D]; a fresh array
    """

    sum_squares: Callable[..., Any]
    centred_concat: Callable[[Any, list[Any], Any], Any]


def _sum_squares(xp: Any, a: Any, axis: Any, keepdims: bool = False) -> Any:
    return xp.sum(a * a, axis=axis, keepdims=keepdims)


def _centred_concat(xp: Any, parts: list[Any], centre: Any) -> Any:
    y = xp.concat(parts, axis=-2)
    y -= centre  # in place in the fresh concat
    return y


ARRAY_API_OPS = FusedOps(sum_squares=_sum_squares, centred_concat=_centred_concat)


def cpu_block_elements(x: Any, pos: Any, neg: Any, opts: DriftOptions, cache: int = CPU_CACHE_ELEMENTS,
                       block: int = CPU_BLOCK_ELEMENTS, split: int = CPU_SPLIT_ELEMENTS) -> int:
    """The block budget of ``fast_drift`` for eager CPU libraries (see CPU_CACHE_ELEMENTS)."""
    per_problem = _kernel_entries(x, pos, neg, opts)
    if per_problem <= cache:
        return cache
    return per_problem if per_problem <= block else split


def wide_points_block_elements(x: Any, pos: Any, neg: Any, opts: DriftOptions, budget: int) -> int:
    """A block budget (entries of [problems, T, rows, J]) for which the drift's block [problems, T,
    rows, D] also has at most ``budget`` entries: ``budget`` scaled by J / D where the points are
    wider than the columns (feature maps of thousands of channels)."""
    n_cols, d_feat = _column_count(x, pos, neg, opts), x.shape[-1]
    return budget if d_feat <= n_cols else max(1, budget * n_cols // d_feat)


def _kernel_entries(x: Any, pos: Any, neg: Any, opts: DriftOptions) -> int:
    """Entries of one problem's kernel over every temperature, [T, N, J]."""
    return len(opts.taus) * x.shape[-2] * _column_count(x, pos, neg, opts)


def _column_count(x: Any, pos: Any, neg: Any, opts: DriftOptions) -> int:
    """J: the kernel's columns per problem."""
    return pos.shape[-2] + (0 if neg is None else neg.shape[-2]) + (x.shape[-2] if opts.x_as_negatives else 0)


def cpu_compute_drift(x: Any, pos: Any, neg: Any, weights: tuple[Any, Any, Any], opts: DriftOptions,
                      *, xp: Any, matmul: Callable[[Any, Any], Any], device: Callable[[Any], Any],
                      segments: Sequence[int] | None = None,
                      after: Any = None) -> tuple[Any, Any, dict[str, Any]]:
    """``compute_drift`` on the CPU (NumPy's hook): ``fast_drift`` with ``cpu_block_elements``, its
    blocks split across ``cpu_threads()`` threads (NumPy's elementwise ops use one core each);
    ``after`` is ignored (NumPy runs operations in call order)."""
    # Threads pay for themselves from a cache-sized block each (a b2-class call of 4 small problems
    # took 1.2 ms on one thread, 1.4 ms on two).
    per_call = math.prod(x.shape[:-2]) * _kernel_entries(x, pos, neg, opts)
    threads = max(1, min(cpu_threads(), per_call // CPU_CACHE_ELEMENTS))
    budget = cpu_block_elements(x, pos, neg, opts, CPU_CACHE_ELEMENTS, CPU_BLOCK_ELEMENTS, CPU_SPLIT_ELEMENTS)
    with blas_on_one_thread() if threads > 1 else contextlib.nullcontext():
        return fast_drift(x, pos, neg, weights, opts, xp=xp, matmul=matmul, device=device,
                          block_elements=budget, segments=segments, loop=threaded_loop(threads), after=after)


def fast_drift(x: Any, pos: Any, neg: Any, weights: tuple[Any, Any, Any], opts: DriftOptions,
               *, xp: Any, matmul: Callable[[Any, Any], Any],
               device: Callable[[Any], Any] = array_api_compat.device,
               block_elements: int = DEFAULT_BLOCK_ELEMENTS,
               loop: BlockLoop = PYTHON_LOOP,
               segments: Sequence[int] | None = None,
               keep_elements: int = DEFAULT_KEEP_ELEMENTS,
               column_elements: int = DEFAULT_KEEP_ELEMENTS,
               augment: bool | None = None,
               constant: Callable[..., Any] = asarray_constant,
               drift_elements: int = DEFAULT_KEEP_ELEMENTS,
               after: Any = None, ops: FusedOps = ARRAY_API_OPS) -> tuple[Any, Any, dict[str, Any]]:
    """``compute_drift`` (same arguments and results) by blocks of at most ``block_elements`` entries.

    x [..., N, D], pos [..., P, D], neg [..., M, D] or None; weights (x_w [..., N], neg_w [..., M]
    or None, pos_w [..., P]) at full shape; device(a) gives a's device (None for traced arrays).
    ``loop`` runs each pass over the blocks (adapters/jax_fast.py: one lax.scan per block size).
    ``segments``: for each of the L = prod(...) problems (row-major), the index in 0..G-1 of its
    segment. Each segment has its own S, s and lambda, as if its problems were a call of their own
    (the feature groups of ``drifting_loss_groups``, evaluated in one pass); None: one segment.
    ``keep_elements``: when whole problems fit a block and all L * N * J distances have at most this
    many entries, the first pass keeps them for the drift pass instead of recomputing them there.
    ``column_elements``: the centred columns [L, J, D] are made once up to this many entries (or
    when a problem's rows are split), else for each block of whole problems, in each pass.
    ``augment`` (D > 4): squared distances from one product of augmented points (True), or from a
    product plus the squared norms in elementwise passes (False); None: whichever moves less memory.
    ``constant(xp, values, dtype, device)`` makes the arrays of Python numbers (``Backend.constant``).
    ``drift_elements``: F [L, T, N, D] is kept from the drift pass until lambda is known up to this
    many entries; above, where the kernel's coefficients [L, T, N, J] are smaller (J < D, wide
    features) and give F in one product, those are kept instead and V made from them by one more
    product (a third of the drift's for three temperatures) in place of the sum over F.
    ``after``: arrays that the call's work waits for, where ``loop.after`` orders work (XLA; the
    evaluations of ``drifting_loss_groups`` one after another); ignored by loops without it.
    ``ops``: the library's one-pass forms of sums of squares and centred concatenation (FusedOps).
    Returns (V [..., N, D], s, stats) as ``compute_drift``; with segments, s and the stats carry a
    leading [G] axis (s [G], scale [G], feature_scale [G], drift_rms [G, T], neighbours [G, T],
    energy_distance [G]).
    """
    lead, n, d_feat = tuple(x.shape[:-2]), x.shape[-2], x.shape[-1]
    n_probs = math.prod(lead)
    runs, counts = _segment_counts(segments, n_probs)
    cols, col_w, n_neg = column_parts(x, pos, neg, weights, opts)
    j = _column_count(x, pos, neg, opts)
    x, w = xp.reshape(x, (n_probs, n, d_feat)), xp.reshape(xp.concat(col_w, axis=-1), (n_probs, j))
    cols = [xp.reshape(c, (n_probs, c.shape[-2], d_feat)) for c in cols]
    n_taus, n_segs = len(opts.taus), len(counts)
    plan = _Plan(n_probs, n, j * n_taus, block_elements)

    # Centre by the columns' mean: distances keep float32 accuracy and F is translation invariant.
    # The centred columns [L, J, D] are made once where they fit column_elements (or a problem's rows
    # are split: few, large problems), else block by block: on the GPU plan they would be the largest
    # arrays of the call (b2-class: 1.8 GiB for one shape's groups).
    # Where the loop orders work, all of it is made from the points plus a zero that waits for
    # ``after`` (BlockLoop.after), added where they are read.
    zero = None
    if after is not None and loop.after is not None:
        zero = loop.after(xp.zeros((), dtype=x.dtype, device=device(x)), after)
    parts = cols if zero is None else [c + zero for c in cols]
    if plan.rows_split or n_probs * j * d_feat <= column_elements:
        yc = xp.concat(parts, axis=-2)
        centre = xp.mean(yc, axis=-2, keepdims=True)
        yc -= centre  # in place in a fresh concat; x's centred rows are a view of it where x is a column
        xc = yc[:, :n, :] if opts.x_as_negatives else x - centre
    else:
        centre = xp.sum(parts[0], axis=-2, keepdims=True)
        for c in parts[1:]:
            centre = centre + xp.sum(c, axis=-2, keepdims=True)
        centre, xc, yc = centre / j, None, None
    del parts
    ctx = _Context(x=x, cols=cols, centre=centre, xc=xc, yc=yc, w=w, n_neg=n_neg, opts=opts, xp=xp,
                   matmul=matmul, device=device(x), loop=loop, runs=runs, augment=augment,
                   constant=constant, zero=zero, ops=ops)
    if opts.x_as_negatives and not plan.rows_split:  # made once here, not inside a traced loop body
        ctx.whole_rows_mask = ctx.self_pairs(n, 0)
    if loop.after is not None:  # each run of blocks starts once the previous one's sums are made
        plan.before_run = ctx.run_after
    dt, dev = x.dtype, device(x)

    # Pass 1: S per segment (and, when rows are split, each column's smallest distance to a row
    # other than itself). Sums per problem [p] are added into per-segment sums [G].
    def weighted_sums(dist, b):
        """Sum of w_j d_ij over the block [G]; dist's self pairs are 0, or unset when rows are whole.
        With stats [G, 2]: and the block's part of the energy distance's x-pos and x-x terms."""
        wb = ctx.problems(w, b)
        per_problem = xp.sum(xp.sum(dist, axis=-2) * wb, axis=-1)  # [p]
        diag = None
        if opts.x_as_negatives and not plan.rows_split:
            # The self pairs (i, i) sit every J + 1 entries of the flattened block: take them out here
            # instead of a masked pass over the block.
            diag = xp.reshape(dist, (dist.shape[0], -1))[:, ::j + 1][:, :n]  # [p, N]
            per_problem = per_problem - xp.sum(diag * wb[:, :n], axis=-1)
        if progress is not None:
            per_problem = xp.stack([per_problem, progress.kernel_terms(dist, wb, diag, b)], axis=-1)
        return ctx.run_sums(per_problem, b)

    # With stats, pass 1 also sums the energy distance's x-pos and x-x terms (_progress.py).
    progress = _Progress(ctx, weights[0], n_neg) if opts.with_stats else None
    sums_shape = (n_segs,) if progress is None else (n_segs, 2)
    # kept: pass 1's distances, for the drift pass to reuse: one array [L, N, J], or one per block.
    col_min, kept = None, None
    if plan.single:
        kept = ctx.distances(_Block(0, n_probs, 0, n), zero_self=False)
        wsum = weighted_sums(kept, _Block(0, n_probs, 0, n))
    elif not plan.rows_split and n_probs * n * j <= keep_elements:
        def sums_kept(carry, b):
            dist = ctx.distances(b, zero_self=False)
            return carry + weighted_sums(dist, b), dist

        wsum, kept = plan.sweep(loop, sums_kept, xp.zeros(sums_shape, dtype=dt, device=dev), xp, join=False,
                                combine=_added)
        if len(kept) != plan.blocks():  # pieces that stack several blocks (lax.scan): join them
            kept = _joined(kept, 0, xp)
    else:
        wsum = xp.zeros(sums_shape, dtype=dt, device=dev)
        if plan.rows_split and opts.kernel == "both":
            def sum_and_min(carry, b):  # carry: (wsum [G], this problem's column minima [1, J])
                dist = ctx.distances(b)
                mask = ctx.self_mask(b)
                masked = dist if mask is None else xp.where(mask, xp.inf, dist)
                col_min = xp.minimum(carry[1], xp.min(masked, axis=-2))
                return (carry[0] + weighted_sums(dist, b), col_min), None

            def sum_and_minimum(c1, c2):
                return c1[0] + c2[0], xp.minimum(c1[1], c2[1])

            no_sum, no_min, mins = wsum, xp.full((1, j), xp.inf, dtype=dt, device=dev), []
            for p in range(n_probs):
                (sums_p, m), _ = plan.sweep(loop, sum_and_min, (no_sum, no_min), xp, [p],
                                            combine=sum_and_minimum)
                wsum = wsum + sums_p
                mins.append(m)
            col_min = xp.concat(mins, axis=0)  # [L, J]
        else:
            def sums(carry, b):
                return carry + weighted_sums(ctx.distances(b, zero_self=plan.rows_split), b), None

            wsum, _ = plan.sweep(loop, sums, wsum, xp, combine=_added)
    if progress is not None:
        wsum, progress.summed = wsum[:, 0], wsum[:, 1]
    w_total = n * ctx.run_sums(xp.sum(w, axis=-1))
    scale, unit, s = feature_scale(wsum, w_total, d_feat, opts, xp)  # each [G] (s: 1.0 without normalize)
    # Distances stay in input units: the self penalty (SELF_PENALTY in units of S) is converted to
    # them, and 1/S goes into the exponent rates, saving a division pass over every block.
    ctx.penalty = ctx.per_problem(SELF_PENALTY * unit, 3)  # [L or 1, 1, 1]
    if opts.normalize:
        ctx.rate = ctx.rate / ctx.per_problem(unit, 4)  # [L or 1, T, 1, 1]

    ctx.wait_for(wsum)  # the next pass makes its blocks' points again, once S is known
    # Pass 2 (rows split, "both" kernel only): column sums of g^2 per temperature, [L, T, 1, J].
    col_stats = None
    if col_min is not None:
        col_min = ctx.penalized_column_min(col_min)

        def sum_of_squares(col_sq, b):
            g = ctx.column_factor_terms(ctx.penalized(ctx.distances(b, zero_self=False), b),
                                        ctx.problems(col_min, b), b)
            return col_sq + ops.sum_squares(xp, g, -2, True), None

        zeros = xp.zeros((1, n_taus, 1, j), dtype=dt, device=dev)
        col_sq = xp.concat([plan.sweep(loop, sum_of_squares, zeros, xp, [p], combine=_added)[0]
                            for p in range(n_probs)], axis=0)
        col_stats = (col_min, col_sq)
        ctx.wait_for(col_sq)

    # F's coefficients C (F = C @ y) are kept instead of F where F is large and C smaller: the
    # one-product branch of block_drift (block rows and J at most D, attraction = repulsion).
    keep_coefficients = (n_probs * n_taus * n * d_feat > drift_elements and j < d_feat
                         and plan.rows <= d_feat and opts.attraction == opts.repulsion)

    # Pass 3: the drift of each block, per temperature. The carry holds the sums of F_tau^2 per
    # segment [G, T] (taken while the block is in cache) and the neighbour sums [G, T].
    def drift(carry, b):
        sq, neighbours = carry
        pts = ctx.block_points(b)
        if kept is None:
            dist = ctx.distances(b, zero_self=False, pts=pts)
        else:  # a Python loop's blocks have concrete starts: piece p0 // problems is block b's
            dist = kept[b.p0 // plan.problems] if isinstance(kept, list) else ctx.problems(kept, b)
        f, nb, coefficients = ctx.block_drift(ctx.penalized(dist, b), b, col_stats, pts)
        sq = sq + ctx.run_sums(ops.sum_squares(xp, f, (2, 3)), b)  # [G, T]
        carry = (sq, neighbours + ctx.run_sums(nb, b) if opts.with_stats else neighbours)
        return carry, (coefficients if keep_coefficients else f)

    zeros = xp.zeros((n_segs, n_taus), dtype=dt, device=dev)
    ctx.inv_feature_scale = ctx.per_problem(1.0 / s, 4)
    # F / s as pieces [p, T, N, D] along the problems (or their coefficients [p, T, N, J]): combined
    # over tau piece by piece below, so only V (a third of F's size for three temperatures) is joined.
    (sq, neighbours), pieces = plan.sweep(loop, drift, (zeros, zeros), xp, join=False, combine=_added)

    # lambda_tau of each segment from its mean of F_tau^2, then V = sum_tau F_tau / lambda_tau.
    counts_nd = constant(xp, [[float(c * n * d_feat)] for c in counts], dt, dev)  # [G, 1]
    if opts.cross_replica_sum is None:
        ms = sq / counts_nd
    else:
        total = opts.cross_replica_sum(xp.concat([sq, counts_nd], axis=-1))
        ms = total[:, :n_taus] / total[:, n_taus:]
    if opts.normalize:
        rms = xp.sqrt(xp.clip(ms, min=RMS_FLOOR_SQ))  # [G, T]
        inv_rms = xp.reshape(ctx.per_problem(1.0 / rms, 2), (-1, 1, n_taus))  # [L or 1, 1, T]

    def v_of(f, p0):
        """V [p, N, D] of problems p0.. from their F / s [p, T, N, D] (or F's coefficients [p, T, N, J])."""
        n_p, width = f.shape[0], f.shape[-1]
        if opts.normalize:  # the sum over tau as one product [p, 1, T] @ [p, T, N * width]: one pass
            inv = inv_rms if inv_rms.shape[0] == 1 else ctx.take(inv_rms, p0, n_p, 0)
            summed = ctx.matmul(inv, xp.reshape(f, (n_p, n_taus, n * width)))[:, 0, :]  # [p, N * width]
            summed = xp.reshape(summed, (n_p, n, width))
        else:
            summed = xp.sum(f, axis=1)
        if keep_coefficients:  # V = (sum over tau of C / lambda) @ y, y the problems' centred columns
            summed = ctx.matmul(summed, ctx.block_points(_Block(p0, n_p, 0, n))[1])
        return summed

    if keep_coefficients:
        ctx.wait_for(sq)  # the columns are made again for V: after the drift pass, not kept from it
    v_pieces, p0 = [], 0
    pieces.reverse()
    while pieces:  # each piece of F is dropped once its part of V is made: F and V are not both whole
        f = pieces.pop()
        if keep_coefficients and not plan.rows_split and f.shape[0] > plan.problems:
            # a run of blocks in one piece (lax.scan's): their V block by block, as their columns
            starts = list(range(0, f.shape[0], plan.problems))
            v_pieces += loop.run(lambda c, s, f=f, p0=p0: (c, v_of(ctx.take(f, s, plan.problems, 0), p0 + s)),
                                 ctx.zero, starts, 0)[1]
        else:
            v_pieces.append(v_of(f, p0))
        p0 += f.shape[0]
        del f
    v = xp.reshape(_joined(v_pieces, 0, xp), (*lead, n, d_feat))

    stats: dict[str, Any] = {}
    if opts.with_stats:
        rows = constant(xp, [[float(c * n)] for c in counts], dt, dev)
        feat = s if opts.normalize else xp.ones((n_segs,), dtype=dt, device=dev)
        stats = {"scale": scale, "feature_scale": feat, "drift_rms": xp.sqrt(ms),
                 "neighbours": neighbours / rows,
                 "energy_distance": progress.mean(loop, counts, unit if opts.normalize else None,
                                                  block_elements, constant)}
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
        # (carry so far, carry the run starts from) -> the latter, before each run (fast_drift: ordered)
        self.before_run: Callable[[Any, Any], Any] | None = None

    def sweep(self, loop: BlockLoop, body: Callable[[Any, _Block], tuple[Any, Any]], carry: Any, xp: Any,
              problems: list[int] | None = None, join: bool = True,
              combine: Callable[[Any, Any], Any] | None = None) -> tuple[Any, Any]:
        """body(carry, block) -> (carry, piece [p, ...rows...] or None) over the blocks, in order.

        ``problems``: sweep only these (rows split). Returns the last carry and the pieces joined
        along problems and rows, e.g. into [L, T, N, D] (None if there were none); join=False: the
        list of pieces, in order, that would be joined along the problems axis (no copy).
        ``combine``: merges two carries, the given carry being its identity (zeros for sums); the loop
        may then run blocks on separate threads (``BlockLoop.run``).
        """
        identity = carry

        def run(block_at, starts, axis):
            nonlocal carry
            start = carry if combine is None else identity
            if self.before_run is not None:
                start = self.before_run(carry, start)
            if combine is None:  # in order, the carry chained through every block
                carry, got = loop.run(block_at, start, starts, axis)
            else:  # each run of blocks from the identity, merged into the carry so far
                got_carry, got = loop.run(block_at, start, starts, axis, combine)
                carry = combine(carry, got_carry)
            return got

        if not self.rows_split:
            pieces = []
            for starts, size in _runs(self.n_probs, self.problems):
                pieces += run(lambda c, s, size=size: body(c, _Block(s, size, 0, self.n)), starts, 0)
            return carry, (_joined(pieces, 0, xp) if join else pieces)
        per_problem = []
        for p in range(self.n_probs) if problems is None else problems:
            pieces = []
            for starts, size in _runs(self.n, self.rows):
                pieces += run(lambda c, s, size=size, p=p: body(c, _Block(p, 1, s, size)), starts, 2)
            if pieces:
                per_problem.append(_joined(pieces, -2, xp))
        return carry, (_joined(per_problem, 0, xp) if join else per_problem)

    def blocks(self) -> int:
        """The number of blocks of a sweep over all problems."""
        per_problem = 1 if not self.rows_split else -(-self.n // self.rows)
        return -(-self.n_probs // self.problems) * per_problem


def _joined(pieces: list[Any], axis: int, xp: Any) -> Any:
    """The pieces concatenated along ``axis`` (one piece as it is, no pieces None)."""
    if len(pieces) <= 1:
        return pieces[0] if pieces else None
    return xp.concat(pieces, axis=axis)


def _runs(total: int, size: int) -> list[tuple[list[int], int]]:
    """[(starts, size)] covering 0..total-1: the blocks of ``size``, then the remainder block if any."""
    full = total // size * size
    runs = [(list(range(0, full, size)), size)] if full else []
    return runs + [([full], total - full)] if full < total else runs


class _Context:
    """The per-call arrays and the block computations of ``fast_drift``."""

    def __init__(self, *, x, cols, centre, xc, yc, w, n_neg, opts, xp, matmul, device, loop, runs, augment,
                 constant, zero=None, ops=ARRAY_API_OPS):
        """x [L, N, D] and the column parts ``cols`` [L, *, D] as given, their centre [L, 1, D]; xc, yc:
        the centred rows and columns [L, N, D], [L, J, D] where the call keeps them whole, else None
        (made block by block, for blocks of whole problems only); ``zero``: see ``wait_for``."""
        self.x, self.cols, self.centre, self.xc, self.yc = x, cols, centre, xc, yc
        self.w, self.device, self.take, self.after = w, device, loop.take, loop.after
        self.n_neg, self.opts, self.xp, self.matmul, self.ops = n_neg, opts, xp, matmul, ops
        n, d_feat, j = x.shape[-2], x.shape[-1], sum(c.shape[-2] for c in cols)
        self.n, self.j, self.d_feat = n, j, d_feat
        self.augmented = False  # squared distances from one product of augmented points
        self.x_sq = self.y_sq = self.x_gram = self.y_gram = None  # of whole xc, yc (else per block)
        if d_feat > DIRECT_MAX_FEATURES:
            # [-2x, |x|^2, 1] . [y, 1, |y|^2] = |x|^2 + |y|^2 - 2 x.y (scaling by -2 is exact) saves three
            # elementwise passes over each [rows, J] block, but copies the points: by default only while
            # the copies, (N + J) (D + 2) entries per problem, are smaller than those passes, 3 N J.
            self.augmented = (n + j) * (d_feat + 2) < 3 * n * j if augment is None else augment
            if yc is not None:
                x2, y2 = self.squared_norms(xc, yc)
                if self.augmented:
                    self.x_gram, self.y_gram = self.grams(xc, yc, x2, y2)
                else:
                    self.x_sq, self.y_sq = x2, xp.matrix_transpose(y2)  # [L, N, 1], [L, 1, J]
        self.whole_rows_mask = None  # the self-pair mask [N, J] of blocks of whole problems
        self.zero = zero  # 0, made to wait for the work blocks must follow (wait_for), or None
        self.penalty = None  # a sample's distance to itself [L or 1, 1, 1], set once S is known
        self.inv_feature_scale = 1.0  # 1/s: a number or [L or 1, 1, 1, 1], set once S is known
        dt, dev = x.dtype, device
        # Segments of problems with their own statistics: index [L] and membership [L, G] (0/1).
        self.segmented = runs is not None
        if self.segmented:
            self.run_index = constant(xp, runs, None, dev)
            member = xp.expand_dims(self.run_index, axis=-1) == xp.arange(max(runs) + 1, device=dev)
            self.membership = xp.astype(member, dt)
        taus = opts.taus
        # Exponent factors [1, T, 1, 1]: 1/(2 tau) for the "both" halves, 1/tau otherwise.
        half = 0.5 if opts.kernel == "both" else 1.0
        rates = constant(xp, [half / t for t in taus], dt, dev)
        self.rate = xp.reshape(rates, (1, len(taus), 1, 1))
        self.is_pos = xp.arange(j, device=dev) >= n_neg  # [J]: the positive columns

    def wait_for(self, dep: Any) -> None:
        """Blocks made from here on make their points after ``dep`` (arrays) exists, where the loop
        orders work (``BlockLoop.after``): a zero made to wait for it is added to each block's slices
        of the points, so that no slice is shared with (and kept from) an earlier pass either."""
        if self.after is not None and self.yc is None:
            zero = self.zero
            if zero is None:
                zero = self.xp.zeros((), dtype=self.x.dtype, device=self.device)
            self.zero = self.after(zero, dep)

    def run_after(self, carry: Any, start: Any) -> Any:
        """``_Plan.before_run``: the blocks of the next run wait for ``carry`` (``wait_for``), and so
        does the carry ``start`` they run from (a loop may make its outputs once that exists)."""
        self.wait_for(carry)
        return start if self.zero is None else self.after(start, self.zero)

    def squared_norms(self, xc: Any, yc: Any) -> tuple[Any, Any]:
        """(|x|^2 [..., N, 1], |y|^2 [..., J, 1]) of centred points; xc holds all N rows of x, which
        are yc's first N rows where x counts as negatives (their norms are then taken once)."""
        xp = self.xp
        y2 = self.ops.sum_squares(xp, yc, -1, True)
        if self.opts.x_as_negatives and xc.shape[-2] == self.n:
            return y2[..., :self.n, :], y2
        return self.ops.sum_squares(xp, xc, -1, True), y2

    def grams(self, xc: Any, yc: Any, x2: Any, y2: Any) -> tuple[Any, Any]:
        """The augmented points [-2x, |x|^2, 1] [..., N, D + 2] and [y, 1, |y|^2] [..., J, D + 2]."""
        xp = self.xp
        return (xp.concat([-2 * xc, x2, xp.ones_like(x2)], axis=-1),
                xp.concat([yc, xp.ones_like(y2), y2], axis=-1))

    def block_points(self, b: _Block) -> tuple[Any, Any]:
        """(x's rows [p, rows, D], the columns [p, J, D]) of block b, centred: views of the whole
        centred points, or made for the block (whole problems) from the parts."""
        if self.yc is not None:
            return self.rows(self.xc, b), self.problems(self.yc, b)
        xp = self.xp
        centre = self.problems(self.centre, b)
        parts = [self.problems(c, b) for c in self.cols]
        if self.zero is not None:  # (wait_for)
            parts = [p + self.zero for p in parts]
        yb = self.ops.centred_concat(xp, parts, centre)
        xb = yb[:, :self.n, :] if self.opts.x_as_negatives else self.problems(self.x, b) - centre
        return xb, yb

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
        return a if isinstance(a, (int, float)) or a.shape[0] == 1 else self.problems(a, b)

    def rows(self, a: Any, b: _Block) -> Any:
        """a[block's problems, block's rows] for a [L, N, ...]."""
        a = self.problems(a, b)
        return a if b.rows == a.shape[1] else self.take(a, b.r0, b.rows, 1)

    def self_mask(self, b: _Block) -> Any:
        """[rows, J] True where row i meets its own column (x counts as negatives), else None."""
        if not self.opts.x_as_negatives:
            return None
        if self.whole_rows_mask is not None and b.rows == self.whole_rows_mask.shape[0]:
            return self.whole_rows_mask
        return self.self_pairs(b.rows, b.r0)

    def self_pairs(self, rows: int, r0: Any) -> Any:
        """[rows, J] True where row r0 + i meets its own column."""
        xp, dev = self.xp, self.device
        row = xp.expand_dims(xp.arange(rows, device=dev) + r0, axis=-1)
        return row == xp.expand_dims(xp.arange(self.j, device=dev), axis=-2)

    def distances(self, b: _Block, zero_self: bool = True, pts: tuple[Any, Any] | None = None) -> Any:
        """d [p, rows, J] in the input units; exactly 0 on the self pairs (unset with zero_self=False,
        for ``penalized``, which overwrites them). ``pts``: the block's ``block_points`` if made."""
        xp = self.xp
        xb, yb = self.block_points(b) if pts is None else pts
        if self.d_feat <= DIRECT_MAX_FEATURES:  # as the reference: exact differences for few features
            diff = xp.expand_dims(xb, axis=-2) - xp.expand_dims(yb, axis=-3)
            d = xp.sqrt(xp.sum(diff * diff, axis=-1))
        elif self.augmented:
            if self.x_gram is not None:
                xg, yg = self.rows(self.x_gram, b), self.problems(self.y_gram, b)
            else:
                xg, yg = self.grams(xb, yb, *self.squared_norms(xb, yb))
            d = xp.sqrt(xp.clip(self.matmul(xg, xp.matrix_transpose(yg)), min=0))
        else:
            if self.x_sq is not None:
                x2, y2 = self.rows(self.x_sq, b), self.problems(self.y_sq, b)
            else:
                x2, y2 = self.squared_norms(xb, yb)
                y2 = xp.matrix_transpose(y2)
            d2 = x2 + (y2 - 2 * self.matmul(xb, xp.matrix_transpose(yb)))
            d = xp.sqrt(xp.clip(d2, min=0))
        mask = self.self_mask(b) if zero_self else None
        return d if mask is None else xp.where(mask, 0.0, d)

    def penalized(self, dist: Any, b: _Block) -> Any:
        """d [p, rows, J] with the self penalty: a self distance is 0 (or unset), so it becomes the
        penalty itself."""
        mask = self.self_mask(b)
        return dist if mask is None else self.xp.where(mask, self.of_block(self.penalty, b), dist)

    def penalized_column_min(self, col_min: Any) -> Any:
        """Column minima of the penalized d [L, J] from minima of d excluding self pairs [L, J]."""
        xp = self.xp
        if not self.opts.x_as_negatives:
            return col_min
        is_x = xp.arange(self.j, device=self.device) < self.n
        return xp.where(is_x, xp.minimum(col_min, self.penalty[..., 0] + 0.0 * col_min), col_min)

    def column_factor_terms(self, dist: Any, col_min: Any, b: _Block) -> Any:
        """g = exp((min_i d - d) / 2tau S) [p, T, rows, J], given the column minima [p, J]."""
        xp = self.xp
        terms = xp.expand_dims(xp.expand_dims(col_min, axis=-2) - dist, axis=1)  # [p, 1, rows, J]
        return xp.exp(terms * self.of_block(self.rate, b))

    def block_drift(self, dist: Any, b: _Block, col_stats: Any,
                    pts: tuple[Any, Any]) -> tuple[Any, Any, Any]:
        """(F / s [p, T, rows, D] (centred coordinates, feature units), the neighbour sums [p, T], the
        coefficients C [p, T, rows, J] with F / s = C @ y where one product gives F, else None), from
        the penalized distances [p, rows, J] and the block's points (``block_points``)."""
        xp, opts = self.xp, self.opts
        e = xp.expand_dims(dist, axis=1)  # [p, 1, rows, J]
        rate = self.of_block(self.rate, b)  # [p or 1, T, 1, 1]
        row_norm = col_f = None  # the row factor is 1 / row_norm
        # log K = rate (row_min + col_min - times * e), for the statistics' entropies
        row_min = col_min = None
        times = 1.0
        if opts.kernel == "both":
            row_min = xp.min(e, axis=-1, keepdims=True)  # [p, 1, rows, 1]
            h = xp.exp((row_min - e) * rate)
            row_norm = xp.linalg.vector_norm(h, axis=-1, keepdims=True)
            if col_stats is None:
                col_min = xp.min(e, axis=-2, keepdims=True)  # [p, 1, 1, J]
                g = xp.exp((col_min - e) * rate)
                # ops: sum(g * g) on the CPU, where torch's vector norm across rows is 13x slower
                col_f = 1.0 / xp.sqrt(self.ops.sum_squares(xp, g, -2, True))
            else:
                col_min, col_sq = self.problems(col_stats[0], b), col_stats[1]
                g = self.column_factor_terms(dist, col_min, b)
                col_min = xp.reshape(col_min, (b.problems, 1, 1, -1))
                col_f = 1.0 / xp.sqrt(self.problems(col_sq, b))
            k, times = h * g, 2.0
        elif opts.kernel == "y":
            row_min = xp.min(e, axis=-1, keepdims=True)
            k = xp.exp((row_min - e) * rate)
            row_norm = xp.sum(k, axis=-1, keepdims=True)
        else:
            k = xp.exp(-e * rate)
        w = xp.reshape(self.problems(self.w, b), (b.problems, 1, 1, -1))  # [p, 1, 1, J]
        log_k = (row_min, col_min, times)
        if opts.affinity_floor > 0:  # the floor applies to the normalized A: form it, and use it as K
            a = _scale(k if row_norm is None else k / row_norm, col_f)
            k, row_norm, col_f = xp.clip(a, min=math.sqrt(opts.affinity_floor)), None, None
            log_k = None  # no closed form: the entropies take the log of K col_w
        col_w = w if col_f is None else col_f * w  # [p, T or 1, 1, J]
        neighbours = None  # A w is K col_w scaled per row, so the entropies come from K col_w

        def neighbour_sums(kw, total):
            b_log_b = None if log_k is None else self.b_log_b(kw, total, e, rate, log_k, col_w)
            return _neighbour_sums(kw, xp, total, b_log_b)

        nn, (pb, t, rows, j), d_feat = self.n_neg, k.shape, self.d_feat
        coefficients_of_f = None  # C with F = C @ y, where one product gives F
        xb, y3 = pts  # [p, rows, D], [p, J, D]
        # Row coefficients [p, T, rows, 1]: F = c+ (K+ y+) - c- (K- y-), with c+ = a s- / (s r^2),
        # c- = r s+ / (s r^2) for the row normalization r^2 (it scales both K and the other side's sum).
        common = self.of_block(self.inv_feature_scale, b)
        if row_norm is not None:
            common = common / (row_norm * row_norm)
        a_, r_ = opts.attraction, opts.repulsion

        def coefficients(s_neg, s_pos):
            return _times(common * s_neg, a_), _times(common * s_pos, r_)

        # Fold the column factors into whichever operand is smaller: the kernel block or the points.
        if rows <= d_feat:
            kw = k * col_w  # [p, T, rows, J]
            s_neg = xp.sum(kw[..., :nn], axis=-1, keepdims=True)  # [p, T, rows, 1]
            s_pos = xp.sum(kw[..., nn:], axis=-1, keepdims=True)
            if opts.with_stats:
                neighbours = neighbour_sums(kw, s_neg + s_pos)
            c_pos, c_neg = coefficients(s_neg, s_pos)
            if j <= d_feat:  # the coefficients on the kernel side: one product gives F itself
                signed = kw * xp.where(self.is_pos, c_pos, -c_neg)
                f = xp.reshape(self.matmul(xp.reshape(signed, (pb, t * rows, j)), y3), (pb, t, rows, d_feat))
                coefficients_of_f = signed
            else:  # temperatures stacked into the rows of each product (no broadcast copy of the points)
                kw3 = xp.reshape(kw, (pb, t * rows, j))
                z_neg = xp.reshape(self.matmul(kw3[..., :nn], y3[..., :nn, :]), (pb, t, rows, d_feat))
                z_pos = xp.reshape(self.matmul(kw3[..., nn:], y3[..., nn:, :]), (pb, t, rows, d_feat))
                f = c_pos * z_pos - c_neg * z_neg
        else:
            cw = xp.matrix_transpose(col_w)  # [p, T or 1, J, 1]
            yw = xp.expand_dims(y3, axis=1) * cw  # [p, T or 1, J, D]
            k_neg, k_pos = k[..., :nn], k[..., nn:]
            z_neg, z_pos = self.matmul(k_neg, yw[..., :nn, :]), self.matmul(k_pos, yw[..., nn:, :])
            s_neg, s_pos = self.matmul(k_neg, cw[..., :nn, :]), self.matmul(k_pos, cw[..., nn:, :])
            if opts.with_stats:
                neighbours = neighbour_sums(k * col_w, s_neg + s_pos)
            c_pos, c_neg = coefficients(s_neg, s_pos)
            f = c_pos * z_pos - c_neg * z_neg
        if a_ != r_:
            f = f - ((a_ - r_) * common * s_neg * s_pos) * xp.expand_dims(xb, axis=1)
            coefficients_of_f = None
        return f, neighbours, coefficients_of_f

    def b_log_b(self, kw: Any, total: Any, e: Any, rate: Any, log_k: tuple[Any, Any, float],
                col_w: Any) -> Any:
        """Sum over each row of b log b [p, T, rows, 1] for b = K col_w [p, T, rows, J] with row sums
        ``total``, from log K = rate (row_min + col_min - times * e) (``log_k``; a min None: 0) and the
        penalized distances e [p, 1, rows, J]: no log pass over the block. Where col_w is 0, b is 0."""
        xp = self.xp
        row_min, col_min, times = log_k
        log_w = xp.log(xp.where(col_w > 0, col_w, 1.0))  # [p, T or 1, 1, J]
        u = log_w if col_min is None else log_w + rate * col_min  # [p, T or 1, 1, J]
        s = self.matmul(kw, xp.matrix_transpose(u)) - (times * rate) * xp.sum(kw * e, axis=-1, keepdims=True)
        return s if row_min is None else s + rate * row_min * total


class _Progress:
    """The energy distance of ``fast_drift``'s stats (driftloss/_progress.py): its x-pos and x-x terms
    from the first pass's distances (``kernel_terms``), its pos-pos term (and the x-x term where x is not
    a column) in a pass of its own over blocks of those points (``mean``)."""

    def __init__(self, ctx: _Context, x_w: Any, n_neg: int):
        xp = ctx.xp
        self.ctx, self.n_neg = ctx, n_neg
        self.x_w = xp.reshape(x_w, (ctx.x.shape[0], ctx.n))  # [L, N]
        self.pos_w = ctx.w[:, n_neg:]  # [L, P]
        self.c_xp, self.c_xx, self.c_pp = coefficients(self.x_w, self.pos_w, xp=xp)  # [L] each
        self.summed = None  # [G]: the sums of the first pass's terms over each segment's problems

    def kernel_terms(self, dist: Any, wb: Any, diag: Any, b: _Block) -> Any:
        """[p]: the x-pos term of block b's rows (and the x-x term where x are columns) from its distances
        dist [p, rows, J] and column weights wb [p, J]; the self pairs are 0, or unset with diag [p, N]."""
        ctx, xp, nn = self.ctx, self.ctx.xp, self.n_neg
        a = ctx.rows(self.x_w, b)  # [p, rows]
        r = row_weighted_sums(dist, a, xp=xp)  # [p, J]
        terms = ctx.problems(self.c_xp, b) * xp.sum(r[:, nn:] * wb[:, nn:], axis=-1)
        if ctx.opts.x_as_negatives:  # x's columns come first, weighted by x_w
            within = xp.sum(r[:, :ctx.n] * wb[:, :ctx.n], axis=-1)
            if diag is not None:
                within = within - xp.sum(diag * a * a, axis=-1)
            terms = terms + ctx.problems(self.c_xx, b) * within
        return terms

    def mean(self, loop: BlockLoop, counts: list[int], unit: Any, block_elements: int,
             constant: Callable[..., Any]) -> Any:
        """stats["energy_distance"] [G] (``unit``: max(S, 1e-3) [G], or None for raw units)."""
        ctx, xp = self.ctx, self.ctx.xp
        summed = self.summed + self._within(ctx.cols[-1], self.pos_w, self.c_pp, loop, block_elements)
        if not ctx.opts.x_as_negatives:
            summed = summed + self._within(ctx.x, self.x_w, self.c_xx, loop, block_elements)
        problems = constant(xp, [float(c) for c in counts], summed.dtype, ctx.device)
        return mean_energy_distance(summed, problems, unit, ctx.opts.cross_replica_sum, xp=xp)

    def _within(self, points: Any, w: Any, coef: Any, loop: BlockLoop, block_elements: int) -> Any:
        """Sums over each segment's problems [G] of coef times sum_kk' w_k w_k' d(points_k, points_k'), for
        points [L, K, D], weights w [L, K] and coef [L], by blocks of problems and rows."""
        ctx, xp = self.ctx, self.ctx.xp
        k = points.shape[1]
        plan = _Plan(points.shape[0], k, k * DIRECT_MAX_FEATURES, block_elements)

        def body(carry, b):
            pts = ctx.problems(points, b)  # [p, K, D]
            rows = pts if b.rows == k else ctx.take(pts, b.r0, b.rows, 1)
            d = self_distances(rows, pts, b.r0, xp=xp, matmul=ctx.matmul, device=ctx.device)
            per_problem = ctx.problems(coef, b) * pair_sums(d, ctx.rows(w, b), ctx.problems(w, b), xp=xp)
            return carry + ctx.run_sums(per_problem, b), None

        zeros = xp.zeros_like(self.summed)  # [G]
        return plan.sweep(loop, body, zeros, xp, combine=_added)[0]


def _added(c1: Any, c2: Any) -> Any:
    """The sum of two carries: arrays, or tuples of them."""
    return tuple(_added(a, b) for a, b in zip(c1, c2, strict=True)) if isinstance(c1, tuple) else c1 + c2


def _scale(a: Any, factor: Any) -> Any:
    return a if factor is None else a * factor


def _times(a: Any, number: float) -> Any:
    return a if number == 1 else number * a


def _neighbour_sums(b: Any, xp: Any, total: Any, b_log_b: Any = None) -> Any:
    """Sum over rows of exp(entropy of the row of B normalized to 1), per problem -> [p, T].

    b [p, T, rows, J] >= 0, in any per-row scale; total [p, T, rows, 1] its row sums; b_log_b
    [p, T, rows, 1] the row sums of b log b where known (``_Context.b_log_b``), else taken here in
    a log pass. Divided by the number of rows this is ``effective_neighbours`` per tau. With B the
    row sum, entropy = log B - sum(b log b) / B: no normalized copy of b.
    """
    if b_log_b is None:
        # b log(b + tiny) is b log b for normal b and exactly 0 at b = 0 (0 log 0 = 0). Not vecdot:
        # array-api-compat makes torch's a batched [1, J] @ [J, 1] product (5x slower on the CPU,
        # TF32 on a GPU where allowed).
        b_log_b = xp.sum(b * xp.log(b + xp.finfo(b.dtype).smallest_normal), axis=-1, keepdims=True)
    b_log_b, total = b_log_b[..., 0], total[..., 0]
    safe = xp.where(total > 0, total, 1)  # an all-zero row counts 1 neighbour, as effective_neighbours
    return xp.sum(xp.exp(xp.log(safe) - b_log_b / safe), axis=2)
