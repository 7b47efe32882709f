"""The paper-literal drifting loss: Alg. 2 with A.6's normalizations in plain PyTorch, fp32.

The baseline of docs/design.md §6, written plainly and not optimized: torch.cdist distances, the two
softmaxes (over y and over x) and their product's square root, one loop over temperatures, each
temperature's drift scaled to unit RMS. One call handles all the groups of one feature map at
once (they share C): the groups are stacked along the problem axis and their per-group statistics
(S, lambda) are segment means over each group's problems.
"""

from __future__ import annotations

import torch

SELF_PENALTY = 100.0  # in units of the mean distance (docs/design.md §2 step 3; Alg. 2 masks the self pair)


def segment_mean(values: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Mean of values [L] over the problems of each group -> [n_groups]."""
    total = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(0, group, values)
    count = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(
        0, group, torch.ones_like(values))
    return total / count


def map_loss(xs: list[torch.Tensor], poss: list[torch.Tensor], negs: list[torch.Tensor | None],
             neg_weight: float | None, taus: tuple[float, ...]) -> torch.Tensor:
    """Sum over groups of the drifting loss; groups g have x [L_g, N, C], pos [L_g, P, C], neg [L_g, M, C]."""
    sizes = torch.tensor([x.shape[0] for x in xs], device=xs[0].device)
    group = torch.repeat_interleave(torch.arange(len(xs), device=xs[0].device), sizes)  # [L]
    x = torch.cat(xs)  # [L, N, C]
    pos = torch.cat(poss)
    n, c = x.shape[1], x.shape[2]
    with torch.no_grad():
        y_neg = x if negs[0] is None else torch.cat([x, torch.cat(negs)], dim=1)  # [L, N+M, C]
        w_neg = torch.ones(y_neg.shape[1], device=x.device)
        if negs[0] is not None:
            w_neg[n:] = neg_weight
        d_pos = torch.cdist(x, pos)  # [L, N, P]
        d_neg = torch.cdist(x, y_neg)  # [L, N, N+M]

        # A.6: S = (weighted) mean distance per group; features x/s with s = S/sqrt(C).
        per_problem = (d_pos.sum((1, 2)) + (d_neg * w_neg).sum((1, 2))) / (n * (pos.shape[1] + w_neg.sum()))
        scale = segment_mean(per_problem, group, len(xs)).clamp(min=1e-3)[group]  # [L]
        s = (scale / c ** 0.5).clamp(min=1e-3)
        eye = torch.eye(n, y_neg.shape[1], device=x.device)
        d_neg = d_neg + eye * SELF_PENALTY * scale[:, None, None]
        y_pos_s = pos / s[:, None, None]
        y_neg_s = y_neg / s[:, None, None]

        v = torch.zeros_like(x)
        for tau in taus:
            logit_pos = -d_pos / (scale[:, None, None] * tau)
            logit_neg = -d_neg / (scale[:, None, None] * tau)
            logit = torch.cat([logit_pos, logit_neg], dim=2)  # [L, N, P + N + M]
            a_row = logit.softmax(dim=-1)
            a_col = logit.softmax(dim=-2)
            a = torch.sqrt(a_row * a_col)
            a_pos, a_neg = a[..., : pos.shape[1]], a[..., pos.shape[1]:] * w_neg
            w_pos = a_pos * a_neg.sum(dim=-1, keepdim=True)
            w_neg_ = a_neg * a_pos.sum(dim=-1, keepdim=True)
            drift = w_pos @ y_pos_s - w_neg_ @ y_neg_s  # [L, N, C]
            # x_i terms cancel: sum_j W+_ij = sum_j W-_ij (Alg. 2)
            lam = segment_mean((drift ** 2).mean((1, 2)), group, len(xs)).clamp(min=1e-8).sqrt()
            v = v + drift / lam[group][:, None, None]
    xs_scaled = x / s[:, None, None]
    target = (xs_scaled + v).detach()
    per_problem_loss = ((xs_scaled - target) ** 2).mean((1, 2))
    return segment_mean(per_problem_loss, group, len(xs)).sum()
