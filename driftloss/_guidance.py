"""Classifier-free guidance by weighted unconditional negatives (§3.5, A.7)."""

from __future__ import annotations

from typing import Any


def cfg_weight(alpha: Any, n_gen: int, n_uncond: int) -> Any:
    """Weight of each unconditional real negative for guidance scale alpha >= 1.

    w = (alpha - 1) (n_gen - 1) / n_uncond, so alpha = 1 gives w = 0 (no guidance). ``alpha`` is
    a number or an array (e.g. one alpha per class [G]); the result has the same type/shape.
    Pass it as ``neg_weight`` with the n_uncond unconditional samples as ``neg``.

    n_gen is the number N of generated samples per problem (x [..., N, D]); guidance needs
    n_gen >= 2 (ValueError otherwise): x is its own negative set, each sample excluding itself,
    so with one sample the weight would be 0 for every alpha and the drift and loss zero.
    """
    if int(n_gen) != n_gen or n_gen < 1:
        raise ValueError(f"cfg_weight: n_gen must be a positive integer; got {n_gen}")
    if n_gen < 2:
        raise ValueError(
            f"cfg_weight: guidance needs n_gen >= 2 generated samples per problem; got n_gen={n_gen}. "
            "x is its own negative set, each sample excluding itself, so with n_gen=1 the weight "
            "(alpha - 1)(n_gen - 1)/n_uncond is 0 for every alpha: no guidance, and with it a zero drift "
            "and loss. Generate at least 2 samples per class (x [..., N, D] with N >= 2)")
    if int(n_uncond) != n_uncond or n_uncond < 1:
        raise ValueError(f"cfg_weight: n_uncond must be a positive integer; got {n_uncond}")
    if isinstance(alpha, (int, float)):
        if not alpha >= 1:
            raise ValueError(f"cfg_weight: the guidance scale alpha must be >= 1; got {alpha}")
        return (alpha - 1.0) * (n_gen - 1) / n_uncond
    return (alpha - 1.0) * ((n_gen - 1) / n_uncond)
