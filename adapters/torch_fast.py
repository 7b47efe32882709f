"""The torch fast path of the drift: ``driftloss._fast_drift`` with blocks sized for the device.

``driftloss.adapters.torch.BACKEND`` points its ``compute_drift`` hook here, so the public
``drifting_loss`` uses it for every torch call; ``driftloss._drift.reference_drift`` stays the
reference it is tested against (tests/test_fast_path.py).
"""

from __future__ import annotations

from typing import Any

from driftloss._drift import DriftOptions
from driftloss._fast_drift import fast_drift

# Largest [problems, taus, rows, columns] temporary per block, in entries (float32: 4 bytes each).
CPU_BLOCK_ELEMENTS = 1 << 24  # 64 MiB: fewer, larger blocks measured fastest on 2 CPU cores
CUDA_BLOCK_ELEMENTS = 1 << 26  # 256 MiB: few, large kernels


def compute_drift(x: Any, pos: Any, neg: Any, weights: tuple[Any, Any, Any], opts: DriftOptions,
                  *, xp: Any, matmul: Any, device: Any) -> tuple[Any, Any, dict[str, Any]]:
    """``driftloss._drift.compute_drift`` for torch tensors (same arguments and results)."""
    budget = CPU_BLOCK_ELEMENTS if x.device.type == "cpu" else CUDA_BLOCK_ELEMENTS
    return fast_drift(x, pos, neg, weights, opts, xp=xp, matmul=matmul, device=device,
                      block_elements=budget)
