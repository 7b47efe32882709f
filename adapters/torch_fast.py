"""The torch fast path of the drift: ``driftloss._fast_drift`` with blocks sized for the device.

``driftloss.adapters.torch.BACKEND`` points its ``compute_drift`` hook here, so the public
``drifting_loss`` uses it for torch calls (those the opt-in fused CUDA path ``torch_fused`` does not take);
``driftloss._drift.reference_drift`` stays the reference it is tested against
(tests/test_fast_path.py). On the CPU, blocks are sized to stay in cache as for NumPy
(``driftloss._fast_drift.cpu_block_elements``); on accelerators they are few and large.
"""

from __future__ import annotations

from typing import Any

from driftloss._drift import DriftOptions
from driftloss._fast_drift import cpu_block_elements, fast_drift

# Entries of the largest [problems, taus, rows, columns] temporary per block (float32: 4 bytes each).
CPU_CACHE_ELEMENTS = 1 << 18  # 1 MiB: whole problems grouped up to this, passes run in cache
CPU_BLOCK_ELEMENTS = 1 << 24  # 64 MiB: above this a problem's rows are split ...
CPU_SPLIT_ELEMENTS = 1 << 20  # ... into blocks of 4 MiB (driftloss._fast_drift.CPU_SPLIT_ELEMENTS)
CUDA_BLOCK_ELEMENTS = 1 << 26  # 256 MiB: few, large kernels


def compute_drift(x: Any, pos: Any, neg: Any, weights: tuple[Any, Any, Any], opts: DriftOptions,
                  *, xp: Any, matmul: Any, device: Any,
                  segments: Any = None) -> tuple[Any, Any, dict[str, Any]]:
    """``driftloss._drift.compute_drift`` for torch tensors (same arguments and results); ``segments``
    as ``fast_drift``'s."""
    if x.device.type == "cpu":
        budget = cpu_block_elements(x, pos, neg, opts, CPU_CACHE_ELEMENTS, CPU_BLOCK_ELEMENTS,
                                    CPU_SPLIT_ELEMENTS)
    else:
        budget = CUDA_BLOCK_ELEMENTS
    return fast_drift(x, pos, neg, weights, opts, xp=xp, matmul=matmul, device=device, block_elements=budget,
                      segments=segments)
