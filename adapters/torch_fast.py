"""The torch fast path of the drift: ``driftloss._fast_drift`` with blocks sized for the device.

``driftloss.adapters.torch.BACKEND`` points its ``compute_drift`` hook here, so the public
``drifting_loss`` uses it for torch calls; ``driftloss._drift.reference_drift`` stays the
reference it is tested against (tests/test_fast_path.py).

On the CPU, eager torch runs the blocked path's extra elementwise passes unfused, and the core
was faster on every benchmark whose kernel matrices fit (benchmarks/RESULTS.md, 2026-11-26:
b2-class 2.55 s vs 3.86 s, cifar-like 26 ms vs 34 ms). So on the CPU this hook declines calls
whose [problems, N, J] kernel matrix is small enough for the core, and keeps the bounded memory
of the blocks for the large ones (toy-large). On accelerators it always takes the blocked path.
"""

from __future__ import annotations

import math
from typing import Any

from driftloss._drift import DriftOptions
from driftloss._fast_drift import fast_drift

# Largest [problems, taus, rows, columns] temporary per block, in entries (float32: 4 bytes each).
CPU_BLOCK_ELEMENTS = 1 << 24  # 64 MiB: fewer, larger blocks measured fastest on 2 CPU cores
CUDA_BLOCK_ELEMENTS = 1 << 26  # 256 MiB: few, large kernels
# Up to this many [problems, N, J] kernel entries the CPU runs the core (~128 MiB per float32 array).
CPU_CORE_MAX_KERNEL_ENTRIES = 1 << 25


def compute_drift(x: Any, pos: Any, neg: Any, weights: tuple[Any, Any, Any], opts: DriftOptions,
                  *, xp: Any, matmul: Any, device: Any) -> tuple[Any, Any, dict[str, Any]] | None:
    """``driftloss._drift.compute_drift`` for torch tensors (same arguments and results), or None
    to leave a CPU call that fits the core to the core."""
    on_cpu = x.device.type == "cpu"
    if on_cpu:
        n_cols = pos.shape[-2] + (0 if neg is None else neg.shape[-2])
        n_cols += x.shape[-2] if opts.x_as_negatives else 0
        if math.prod(x.shape[:-1]) * n_cols <= CPU_CORE_MAX_KERNEL_ENTRIES:
            return None
    return fast_drift(x, pos, neg, weights, opts, xp=xp, matmul=matmul, device=device,
                      block_elements=CPU_BLOCK_ELEMENTS if on_cpu else CUDA_BLOCK_ELEMENTS)
