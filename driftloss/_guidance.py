"""Classifier-free guidance by weighted unconditional negatives (§3.5, A.7)."""

from __future__ import annotations

from typing import Any


def cfg_weight(alpha: Any, n_gen: int, n_uncond: int) -> Any:
    """Weight of each unconditional real negative for guidance scale alpha >= 1.

    w = (alpha - 1) (n_gen - 1) / n_uncond, so alpha = 1 gives w = 0 (no guidance). ``alpha`` is
    a number or an array (e.g. one alpha per class [G]); the result has the same type/shape.
    Pass it as ``neg_weight`` with the n_uncond unconditional samples as ``neg``.
    """
    if int(n_gen) != n_gen or n_gen < 1:
        raise ValueError(f"cfg_weight: n_gen must be a positive integer; got {n_gen}")
    if int(n_uncond) != n_uncond or n_uncond < 1:
        raise ValueError(f"cfg_weight: n_uncond must be a positive integer; got {n_uncond}")
    if isinstance(alpha, (int, float)):
        if not alpha >= 1:
            raise ValueError(f"cfg_weight: the guidance scale alpha must be >= 1; got {alpha}")
        return (alpha - 1.0) * (n_gen - 1) / n_uncond
    return (alpha - 1.0) * ((n_gen - 1) / n_uncond)
