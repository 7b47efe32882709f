"""The drift V = a V+ - r V- from affinities (Eq. 8-11, Alg. 2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def drift_from_affinity(
    a: Any, yc: Any, xc: Any, *, n_neg: int, attraction: float, repulsion: float,
    xp: Any, matmul: Callable[[Any, Any], Any],
) -> Any:
    """Mean-shift drift of each row from its affinities.

    a [..., N, J] with the first n_neg columns negatives and the rest positives;
    yc [..., J, D] the columns, xc [..., N, D] the rows (same coordinates) -> F [..., N, D]:
      c+_ij = A+_ij sum_k A-_ik,   c-_ij = A-_ij sum_k A+_ik
      F_i   = a sum_j c+_ij (y_j - x_i) - r sum_j c-_ij (y_j - x_i)
            = a s-_i (A+ y+)_i - r s+_i (A- y-)_i - (a - r) s-_i s+_i x_i
    The x_i term vanishes for a = r (Alg. 2's W+ y+ - W- y-). The two halves are computed by the
    same operations, so identical positive and negative sets give exactly zero.
    """
    a_neg, a_pos = a[..., :n_neg], a[..., n_neg:]
    s_neg = xp.sum(a_neg, axis=-1, keepdims=True)  # [..., N, 1]
    s_pos = xp.sum(a_pos, axis=-1, keepdims=True)
    f = attraction * (s_neg * matmul(a_pos, yc[..., n_neg:, :])) \
        - repulsion * (s_pos * matmul(a_neg, yc[..., :n_neg, :]))
    if attraction != repulsion:
        f = f - (attraction - repulsion) * (s_neg * s_pos) * xc
    return f
