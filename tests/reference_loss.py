"""A float64 NumPy reference of docs/design.md §2, written out step by step with no shared code.

Distances by broadcast difference, softmaxes directly (not in log space), the affinity floor
as sqrt(max(A_row * A_col, floor)) and F with both of its sums, as the specification states.
"""

from __future__ import annotations

import numpy as np


def _softmax(a, axis):
    e = np.exp(a - a.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def reference_drift(x, pos, neg=None, taus=(0.02, 0.05, 0.2), *, x_weight=None, pos_weight=None,
                    neg_weight=None, x_as_negatives=True, normalize=True, kernel="both",
                    affinity_floor=0.0, attraction=1.0, repulsion=1.0):
    """Returns (V [..., N, D], s, S, lambdas [T]) in float64."""
    x, pos = np.asarray(x, np.float64), np.asarray(pos, np.float64)
    n, d_feat = x.shape[-2], x.shape[-1]
    lead = x.shape[:-2]

    def w_or_ones(w, pts):
        return np.ones(pts.shape[:-1]) if w is None else np.broadcast_to(np.asarray(w, np.float64),
                                                                         pts.shape[:-1])

    blocks = []  # (points, weights, are positives)
    if x_as_negatives:
        blocks.append((x, w_or_ones(x_weight, x), False))
    if neg is not None:
        neg = np.asarray(neg, np.float64)
        blocks.append((neg, w_or_ones(neg_weight, neg), False))
    blocks.append((pos, w_or_ones(pos_weight, pos), True))
    cols = [b[0] for b in blocks]
    ws = [b[1] for b in blocks]
    is_pos = [flag for pts, _, flag in blocks for _ in range(pts.shape[-2])]
    y = np.concatenate(cols, axis=-2)
    w = np.concatenate(ws, axis=-1)
    is_pos = np.array(is_pos)

    d = np.sqrt(((x[..., :, None, :] - y[..., None, :, :]) ** 2).sum(-1))  # [..., N, J]
    S = (w[..., None, :] * d).mean() / w.mean() if w.sum() > 0 else 0.0
    if normalize:
        s = max(S / np.sqrt(d_feat), 1e-3)
        dh = d / max(S, 1e-3)
        pen = 100.0
    else:
        s = 1.0
        dh = d.copy()
        pen = 100.0 * max(S, 1e-3)
    if x_as_negatives:
        idx = np.arange(n)
        dh[..., idx, idx] += pen

    v = np.zeros(lead + (n, d_feat))
    lambdas = []
    for tau in taus:
        logit = -dh / tau
        row, col = _softmax(logit, -1), _softmax(logit, -2)
        if kernel == "both":
            base = np.sqrt(np.maximum(row * col, affinity_floor))
        elif kernel == "y":
            base = np.maximum(row, np.sqrt(affinity_floor))
        else:
            base = np.maximum(np.exp(logit), np.sqrt(affinity_floor))
        A = base * w[..., None, :]
        A_neg = np.where(is_pos, 0.0, A)
        A_pos = np.where(is_pos, A, 0.0)
        c_pos = A_pos * A_neg.sum(-1, keepdims=True)
        c_neg = -A_neg * A_pos.sum(-1, keepdims=True)
        c = attraction * c_pos + repulsion * c_neg
        F = (c @ y) / s - c.sum(-1, keepdims=True) * x / s
        lam = np.sqrt(max(np.mean(F ** 2), 1e-8))
        lambdas.append(lam)
        v += F / lam if normalize else F
    return v, s, S, np.array(lambdas)


def reference_loss_and_grad(x, pos, neg=None, taus=(0.02, 0.05, 0.2), **kw):
    """(loss, d loss / d x) of drifting_loss with reduction="mean", in float64."""
    v, s, _, _ = reference_drift(x, pos, neg, taus, **kw)
    return float(np.mean(v ** 2)), -2 * v / (s * v.size)
