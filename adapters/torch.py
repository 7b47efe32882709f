"""PyTorch adapter: ``DriftingLoss`` module, ``drifting_loss`` with the namespace bound.

The drift is computed on detached float32 copies with autocast off; only the final regression
x/s - stop_gradient(x/s + V) carries gradient. Works under ``torch.compile(fullgraph=True)``
(forward and loss; call ``backward`` outside) and under ``torch.func.grad``/``vmap``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import array_api_compat.torch as xp_torch
import numpy as np
import torch
from driftloss.adapters import torch_fast, torch_fused, torch_regression

from driftloss._backends import Backend
from driftloss._loss import DEFAULT_TAUS
from driftloss._loss import drift_field as _drift_field
from driftloss._loss import drifting_loss as _drifting_loss


def _field_context(a: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off (it would run the distance product in half precision, docs/design.md §7) and, in eager
    mode, full float32 matmuls. Under torch.compile the precision cannot be set inside the graph:
    compiled products follow the precision in force when compiling."""
    if torch.compiler.is_compiling():
        return torch.autocast(device_type=a.device.type, enabled=False)
    return _eager_field_context(a.device.type)


@contextlib.contextmanager
def _eager_field_context(device_type: str):
    # Training code often allows TF32 matmuls (precision "high"); on a GPU they drop ~12% of the small
    # distances' digits (issue 4, H200). The drift's products stay exact, as JAX's HIGHEST keeps them.
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(saved)


def _is_concrete(a: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    if a.is_cuda and torch.cuda.is_current_stream_capturing():  # reading a value would break the capture
        return False
    return not torch._C._functorch.is_functorch_wrapped_tensor(a)


def replica_sum(group: Any = None) -> Any:
    """A ``cross_replica_sum`` over a torch.distributed process group (all_reduce, SUM)."""

    def sum_over_group(a: torch.Tensor) -> torch.Tensor:
        a = a.clone()
        torch.distributed.all_reduce(a, op=torch.distributed.ReduceOp.SUM, group=group)
        return a

    return sum_over_group


def _default_replica_sum() -> Any:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return replica_sum()
    return None


BACKEND = Backend(
    stop_gradient=torch.Tensor.detach,
    field_context=_field_context,
    matmul=torch.matmul,
    is_concrete=_is_concrete,
    device=lambda a: a.device,
    default_replica_sum=_default_replica_sum,  # array_api_compat.device is not traceable by dynamo
    compute_drift=torch_fast.compute_drift,
    fused_loss=torch_fused.backend_fused_loss,
    # On the CPU the stacking copies cost more than the saved operators (benchmarks/RESULTS.md).
    share_groups=lambda a: a.device.type != "cpu",
    stack_elements=torch_fast.STACK_ELEMENTS,
    constant=torch_fast.device_constant,
    regression_loss=torch_regression.per_problem_loss,
)


def drifting_loss(x: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None = None,
                  taus: float | Sequence[float] = DEFAULT_TAUS, *, process_group: Any = None,
                  **options: Any) -> Any:
    """``driftloss.drifting_loss`` for torch tensors (namespace passed explicitly); NumPy arrays and
    Python lists are converted to tensors.

    ``process_group``: all-reduce S and lambda over this group (default: the whole world when
    torch.distributed is initialized).
    """
    if process_group is not None:
        options["cross_replica_sum"] = replica_sum(process_group)
    x, pos, neg, options = _as_torch(x, pos, neg, options)
    return _drifting_loss(x, pos, neg, taus, xp=xp_torch, **options)


def drift_field(x: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None = None,
                tau: float | Sequence[float] = 0.05, **options: Any) -> Any:
    """``driftloss.drift_field`` for torch tensors (namespace passed explicitly)."""
    x, pos, neg, options = _as_torch(x, pos, neg, options)
    return _drift_field(x, pos, neg, tau, xp=xp_torch, **options)


_WEIGHTS = ("x_weight", "pos_weight", "neg_weight")


def _as_torch(x: Any, pos: Any, neg: Any, options: dict[str, Any]) -> tuple[Any, Any, Any, dict[str, Any]]:
    """NumPy arrays among the inputs as tensors (sharing memory on the CPU) on the device of the
    first tensor; Python lists and numbers become tensors in the core (floating point, that device)."""
    given = [x, pos, neg, *(options.get(k) for k in _WEIGHTS)]
    if not any(isinstance(a, np.ndarray) for a in given):
        return x, pos, neg, options
    device = next((a.device for a in given if isinstance(a, torch.Tensor)), None)

    def tensor(a: Any) -> Any:
        return torch.as_tensor(a, device=device) if isinstance(a, np.ndarray) else a

    weights = {k: tensor(options[k]) for k in _WEIGHTS if options.get(k) is not None}
    return tensor(x), tensor(pos), tensor(neg), {**options, **weights}


class DriftingLoss(torch.nn.Module):
    """The drifting loss as a module; the hyperparameters are fixed at construction.

        criterion = DriftingLoss(taus=(0.02, 0.05, 0.2))
        loss = criterion(generator(z), real)            # x [..., N, D], pos [..., P, D]
        loss.backward()

    Keyword options are those of ``driftloss.drifting_loss`` (normalize, kernel,
    affinity_floor, attraction, repulsion, reduction, return_stats, x_as_negatives).
    """

    def __init__(self, taus: float | Sequence[float] = DEFAULT_TAUS, **options: Any) -> None:
        super().__init__()
        self.taus = tuple(taus) if isinstance(taus, Sequence) else (float(taus),)
        if "xp" in options:
            raise TypeError("DriftingLoss: xp is fixed to the torch namespace")
        self.options = options

    def forward(self, x: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None = None, *,
                x_weight: torch.Tensor | None = None, pos_weight: torch.Tensor | None = None,
                neg_weight: torch.Tensor | None = None) -> Any:
        x, pos, neg, weights = _as_torch(x, pos, neg, {"x_weight": x_weight, "pos_weight": pos_weight,
                                                       "neg_weight": neg_weight})
        return _drifting_loss(x, pos, neg, self.taus, **weights, xp=xp_torch, **self.options)

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"taus={self.taus}{opts}"
