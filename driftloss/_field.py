"""The drift V = a V+ - r V- from affinities (Eq. 8-11, Alg. 2)."""

from __future__ import annotations

from typing import Any, Callable


def drift_from_affinity(
    a: Any, yc: Any, xc: Any, *, n_neg: int, attraction: float, repulsion: float,
    xp: Any, matmul: Callable[[Any, Any], Any],
) -> Any:
    """Mean-shift drift of each row from its affinities.

    a [..., N, J] with the first n_neg columns negatives and the rest positives;
    yc [..., J, D] the columns, xc [..., N, D] the rows (same coordinates) -> F [..., N, D]:
      c+_ij = A+_ij sum_k A-_ik,   c-_ij = A-_ij sum_k A+_ik
      F_i   = a sum_j c+_ij (y_j - x_i) - r sum_j c-_ij (y_j - x_i)
    With a = r the x_i terms cancel (up to rounding) and F is Alg. 2's W+ y+ - W- y-.
    """
    a_neg, a_pos = a[..., :n_neg], a[..., n_neg:]
    s_neg = xp.sum(a_neg, axis=-1, keepdims=True)  # [..., N, 1]
    s_pos = xp.sum(a_pos, axis=-1, keepdims=True)
    c = xp.concat([a_neg * (-repulsion * s_pos), a_pos * (attraction * s_neg)], axis=-1)
    return matmul(c, yc) - xp.sum(c, axis=-1, keepdims=True) * xc
