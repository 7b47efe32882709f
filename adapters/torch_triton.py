"""Triton kernels of the fused drifting loss; ``driftloss.adapters.torch_fused`` drives them.

One launch covers every kernel problem of every group that shares (N, M, P): problem p's points
are reached through row p of an int64 table (the ``F_*`` columns: addresses, row strides, width
C, group, weight row, offset of its channel means), so the groups are never concatenated.
The kernel's columns come in three segments, each its own tile padded to a power of two:
x (NX >= N, also the rows), extra negatives (MX >= M, absent when HAS_NEG is False) and
positives (PX >= P); a problem's distances and weights are stored as [NX, NX + MX + PX].
Channels stream through in steps of BC with block pointers.

distances_kernel   per problem: distances to every column in the Gram form on channels centred
                   by the positives' mean (stored for the drift), exact 0 on the self pairs, and
                   the problem's share of S (sum of d * w).
drift_kernel       per work item (problem, channel range): the kernel weights of every
                   temperature from d (docs/design.md §2 step 3, "both" kernel, self penalty, optional
                   floor), folded with s-, s+ and w into W_tau so that F_tau = W_tau (y - centre):
                   FINAL=False sums F_tau^2 (for lambda_tau); FINAL=True forms
                   V = sum_tau F_tau / (s lambda_tau), writes the gradient coef * V and sums V^2.

The products use tl.dot with a caller-chosen input precision: "tf32x3" (three TF32 products,
float32-faithful; default), "ieee" (plain float32) or "tf32" (fast, loses ~1e-3; opt-in).
Register use is what limits these kernels: each temperature's weights are formed one segment
and one factor at a time (exp((m_i + m_j - 2 d) rate) directly, not as a product of two tiles).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

# Under TRITON_INTERPRET=1 (tests on CPU) loops with a loaded bound run as while loops.
INTERPRETED = bool(knobs.runtime.interpret)

# Columns of the problem table.
F_X, F_NEG, F_POS, F_GRAD, F_SX, F_SNEG, F_SPOS, F_C, F_GROUP, F_WROW, F_MU = range(11)
FIELDS = 11
_F_X = tl.constexpr(F_X)
_F_NEG = tl.constexpr(F_NEG)
_F_POS = tl.constexpr(F_POS)
_F_GRAD = tl.constexpr(F_GRAD)
_F_SX = tl.constexpr(F_SX)
_F_SNEG = tl.constexpr(F_SNEG)
_F_SPOS = tl.constexpr(F_SPOS)
_F_C = tl.constexpr(F_C)
_F_GROUP = tl.constexpr(F_GROUP)
_F_WROW = tl.constexpr(F_WROW)
_F_MU = tl.constexpr(F_MU)
_FIELDS = tl.constexpr(FIELDS)
SELF_PENALTY = tl.constexpr(100.0)  # as driftloss._drift.SELF_PENALTY
FAR = tl.constexpr(1e30)  # scaled distance outside the problem: weight exactly 0, no inf - inf


@triton.jit
def _problem(tab_ptr, p):
    """Row p of the problem table: the points' addresses (x, neg, pos), their row strides, the width
    C, the group, the weight row and the offset of the channel means."""
    row = tab_ptr + p * _FIELDS
    x_ptr = tl.load(row + _F_X).to(tl.pointer_type(tl.float32))
    neg_ptr = tl.load(row + _F_NEG).to(tl.pointer_type(tl.float32))
    pos_ptr = tl.load(row + _F_POS).to(tl.pointer_type(tl.float32))
    return (x_ptr, neg_ptr, pos_ptr, tl.load(row + _F_SX), tl.load(row + _F_SNEG), tl.load(row + _F_SPOS),
            tl.load(row + _F_C).to(tl.int32), tl.load(row + _F_GROUP), tl.load(row + _F_WROW),
            tl.load(row + _F_MU))


@triton.jit
def _block(ptr, rows, stride, n_ch, c0, R: tl.constexpr, BC: tl.constexpr):
    """Block pointer to rows [0, R) x channels [c0, c0 + BC) of a [rows, n_ch] matrix."""
    return tl.make_block_ptr(ptr, shape=(rows, n_ch), strides=(stride, 1), offsets=(0, c0),
                             block_shape=(R, BC), order=(1, 0))


@triton.jit
def _centred(ptr, rows, stride, n_ch, c0, mu, R: tl.constexpr, BC: tl.constexpr):
    """Rows [R, BC] at channels [c0, c0 + BC) minus mu; exactly 0 outside the matrix."""
    a = tl.load(_block(ptr, rows, stride, n_ch, c0, R, BC), boundary_check=(0, 1), padding_option="zero")
    r = tl.arange(0, R)
    c = c0 + tl.arange(0, BC)
    return tl.where((r < rows)[:, None] & (c < n_ch)[None, :], a - mu[None, :], 0.0)


@triton.jit
def _distance(acc, rn, cn, rows, cols, n_rows, n_cols, SELF: tl.constexpr):
    """sqrt(|a|^2 + |b|^2 - 2 a.b) [R, K], clamped at 0; 0 outside and on the diagonal (SELF)."""
    d = tl.sqrt(tl.maximum(rn[:, None] + cn[None, :] - 2.0 * acc, 0.0))
    keep = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    if SELF:
        keep = keep & (rows[:, None] != cols[None, :])
    return tl.where(keep, d, 0.0)


@triton.jit
def distances_kernel(tab_ptr, w_ptr, d_ptr, mu_ptr, spart_ptr, N, M, P,
                     NX: tl.constexpr, MX: tl.constexpr, PX: tl.constexpr, HAS_NEG: tl.constexpr,
                     BC: tl.constexpr, PREC: tl.constexpr, WHILE: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    x_ptr, neg_ptr, pos_ptr, sx, sq, sp, n_ch, grp, wrow, mu_off = _problem(tab_ptr, p)

    acc_x = tl.zeros((NX, NX), dtype=tl.float32)
    acc_q = tl.zeros((NX, MX), dtype=tl.float32)
    acc_p = tl.zeros((NX, PX), dtype=tl.float32)
    xn = tl.zeros((NX,), dtype=tl.float32)
    qn = tl.zeros((MX,), dtype=tl.float32)
    pn = tl.zeros((PX,), dtype=tl.float32)
    if WHILE:  # the interpreter cannot use a loaded bound in range()
        c0 = n_ch * 0
        while c0 < n_ch:
            acc_x, acc_q, acc_p, xn, qn, pn = _distance_step(
                x_ptr, neg_ptr, pos_ptr, sx, sq, sp, mu_ptr, mu_off, c0, n_ch, N, M, P,
                acc_x, acc_q, acc_p, xn, qn, pn, NX, MX, PX, HAS_NEG, BC, PREC)
            c0 += BC
    else:
        for c0 in range(0, n_ch, BC):
            acc_x, acc_q, acc_p, xn, qn, pn = _distance_step(
                x_ptr, neg_ptr, pos_ptr, sx, sq, sp, mu_ptr, mu_off, c0, n_ch, N, M, P,
                acc_x, acc_q, acc_p, xn, qn, pn, NX, MX, PX, HAS_NEG, BC, PREC)

    i = tl.arange(0, NX)
    base = d_ptr + p * (NX * (NX + MX + PX)) + i[:, None] * (NX + MX + PX)
    wbase = w_ptr + wrow * (NX + MX + PX)
    jx = tl.arange(0, NX)
    d = _distance(acc_x, xn, xn, i, jx, N, N, True)
    tl.store(base + jx[None, :], d)
    total = tl.sum(tl.sum(d * tl.load(wbase + jx)[None, :], axis=1), axis=0)
    jp = tl.arange(0, PX)
    d = _distance(acc_p, xn, pn, i, jp, N, P, False)
    tl.store(base + NX + MX + jp[None, :], d)
    total += tl.sum(tl.sum(d * tl.load(wbase + NX + MX + jp)[None, :], axis=1), axis=0)
    if HAS_NEG:
        jq = tl.arange(0, MX)
        d = _distance(acc_q, xn, qn, i, jq, N, M, False)
        tl.store(base + NX + jq[None, :], d)
        total += tl.sum(tl.sum(d * tl.load(wbase + NX + jq)[None, :], axis=1), axis=0)
    tl.store(spart_ptr + p, total)


@triton.jit
def _distance_step(x_ptr, neg_ptr, pos_ptr, sx, sq, sp, mu_ptr, mu_off, c0, n_ch, N, M, P,
                   acc_x, acc_q, acc_p, xn, qn, pn, NX: tl.constexpr, MX: tl.constexpr, PX: tl.constexpr,
                   HAS_NEG: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr):
    """Channels [c0, c0 + BC): centre by the positives' mean, add to the dot products and norms."""
    cols = c0 + tl.arange(0, BC)
    zero = tl.zeros((BC,), dtype=tl.float32)
    pt = _centred(pos_ptr, P, sp, n_ch, c0, zero, PX, BC)
    mu = tl.sum(pt, axis=0) / P  # these channels of the positives' mean
    tl.store(mu_ptr + mu_off + cols, mu, mask=cols < n_ch)
    pt = tl.where((tl.arange(0, PX) < P)[:, None], pt - mu[None, :], 0.0)
    xt = _centred(x_ptr, N, sx, n_ch, c0, mu, NX, BC)
    acc_x = tl.dot(xt, tl.trans(xt), acc_x, input_precision=PREC)
    acc_p = tl.dot(xt, tl.trans(pt), acc_p, input_precision=PREC)
    xn += tl.sum(xt * xt, axis=1)
    pn += tl.sum(pt * pt, axis=1)
    if HAS_NEG:
        qt = _centred(neg_ptr, M, sq, n_ch, c0, mu, MX, BC)
        acc_q = tl.dot(xt, tl.trans(qt), acc_q, input_precision=PREC)
        qn += tl.sum(qt * qt, axis=1)
    return acc_x, acc_q, acc_p, xn, qn, pn


@triton.jit
def _scaled(d_ptr, p, off, inv_unit, i, j, n_rows, n_cols, NX: tl.constexpr, K: tl.constexpr,
            JW: tl.constexpr, SELF: tl.constexpr):
    """d-hat [NX, K] of one column segment (at column offset off of a [NX, JW] row): d / S, the
    self penalty on the diagonal (SELF), FAR outside the problem."""
    dh = tl.load(d_ptr + p * (NX * JW) + i[:, None] * JW + off + j[None, :]) * inv_unit
    if SELF:
        dh = tl.where(i[:, None] == j[None, :], dh + SELF_PENALTY, dh)
    return tl.where((i < n_rows)[:, None] & (j < n_cols)[None, :], dh, FAR)


@triton.jit
def _row_sq(dh, rowmin, rate):
    """sum_j exp((min_j d - d) / tau) per row: the row softmax's denominator, shifted."""
    h = tl.exp((rowmin[:, None] - dh) * rate)
    return tl.sum(h * h, axis=1)


@triton.jit
def _col_factor(dh, colmin, rate):
    """1 / sqrt(sum_i exp((min_i d - d) / tau)) per column (0 for empty columns)."""
    g = tl.exp((colmin[None, :] - dh) * rate)
    gs = tl.sum(g * g, axis=0)
    return tl.where(gs > 0, 1.0 / tl.sqrt(tl.where(gs > 0, gs, 1.0)), 0.0)


@triton.jit
def _affinity(dh, rowmin, colmin, rowf, colf, w, valid, rate, floor_sqrt, HAS_FLOOR: tl.constexpr):
    """A w [NX, K]: sqrt(row softmax * column softmax) of -d/tau times the column weights."""
    a = tl.exp((rowmin[:, None] + colmin[None, :] - 2.0 * dh) * rate) * rowf[:, None] * colf[None, :]
    if HAS_FLOOR:
        a = tl.maximum(a, floor_sqrt)
    return tl.where(valid, a * w[None, :], 0.0)


@triton.jit
def _segment_weights(d_ptr, p, inv_unit, w_ptr, wrow, rate, floor_sqrt, N, M, P,
                     NX: tl.constexpr, MX: tl.constexpr, PX: tl.constexpr, HAS_NEG: tl.constexpr,
                     HAS_FLOOR: tl.constexpr):
    """(W_x [NX, NX], W_q [NX, MX], W_p [NX, PX]) of one temperature: F = W_x x + W_q q + W_p p
    in centred coordinates, W = -s+ A w on negative columns and s- A w on positive ones."""
    JW: tl.constexpr = NX + MX + PX
    i = tl.arange(0, NX)
    jx = tl.arange(0, NX)
    jq = tl.arange(0, MX)
    jp = tl.arange(0, PX)
    dx = _scaled(d_ptr, p, 0, inv_unit, i, jx, N, N, NX, NX, JW, True)
    dp = _scaled(d_ptr, p, NX + MX, inv_unit, i, jp, N, P, NX, PX, JW, False)
    rowmin = tl.minimum(tl.min(dx, axis=1), tl.min(dp, axis=1))
    if HAS_NEG:
        dq = _scaled(d_ptr, p, NX, inv_unit, i, jq, N, M, NX, MX, JW, False)
        rowmin = tl.minimum(rowmin, tl.min(dq, axis=1))
    hs = _row_sq(dx, rowmin, rate) + _row_sq(dp, rowmin, rate)
    if HAS_NEG:
        hs += _row_sq(dq, rowmin, rate)
    rowf = tl.where(hs > 0, 1.0 / tl.sqrt(tl.where(hs > 0, hs, 1.0)), 0.0)
    rows = i < N

    colmin = tl.min(dx, axis=0)
    a_x = _affinity(dx, rowmin, colmin, rowf, _col_factor(dx, colmin, rate), tl.load(w_ptr + wrow * JW + jx),
                    rows[:, None] & (jx < N)[None, :], rate, floor_sqrt, HAS_FLOOR)
    colmin = tl.min(dp, axis=0)
    a_p = _affinity(dp, rowmin, colmin, rowf, _col_factor(dp, colmin, rate),
                    tl.load(w_ptr + wrow * JW + NX + MX + jp), rows[:, None] & (jp < P)[None, :], rate,
                    floor_sqrt, HAS_FLOOR)
    s_neg = tl.sum(a_x, axis=1)
    s_pos = tl.sum(a_p, axis=1)
    if HAS_NEG:
        colmin = tl.min(dq, axis=0)
        a_q = _affinity(dq, rowmin, colmin, rowf, _col_factor(dq, colmin, rate),
                        tl.load(w_ptr + wrow * JW + NX + jq), rows[:, None] & (jq < M)[None, :], rate,
                        floor_sqrt, HAS_FLOOR)
        s_neg += tl.sum(a_q, axis=1)
        w_q = -s_pos[:, None] * a_q
    else:
        w_q = tl.zeros((NX, MX), dtype=tl.float32)
    return -s_pos[:, None] * a_x, w_q, s_neg[:, None] * a_p


@triton.jit
def _drift_step(w_x, w_q, w_p, x_ptr, neg_ptr, pos_ptr, sx, sq, sp, mu_ptr, mu_off, c0, c_hi, n_ch, N, M, P,
                NX: tl.constexpr, MX: tl.constexpr, PX: tl.constexpr, HAS_NEG: tl.constexpr,
                BC: tl.constexpr, PREC: tl.constexpr):
    """F [NX, BC] = W (y - centre) at channels [c0, min(c0 + BC, c_hi))."""
    cols = c0 + tl.arange(0, BC)
    mu = tl.load(mu_ptr + mu_off + cols, mask=cols < c_hi, other=0.0)
    f = tl.dot(w_x, _centred(x_ptr, N, sx, c_hi, c0, mu, NX, BC), input_precision=PREC)
    f = tl.dot(w_p, _centred(pos_ptr, P, sp, c_hi, c0, mu, PX, BC), f, input_precision=PREC)
    if HAS_NEG:
        f = tl.dot(w_q, _centred(neg_ptr, M, sq, c_hi, c0, mu, MX, BC), f, input_precision=PREC)
    return f


@triton.jit
def drift_kernel(tab_ptr, work_ptr, w_ptr, d_ptr, mu_ptr, unit_ptr, rate_ptr, tcoef_ptr, gcoef_ptr,
                 part_ptr, N, M, P, floor_sqrt,
                 T: tl.constexpr, NX: tl.constexpr, MX: tl.constexpr, PX: tl.constexpr, HAS_NEG: tl.constexpr,
                 BC: tl.constexpr, PREC: tl.constexpr, HAS_FLOOR: tl.constexpr, FINAL: tl.constexpr,
                 WHILE: tl.constexpr):
    wi = tl.program_id(0).to(tl.int64)
    p = tl.load(work_ptr + wi * 3)
    c_lo = tl.load(work_ptr + wi * 3 + 1).to(tl.int32)
    c_hi = tl.load(work_ptr + wi * 3 + 2).to(tl.int32)
    x_ptr, neg_ptr, pos_ptr, sx, sq, sp, n_ch, grp, wrow, mu_off = _problem(tab_ptr, p)
    inv_unit = 1.0 / tl.load(unit_ptr + grp)

    if FINAL:
        # V = sum_tau W_tau / (s lambda_tau) applied to the centred columns, in one product.
        v_x = tl.zeros((NX, NX), dtype=tl.float32)
        v_q = tl.zeros((NX, MX), dtype=tl.float32)
        v_p = tl.zeros((NX, PX), dtype=tl.float32)
        for t in range(T):  # a loop, not unrolled: one temperature's weights live at a time
            rate = tl.load(rate_ptr + t)
            w_x, w_q, w_p = _segment_weights(d_ptr, p, inv_unit, w_ptr, wrow, rate, floor_sqrt,
                                             N, M, P, NX, MX, PX, HAS_NEG, HAS_FLOOR)
            coef = tl.load(tcoef_ptr + grp * T + t)
            v_x += coef * w_x
            v_q += coef * w_q
            v_p += coef * w_p
        gcoef = tl.load(gcoef_ptr + grp)
        grad_ptr = tl.load(tab_ptr + p * _FIELDS + _F_GRAD).to(tl.pointer_type(tl.float32))
        vsq = tl.zeros((NX,), dtype=tl.float32)
        if WHILE:
            c0 = c_lo
            while c0 < c_hi:
                vsq = _final_step(v_x, v_q, v_p, x_ptr, neg_ptr, pos_ptr, sx, sq, sp, mu_ptr, mu_off,
                                  grad_ptr, gcoef, c0, c_hi, n_ch, N, M, P, vsq,
                                  NX, MX, PX, HAS_NEG, BC, PREC)
                c0 += BC
        else:
            for c0 in range(c_lo, c_hi, BC):
                vsq = _final_step(v_x, v_q, v_p, x_ptr, neg_ptr, pos_ptr, sx, sq, sp, mu_ptr, mu_off,
                                  grad_ptr, gcoef, c0, c_hi, n_ch, N, M, P, vsq,
                                  NX, MX, PX, HAS_NEG, BC, PREC)
        tl.store(part_ptr + wi, tl.sum(vsq, axis=0))
    else:
        # sum of F_tau^2 over this item's channels, per temperature (lambda_tau needs every item).
        for t in range(T):  # a loop, not unrolled: one temperature's weights live at a time
            rate = tl.load(rate_ptr + t)
            w_x, w_q, w_p = _segment_weights(d_ptr, p, inv_unit, w_ptr, wrow, rate, floor_sqrt,
                                             N, M, P, NX, MX, PX, HAS_NEG, HAS_FLOOR)
            fsq = tl.zeros((NX,), dtype=tl.float32)
            if WHILE:
                c0 = c_lo
                while c0 < c_hi:
                    f = _drift_step(w_x, w_q, w_p, x_ptr, neg_ptr, pos_ptr, sx, sq, sp, mu_ptr, mu_off, c0,
                                    c_hi, n_ch, N, M, P, NX, MX, PX, HAS_NEG, BC, PREC)
                    fsq += tl.sum(f * f, axis=1)
                    c0 += BC
            else:
                for c0 in range(c_lo, c_hi, BC):
                    f = _drift_step(w_x, w_q, w_p, x_ptr, neg_ptr, pos_ptr, sx, sq, sp, mu_ptr, mu_off, c0,
                                    c_hi, n_ch, N, M, P, NX, MX, PX, HAS_NEG, BC, PREC)
                    fsq += tl.sum(f * f, axis=1)
            tl.store(part_ptr + wi * T + t, tl.sum(fsq, axis=0))


@triton.jit
def _final_step(v_x, v_q, v_p, x_ptr, neg_ptr, pos_ptr, sx, sq, sp, mu_ptr, mu_off, grad_ptr, gcoef, c0, c_hi,
                n_ch, N, M, P, vsq, NX: tl.constexpr, MX: tl.constexpr, PX: tl.constexpr,
                HAS_NEG: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr):
    """V at these channels: store gcoef * V as the gradient ([N, n_ch] rows); vsq + row sums of V^2."""
    v = _drift_step(v_x, v_q, v_p, x_ptr, neg_ptr, pos_ptr, sx, sq, sp, mu_ptr, mu_off, c0, c_hi, n_ch,
                    N, M, P, NX, MX, PX, HAS_NEG, BC, PREC)
    out = tl.make_block_ptr(grad_ptr, shape=(N, c_hi), strides=(n_ch, 1), offsets=(0, c0),
                            block_shape=(NX, BC), order=(1, 0))
    tl.store(out, gcoef * v, boundary_check=(0, 1))
    return vsq + tl.sum(v * v, axis=1)
