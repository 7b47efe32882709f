"""Guidance scales for training (§3.5, A.7): one alpha per class problem, drawn from p(alpha) ∝ alpha^-k."""

from __future__ import annotations

import torch


def sample_alpha(u: torch.Tensor, u_one: torch.Tensor, power: float, high: float,
                 one_fraction: float = 0.0) -> torch.Tensor:
    """Guidance scales [G] from uniform draws u, u_one [G] in [0, 1) (A.7).

    alpha = F^-1(u) for p(alpha) ∝ alpha^-power on [1, high]: F(a) = (1 - a^(1-k)) / (1 - high^(1-k)),
    so alpha = (1 - u (1 - high^(1-k)))^(1 / (1-k)) (k = 1: alpha = high^u). Where u_one < one_fraction,
    alpha = 1 exactly (a share of unguided problems).
    """
    if power == 1.0:
        alpha = high ** u
    else:
        e = 1.0 - power
        alpha = (1.0 - u * (1.0 - high**e)) ** (1.0 / e)
    return torch.where(u_one < one_fraction, torch.ones_like(alpha), alpha)
