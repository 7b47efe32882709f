"""The JAX fast path of the drift: ``driftloss._fast_drift`` with blocks sized for the platform.

``driftloss.adapters.jax.BACKEND`` points its ``compute_drift`` hook here, so the public
``drifting_loss`` uses it for every JAX call (eager, jit, grad, vmap); ``driftloss._drift.reference_drift``
stays the reference it is tested against (tests/test_fast_path.py). Blocks are static Python
slices, so under ``jit`` the block loop unrolls into one graph.
"""

from __future__ import annotations

from typing import Any

from driftloss._drift import DriftOptions
from driftloss._fast_drift import fast_drift

# Largest [problems, taus, rows, columns] temporary per block, in entries (float32: 4 bytes each).
CPU_BLOCK_ELEMENTS = 1 << 24  # the block loop unrolls under jit: few, large blocks
ACCELERATOR_BLOCK_ELEMENTS = 1 << 26


def compute_drift(x: Any, pos: Any, neg: Any, weights: tuple[Any, Any, Any], opts: DriftOptions,
                  *, xp: Any, matmul: Any, device: Any) -> tuple[Any, Any, dict[str, Any]]:
    """``driftloss._drift.compute_drift`` for JAX arrays (same arguments and results)."""
    import jax

    budget = CPU_BLOCK_ELEMENTS if jax.default_backend() == "cpu" else ACCELERATOR_BLOCK_ELEMENTS
    return fast_drift(x, pos, neg, weights, opts, xp=xp, matmul=matmul, device=device,
                      block_elements=budget)
