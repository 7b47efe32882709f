"""The regression step of torch's drifting loss as one autograd function (docs/design.md §2 step 5).

Per problem, loss = mean over [N, D] of (x/s - stop_gradient(x/s + V))^2: its value is mean(V^2)
and its gradient with respect to x is -2 V / (s N D). Written as array operations
(``driftloss._loss.regression_loss``), eager torch makes x/s, the target, the difference and its
square, and autograd as many x-sized arrays again on the way back: 26 of the 137 GB that a
b2-class step touches at full width (``python -m benchmarks.op_count``). Here the forward reads V
once and the backward writes the gradient once.

The gradient is the drift held fixed, as the stop-gradient makes it: differentiating it again
(``create_graph=True``, ``torch.func.hessian``) gives 0 where the array form gives 2 / (s^2 N D) on
the diagonal.
"""

from __future__ import annotations

from typing import Any

import array_api_compat.torch as xp_torch
import torch
from driftloss.adapters import torch_fast


class _Regression(torch.autograd.Function):
    """(xq [..., N, D], v [..., N, D], s [..., 1, 1] or scalar) -> per-problem loss [...]; s and v
    carry no gradient (the drift is computed under stop_gradient)."""

    generate_vmap_rule = True  # torch.func.vmap / grad apply it as they apply torch's own operators

    @staticmethod
    def forward(xq: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        # one read of v on accelerators (a vector norm); v * v first on the CPU (torch_fast.one_pass_squares)
        return torch_fast.ACCELERATOR_OPS.sum_squares(xp_torch, v, (-2, -1)) / (v.shape[-2] * v.shape[-1])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        _, v, s = inputs
        ctx.save_for_backward(v, s)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        v, s = ctx.saved_tensors
        scale = grad[..., None, None] * (-2.0 / (v.shape[-2] * v.shape[-1])) / s  # [..., 1, 1]
        return v * scale, None, None


def per_problem_loss(xq: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``Backend.regression_loss`` for torch: the per-problem loss [...] of xq [..., N, D] (carrying the
    gradient), the drift v [..., N, D] and the feature scale s (scalar or broadcasting to [..., 1, 1])."""
    if not torch.is_tensor(s):
        s = torch.as_tensor(s, dtype=v.dtype, device=v.device)
    return _Regression.apply(xq, v.detach(), s.detach())
