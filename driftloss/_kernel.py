"""Kernel affinities A[..., i, j] between generated rows i and columns j (Alg. 2, Table 11).

All normalizations are taken in log space: sqrt(softmax_j * softmax_i) underflows to 0 in
float32 where exp(0.5 * (log_softmax_j + log_softmax_i)) is exact (docs/design.md §7).
"""

from __future__ import annotations

import math
from typing import Any


def log_softmax(logits: Any, *, axis: int, xp: Any) -> Any:
    """Numerically stable log-softmax along ``axis``."""
    z = logits - xp.max(logits, axis=axis, keepdims=True)
    return z - xp.log(xp.sum(xp.exp(z), axis=axis, keepdims=True))


def affinity(logits: Any, col_weight: Any, *, kernel: str, floor: float, xp: Any) -> Any:
    """Weighted affinities from logits -d/tau.

    logits [..., N, J], col_weight [..., J] -> A [..., N, J]
      kernel "both": sqrt(softmax over j (columns) * softmax over i (rows))   (default, A.1)
             "y":    softmax over j only
             "none": exp(logits), no normalization
    floor > 0 bounds the product of the two normalizations from below, A >= sqrt(floor) * w
    (the authors' release uses floor=1e-6; docs/design.md §2 explains why it is off by default).
    """
    if kernel == "both":
        log_a = 0.5 * (log_softmax(logits, axis=-1, xp=xp) + log_softmax(logits, axis=-2, xp=xp))
    elif kernel == "y":
        log_a = log_softmax(logits, axis=-1, xp=xp)
    else:
        log_a = logits
    if floor > 0:
        log_a = xp.clip(log_a, min=0.5 * math.log(floor))
    return xp.exp(log_a) * xp.expand_dims(col_weight, axis=-2)


def effective_neighbours(a: Any, *, xp: Any) -> Any:
    """exp(entropy) of each row of A normalized to sum 1, averaged over rows and problems.

    a [..., N, J] -> 0-d array; 1 means every row attends to one column, J means uniform.
    """
    total = xp.sum(a, axis=-1, keepdims=True)
    p = a / xp.where(total > 0, total, 1)
    plogp = xp.where(p > 0, p * xp.log(xp.where(p > 0, p, 1)), 0)
    return xp.mean(xp.exp(-xp.sum(plogp, axis=-1)))
