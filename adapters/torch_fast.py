"""The torch fast path of the drift: ``driftloss._fast_drift`` with blocks sized for the device.

``driftloss.adapters.torch.BACKEND`` points its ``compute_drift`` hook here, so the public
``drifting_loss`` uses it for torch calls (those the opt-in fused CUDA path ``torch_fused`` does not take);
``driftloss._drift.reference_drift`` stays the reference it is tested against
(tests/test_fast_path.py). On the CPU, blocks are sized to stay in cache by NumPy's rule
(``driftloss._fast_drift.cpu_block_elements``) with a larger cache budget; on accelerators they are few
and large.
"""

from __future__ import annotations

from typing import Any

from driftloss._drift import DriftOptions
from driftloss._fast_drift import cpu_block_elements, fast_drift

# Entries of the largest [problems, taus, rows, columns] temporary per block (float32: 4 bytes each).
# 4 MiB: whole problems grouped up to this, passes in the last-level cache. Larger than NumPy's 1 MiB
# (driftloss._fast_drift.CPU_CACHE_ELEMENTS): torch runs each elementwise op on both cores, which pays
# per op; b2-class at width 0.025, 2 cores: 523-542 ms per step vs 598-623 ms at 1 MiB and 538-551 ms
# at 8 MiB (NumPy, one core: 1.38 s at 1 MiB, 1.64-1.76 s at 4 MiB).
CPU_CACHE_ELEMENTS = 1 << 20
CPU_BLOCK_ELEMENTS = 1 << 24  # 64 MiB: above this a problem's rows are split ...
CPU_SPLIT_ELEMENTS = 1 << 20  # ... into blocks of 4 MiB (driftloss._fast_drift.CPU_SPLIT_ELEMENTS)
CUDA_BLOCK_ELEMENTS = 1 << 26  # 256 MiB: few, large kernels
# fast_drift's ``augment``: None picks the augmented distance product where copying the points costs
# less than the elementwise passes it saves (b2-class: the narrow maps on the CPU, none at full width).
AUGMENT: bool | None = None


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
                      segments=segments, augment=AUGMENT)
