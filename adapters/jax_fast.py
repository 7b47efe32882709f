"""The JAX fast path of the drift: ``driftloss._fast_drift`` with blocks sized for the platform.

``driftloss.adapters.jax.BACKEND`` points its ``compute_drift`` hook here, so the public
``drifting_loss`` uses it for every JAX call (eager, jit, grad, vmap); ``driftloss._drift.reference_drift``
stays the reference it is tested against (tests/test_fast_path.py).

Each pass over the blocks runs as one ``lax.scan`` over the equal-size blocks (slicing them with
``lax.dynamic_slice``) plus the remainder block. A Python loop of static slices would unroll under
``jit`` into one graph whose blocks XLA schedules together (toy-large: 14 GiB on the CPU, see
benchmarks/RESULTS.md); a scan holds one block's temporaries at a time and compiles its body once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from driftloss._block_loop import BlockLoop
from driftloss._drift import DriftOptions
from driftloss._fast_drift import fast_drift, wide_points_block_elements

# Largest [problems, taus, rows, columns] temporary per block, in entries (float32: 4 bytes each).
# CPU: 16 MiB blocks ran faster than 64 MiB ones under the scan on 2 cores (toy-large-64d 6.6 s vs
# 9.2 s, b2-class 0.60 s vs 0.75 s per jitted loss and gradient; XLA temporaries 90 vs 201 MiB), and
# 8 MiB ones faster still on b2-class (per-group calls 0.49-0.56 s vs 0.60-0.65 s; drifting_loss_groups
# 0.45-0.49 s vs 0.56-0.57 s, 4 MiB: 0.69-0.79 s), at about the same toy-large-64d (7.5-7.8 vs 7.3-7.6 s).
CPU_BLOCK_ELEMENTS = 1 << 21
# Accelerators: 64 MiB blocks, the drift's block [problems, T, rows, D] held to it too
# (wide_points_block_elements). The 1,024-problem call of b2-class at full width (32x32 map, C = 640),
# its loss and gradient compiled on the CPU with the accelerator plan: 908 / 805 / 982 MiB of XLA
# temporaries with 64 / 128 / 256 MiB blocks keeping F; 359 / 567 / 816 MiB keeping the coefficients.
ACCELERATOR_BLOCK_ELEMENTS = 1 << 24
# The drift pass recomputes the distances rather than reading them back from the first pass: XLA fuses
# the recomputation into the pass (b2-class, 2 cores: 0.97 s CPU time per step vs 1.03 s keeping them).
KEEP_ELEMENTS = 0
# fast_drift's ``column_elements``. CPU: the centred columns made per block (once where a problem's rows
# are split): XLA's CPU scheduler runs a step's independent calls side by side, holding their columns
# together. b2-class at width 0.025 plans 209 MiB of temporaries as one drifting_loss_groups instead of
# 352 MiB with the columns [L, J, D] of each call made once (63 calls: 380 vs 527 MiB), at about the
# same speed (2 cores, alternating processes: 1.47-1.48 s vs 1.50-2.01 s per step; 63 calls 1.61-1.64 s
# vs 1.53-1.60 s; cifar-like, one block, unchanged). Accelerators: once up to 64 MiB, per block above,
# as torch's plan (RESULTS.md, 2026-11-27: what b2-class at full width plans with each change).
CPU_COLUMN_ELEMENTS = 0
ACCELERATOR_COLUMN_ELEMENTS = 1 << 24
# fast_drift's ``drift_elements``: F [L, T, N, D] kept until lambda is known, whatever its size, on the
# CPU (the kernel's coefficients instead, one more product, are measured only for torch there); on
# accelerators the coefficients [L, T, N, J] wherever J < D (see ACCELERATOR_BLOCK_ELEMENTS).
CPU_DRIFT_ELEMENTS = 1 << 62
ACCELERATOR_DRIFT_ELEMENTS = 0
# The products on accelerators: "highest" (float32, the default; an H100 / H200 multiplies float32 at
# ~51-67 TFLOP/s, so b2-class's 423 GFLOP take at least 6-8 ms) or "tf32x3" (XLA's three-pass TF32
# algorithm on the tensor cores, ~430-500 TFLOP/s for one pass: float32-faithful, as torch's "tf32x3",
# adapters/torch_tf32.py). Opt-in until timed and checked on a GPU (benchmarks/gpu.sh: "jax-tf32x3").
# XLA's CPU compiler rejects the TF32 algorithms, so the CPU plan ignores this.
ACCELERATOR_PRODUCTS = "highest"
PRODUCTS = ("highest", "tf32x3")
# Products over a short inner dimension (the sum over temperatures) are bound by memory: they stay single
# float32 products (as adapters/torch_tf32.MIN_TF32_INNER).
MIN_TF32_INNER = 16
# Backend.stack_elements: drifting_loss_groups stacks the groups of one shape in runs of at most 512 MiB
# of points (a larger group evaluated on its own), as torch's plan; the CPU rows of b2-class stay below.
STACK_ELEMENTS = 1 << 27
# Squared distances on the CPU always from the augmented product (fast_drift's ``augment``): there XLA
# transposes the points for the plain product x . y^T (cifar-like, 2 cores: 7.3-7.7 ms per step vs
# 6.2-6.4 ms). Elsewhere the default rule, which the wide feature maps of b2-class meet with the plain
# product (its K = D + 2 also breaks the alignment of the points' rows).
CPU_AUGMENT = True


def accelerator_products(setting: str, matmul: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """The matrix product for ``setting`` (one of PRODUCTS); ``matmul`` (float32 at HIGHEST precision)
    for "highest", for products over fewer than MIN_TF32_INNER terms and for float64 (TF32 splits float32)."""
    if setting not in PRODUCTS:
        raise ValueError(f"ACCELERATOR_PRODUCTS must be one of {PRODUCTS}, got {setting!r}")
    if setting == "highest":
        return matmul
    import jax
    import jax.numpy as jnp

    algorithm = jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3

    def product(a: Any, b: Any) -> Any:
        if a.shape[-1] < MIN_TF32_INNER or a.dtype != jnp.float32 or b.dtype != jnp.float32:
            return matmul(a, b)
        return jnp.matmul(a, b, precision=algorithm)

    return product


def block_plan(a: Any) -> str:
    """The plan for a call on arrays like ``a`` (traced ones too): "cpu" or "accelerator", by JAX's
    default backend. benchmarks/impls.py replaces it to measure the accelerator plan on the CPU."""
    import jax

    return "cpu" if jax.default_backend() == "cpu" else "accelerator"


def _scan(body: Callable[[Any, Any], tuple[Any, Any]], carry: Any, starts: list[int], axis: int,
          combine: Any = None) -> tuple[Any, list[Any]]:
    """``BlockLoop.run`` as one lax.scan over ``starts`` (a single block runs as it is, unlooped); the
    blocks run in order, so ``combine`` is not needed.

    The scan stacks the pieces [B, ...]; merging that axis into ``axis`` is their concatenation.
    """
    import jax
    import jax.numpy as jnp

    if len(starts) == 1:
        carry, piece = body(carry, starts[0])
        return carry, [] if piece is None else [piece]
    carry, stacked = jax.lax.scan(body, carry, jnp.asarray(starts))
    if stacked is None:
        return carry, []
    return carry, [_merged(stacked, axis)]


def _merged(stacked: Any, axis: int) -> Any:
    """Pieces stacked [B, ...] -> their concatenation along ``axis``."""
    import jax.numpy as jnp

    moved = jnp.moveaxis(stacked, 0, axis)  # [..., B, size, ...]
    shape = (*moved.shape[:axis], moved.shape[axis] * moved.shape[axis + 1], *moved.shape[axis + 2:])
    return jnp.reshape(moved, shape)


def _ordered_scan(body: Callable[[Any, Any], tuple[Any, Any]], carry: Any, starts: list[int], axis: int,
                  combine: Any = None) -> tuple[Any, list[Any]]:
    """``_scan`` whose stacked pieces are written into a buffer made once the carry exists (``after``).
    lax.scan's own is zeros with no operand, which XLA makes at the start of the program, holding the
    outputs of every call's scans at once (b2-class, the accelerator plan: 0.9 GB of them)."""
    import jax
    import jax.numpy as jnp

    if len(starts) == 1:
        return _scan(body, carry, starts, axis)
    piece = jax.eval_shape(body, carry, starts[0])[1]
    if piece is None:
        return _scan(body, carry, starts, axis)
    buffer = after(jnp.zeros((len(starts), *piece.shape), piece.dtype), carry)

    def step(state, i):
        c, buf = state
        c, got = body(c, jnp.asarray(starts)[i])
        return (c, jax.lax.dynamic_update_index_in_dim(buf, got, i, 0)), None

    (carry, buffer), _ = jax.lax.scan(step, (carry, buffer), jnp.arange(len(starts)))
    return carry, [_merged(buffer, axis)]


def _take(a: Any, start: Any, size: int, axis: int) -> Any:
    """a[start:start + size] along ``axis``; ``start`` may be the scan's traced index."""
    import jax

    if isinstance(start, int):
        return jax.lax.slice_in_dim(a, start, start + size, axis=axis)
    return jax.lax.dynamic_slice_in_dim(a, start, size, axis=axis)


def after(a: Any, dep: Any) -> Any:
    """``BlockLoop.after`` of the accelerator plan: a + 0 * (whether dep's sum is NaN), which is exactly
    a, but a data dependency that XLA keeps: it does not fold a float product with 0, while
    ``lax.optimization_barrier`` is gone before its common-subexpression pass and its scheduling
    (XLA CPU). ``a`` and ``dep``: arrays or tuples of them; no gradient flows to ``dep``."""
    import jax
    import jax.numpy as jnp

    total = sum(jnp.sum(jax.lax.stop_gradient(d)) for d in jax.tree.leaves(dep))
    return jax.tree.map(lambda leaf: leaf + jnp.isnan(total).astype(leaf.dtype) * 0, a)


def groups_after(a: Any, dep: Any) -> Any:
    """``Backend.after``: ``after`` on the accelerator plan; on the CPU, ``a`` as it is (XLA's CPU
    scheduler overlapping calls on two cores; ordering them is not measured to cost nothing there)."""
    return a if block_plan(a) == "cpu" else after(a, dep)


# The CPU plan's loop leaves XLA free to order blocks; the accelerator plan's orders them (``after``).
# b2-class at width 0.025, 2 cores, alternating runs of 5 steps: 63 calls ordered 1.48 / 1.82 s per
# step against 1.34 / 1.40 s unordered; drifting_loss_groups 1.54 / 1.81 s against 1.52 / 1.70 s.
SCAN_LOOP = BlockLoop(run=_scan, take=_take)
ORDERED_SCAN_LOOP = BlockLoop(run=_ordered_scan, take=_take, after=after)


def compute_drift(x: Any, pos: Any, neg: Any, weights: tuple[Any, Any, Any], opts: DriftOptions,
                  *, xp: Any, matmul: Any, device: Any,
                  segments: Any = None, after: Any = None) -> tuple[Any, Any, dict[str, Any]]:
    """``driftloss._drift.compute_drift`` for JAX arrays (same arguments and results); ``segments``
    and ``after`` as ``fast_drift``'s."""
    if block_plan(x) == "cpu":
        return fast_drift(x, pos, neg, weights, opts, xp=xp, matmul=matmul, device=device,
                          block_elements=CPU_BLOCK_ELEMENTS, loop=SCAN_LOOP, segments=segments, after=after,
                          keep_elements=KEEP_ELEMENTS, column_elements=CPU_COLUMN_ELEMENTS,
                          augment=CPU_AUGMENT, drift_elements=CPU_DRIFT_ELEMENTS)
    budget = wide_points_block_elements(x, pos, neg, opts, ACCELERATOR_BLOCK_ELEMENTS)
    matmul = accelerator_products(ACCELERATOR_PRODUCTS, matmul)
    return fast_drift(x, pos, neg, weights, opts, xp=xp, matmul=matmul, device=device, block_elements=budget,
                      loop=ORDERED_SCAN_LOOP, segments=segments, after=after, keep_elements=KEEP_ELEMENTS,
                      column_elements=ACCELERATOR_COLUMN_ELEMENTS, drift_elements=ACCELERATOR_DRIFT_ELEMENTS)
