"""Pairwise Euclidean distances: exact differences for few features, a centred Gram form otherwise."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

DIRECT_MAX_FEATURES = 4  # up to this D the [..., N, J, D] difference tensor costs no more than the kernel


def pairwise_distances(x: Any, y: Any, *, xp: Any, matmul: Callable[[Any, Any], Any]) -> Any:
    """d[..., i, j] = ||x_i - y_j||_2 for x [..., N, D], y [..., J, D] -> [..., N, J].

    For D <= 4 by broadcast differences (exact, and cheap). Otherwise by ||a||^2 + ||b||^2 - 2 a.b
    on points centred by their common mean: without the centring an offset shared by all points
    swamps the distances in float32 (docs/design.md §7). The Gram form leaves coincident points at a
    rounding distance of about sqrt(eps) times the spread of the data.
    """
    if x.shape[-1] <= DIRECT_MAX_FEATURES:
        diff = xp.expand_dims(x, axis=-2) - xp.expand_dims(y, axis=-3)  # [..., N, J, D]
        return xp.sqrt(xp.sum(diff * diff, axis=-1))
    n, j = x.shape[-2], y.shape[-2]
    centre = (xp.sum(x, axis=-2, keepdims=True) + xp.sum(y, axis=-2, keepdims=True)) / (n + j)
    xc = x - centre
    yc = y - centre
    x2 = xp.expand_dims(xp.sum(xc * xc, axis=-1), axis=-1)  # [..., N, 1]
    y2 = xp.expand_dims(xp.sum(yc * yc, axis=-1), axis=-2)  # [..., 1, J]
    d2 = x2 + y2 - 2 * matmul(xc, xp.matrix_transpose(yc))
    return xp.sqrt(xp.clip(d2, min=0))
