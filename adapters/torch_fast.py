"""The torch fast path of the drift: ``driftloss._fast_drift`` with blocks sized for the device.

``driftloss.adapters.torch.BACKEND`` points its ``compute_drift`` hook here, so the public
``drifting_loss`` uses it for torch calls (those the opt-in fused CUDA path ``torch_fused`` does not take);
``driftloss._drift.reference_drift`` stays the reference it is tested against
(tests/test_fast_path.py). On the CPU, blocks are sized to stay in cache by NumPy's rule
(``driftloss._fast_drift.cpu_block_elements``) with a larger cache budget; on accelerators they are few
and large.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from driftloss.adapters import torch_cpu_products, torch_tf32

from driftloss._drift import DriftOptions
from driftloss._fast_drift import (
    ARRAY_API_OPS,
    DEFAULT_KEEP_ELEMENTS,
    FusedOps,
    cpu_block_elements,
    fast_drift,
    wide_points_block_elements,
)

# Entries of the largest [problems, taus, rows, columns] temporary per block (float32: 4 bytes each).
# 4 MiB: whole problems grouped up to this, passes in the last-level cache. Larger than NumPy's 1 MiB
# (driftloss._fast_drift.CPU_CACHE_ELEMENTS): torch runs each elementwise op on both cores, which pays
# per op; b2-class at width 0.025, 2 cores: 523-542 ms per step vs 598-623 ms at 1 MiB and 538-551 ms
# at 8 MiB (NumPy, one core: 1.38 s at 1 MiB, 1.64-1.76 s at 4 MiB).
CPU_CACHE_ELEMENTS = 1 << 20
CPU_BLOCK_ELEMENTS = 1 << 24  # 64 MiB: above this a problem's rows are split ...
CPU_SPLIT_ELEMENTS = 1 << 20  # ... into blocks of 4 MiB (driftloss._fast_drift.CPU_SPLIT_ELEMENTS)
# 256 MiB on accelerators: few, large kernels. The drift's block [problems, T, rows, D] is held to it
# too (wide_points_block_elements): b2-class at full width with this plan, measured on the CPU
# (benchmarks.run --torch-plan accelerator), peaks at 4.55 GiB instead of 5.41 GiB, for 1,101
# launching operators per step instead of 630 (benchmarks.op_count; most of them pass over 60-250 MiB,
# long enough on a GPU for the host to launch the next). With the centred columns made per block
# (fast_drift's column_elements, here its default of 64 MiB): 3.30 GiB and 1,245 operators (the
# paper-literal baseline: 3.45 GiB).
CUDA_BLOCK_ELEMENTS = 1 << 26
# fast_drift's ``column_elements``: the centred columns [L, J, D] of a call made once up to 64 MiB, per
# block above (on a GPU that costs an extra copy of the inputs per pass, which benchmarks/gpu.sh weighs
# against the memory as "torch-whole-columns").
COLUMN_ELEMENTS = DEFAULT_KEEP_ELEMENTS
# fast_drift's ``drift_elements``: F [L, T, N, D] of a call kept until lambda is known up to 512 MiB, as
# STACK_ELEMENTS bounds the stacked points; above, where J < D, the kernel's coefficients [L, T, N, J]
# instead, and V from one more product (a third of the drift's). b2-class at full width on the GPU plan
# (benchmarks.run --torch-plan accelerator): its largest evaluation keeps F (0.5 GB); the step peaks at
# 1.01 GiB either way (RESULTS.md, 22:54). "torch-kept-coefficients" (benchmarks/gpu.sh) times the two.
DRIFT_ELEMENTS = 1 << 27
# Backend.stack_elements: drifting_loss_groups stacks the groups of one shape (on accelerators) in runs of
# at most 512 MiB of points, a larger group evaluated on its own. The copies of an unbounded stack were
# the largest arrays of a b2-class step (1.9 GB for the two 32x32x640 maps): on the GPU plan it peaks at
# 1.01 GiB so bounded, 2.25 GiB unbounded ("torch-stack-all", which benchmarks/gpu.sh times against it).
STACK_ELEMENTS = 1 << 27
# fast_drift's ``augment``: None picks the augmented distance product where copying the points costs
# less than the elementwise passes it saves (b2-class: the narrow maps on the CPU, none at full width).
AUGMENT: bool | None = None
# The products on CUDA (adapters/torch_tf32.py): "ieee" (float32, the default), "tf32x3" (three TF32
# products, float32-faithful) or "tf32" (one, ~1e-3 error); eager calls only (a compiled graph keeps
# the precision in force when it was compiled).
CUDA_PRODUCTS = "ieee"
# The large products on the CPU (adapters/torch_cpu_products.py): "onednn" (oneDNN, where it pays; MKL's
# float32 kernels run at half speed on AMD processors) or "torch" (torch.matmul throughout).
CPU_PRODUCTS = "onednn"


def one_pass_squares(a: torch.Tensor) -> bool:
    """Whether sums of squares of a take torch's vector norm, one read of a (the Array API form writes
    a * a first): on accelerators. On the CPU torch's float32 vector norm loses ~1e-5 relative on large
    blocks (2.13; b2-class's loss at full width: 5.4e-7 error against 2.8e-9). benchmarks/op_count.py
    replaces it to count the accelerators' memory traffic on the CPU."""
    return a.device.type != "cpu"


def _sum_squares(xp: Any, a: torch.Tensor, axis: Any, keepdims: bool = False) -> torch.Tensor:
    if not one_pass_squares(a):
        return ARRAY_API_OPS.sum_squares(xp, a, axis, keepdims)
    return torch.linalg.vector_norm(a, dim=axis, keepdim=keepdims).square()


def _centred_concat_into(xp: Any, parts: list[torch.Tensor], centre: torch.Tensor) -> torch.Tensor:
    """concat(parts, -2) - centre, each part's difference written into its rows of the result: one read
    of the parts and one write (concatenating, then subtracting in place, reads and writes twice)."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor  # torch.func's tensors take no out=
    if torch.compiler.is_compiling() or any(wrapped(a) for a in (*parts, centre)):
        return ARRAY_API_OPS.centred_concat(xp, parts, centre)
    lead, d_feat = parts[0].shape[:-2], parts[0].shape[-1]
    out = torch.empty((*lead, sum(p.shape[-2] for p in parts), d_feat), dtype=centre.dtype,
                      device=centre.device)
    j0 = 0
    for p in parts:
        torch.sub(p, centre, out=out[..., j0:j0 + p.shape[-2], :])
        j0 += p.shape[-2]
    return out


# The accelerator plan's one-pass forms. b2-class at full width (python -m benchmarks.op_count): the
# per-block centring touches 15.5 GB instead of 31 GB, the sums of squares 9.8 GB instead of 32 GB.
ACCELERATOR_OPS = FusedOps(sum_squares=_sum_squares, centred_concat=_centred_concat_into)


@functools.lru_cache(maxsize=256)
def _cached_constant(values: tuple, dtype: Any, device: Any) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def _frozen(values: Any) -> Any:
    return tuple(_frozen(v) for v in values) if isinstance(values, (list, tuple)) else values


def device_constant(xp: Any, values: Any, dtype: Any, device: Any) -> torch.Tensor:
    """``Backend.constant`` for torch: Python numbers as a tensor, made once per (values, dtype, device)
    on accelerators. Making one there is a copy from pageable host memory, after which the host waits
    for the device's queued work (it would stall a step several times per call), and which a CUDA graph
    capture cannot hold. Callers must not modify the result in place."""
    if torch.device(device).type == "cpu" or torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    return _cached_constant(_frozen(values), dtype, device)


def block_plan(a: Any) -> str:
    """The block plan for a call on a's device: "cpu" (cache-sized blocks, above) or "accelerator"
    (CUDA_BLOCK_ELEMENTS). benchmarks/op_count.py replaces it to count the accelerator plan on the CPU."""
    return "cpu" if a.device.type == "cpu" else "accelerator"


def compute_drift(x: Any, pos: Any, neg: Any, weights: tuple[Any, Any, Any], opts: DriftOptions,
                  *, xp: Any, matmul: Any, device: Any,
                  segments: Any = None, after: Any = None) -> tuple[Any, Any, dict[str, Any]]:
    """``driftloss._drift.compute_drift`` for torch tensors (same arguments and results); ``segments``
    and ``after`` as ``fast_drift``'s."""
    if block_plan(x) == "cpu":
        budget = cpu_block_elements(x, pos, neg, opts, CPU_CACHE_ELEMENTS, CPU_BLOCK_ELEMENTS,
                                    CPU_SPLIT_ELEMENTS)
        matmul = torch_cpu_products.products(CPU_PRODUCTS, matmul)
        ops = ARRAY_API_OPS
    else:
        budget = wide_points_block_elements(x, pos, neg, opts, CUDA_BLOCK_ELEMENTS)
        if x.device.type == "cuda" and not torch.compiler.is_compiling():
            matmul = torch_tf32.products(CUDA_PRODUCTS, matmul)
        ops = ACCELERATOR_OPS
    return fast_drift(x, pos, neg, weights, opts, xp=xp, matmul=matmul, device=device, block_elements=budget,
                      segments=segments, after=after, column_elements=COLUMN_ELEMENTS, augment=AUGMENT,
                      constant=device_constant, drift_elements=DRIFT_ELEMENTS, ops=ops)
