"""TF32 matrix products for torch's blocked fast drift on CUDA. Opt-in, not yet timed on a GPU.

An H100 / H200 multiplies float32 matrices at ~51-67 TFLOP/s on its CUDA cores and TF32 ones at
~430-500 TFLOP/s on its tensor cores. TF32 keeps 10 of float32's 23 mantissa bits, which drops
~12% of small distances' digits (issue 4), so the products stay in float32 by default
(``driftloss.adapters.torch_fast.CUDA_PRODUCTS = "ieee"``). The other settings:

- "tf32x3" (float32-faithful): each operand splits exactly into a TF32 part and a remainder,
  a = hi + lo, and a . b = hi_a . hi_b + (hi_a . lo_b + lo_a . hi_b) from three TF32 products. The
  dropped lo . lo term and lo's own rounding to TF32 are ~2^-21 relative to the operands, float32's
  order (the scheme of Triton's ``input_precision="tf32x3"``, here with torch operations).
- "tf32": one TF32 product, ~1e-3 relative error in the gradient (fast; for measurements).

benchmarks/gpu.sh times both against the float32 default ("torch-tf32x3", "torch-tf32").
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch

Product = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

PRODUCTS = ("ieee", "tf32x3", "tf32")
# float32 has 23 explicit mantissa bits, TF32 10: clearing the low 13 leaves a TF32-exact number.
_TF32_HIGH_BITS = -(1 << 13)  # as int32, the mask ...1110_0000_0000_0000
# Products over a short inner dimension (fast_drift's sum over temperatures) are bound by memory, not
# by arithmetic: they stay single float32 products.
MIN_TF32_INNER = 16


def split_tf32(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) of a float32 tensor: hi exact in TF32 (a's sign, exponent, top 10 mantissa bits)
    and lo = a - hi, so that hi + lo == a exactly; both with a's shape."""
    hi = (a.view(torch.int32) & _TF32_HIGH_BITS).view(torch.float32)
    return hi, a - hi


@contextlib.contextmanager
def tf32_allowed() -> Iterator[None]:
    """float32 matmuls may run in TF32 inside (the adapter holds them at "highest" otherwise)."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def tf32x3_matmul(a: torch.Tensor, b: torch.Tensor, product: Product = torch.matmul) -> torch.Tensor:
    """a @ b (float32, matmul's broadcasting) from three TF32 products of the split operands.

    ``product`` runs each of them (torch.matmul with TF32 allowed; tests pass an emulated TF32).
    The small cross terms are added first, then the large one. Inner dimensions below
    MIN_TF32_INNER get one float32 product.
    """
    if a.shape[-1] < MIN_TF32_INNER:
        return torch.matmul(a, b)
    a_hi, a_lo = split_tf32(a)
    b_hi, b_lo = split_tf32(b)
    with tf32_allowed():
        return product(a_hi, b_hi) + (product(a_hi, b_lo) + product(a_lo, b_hi))


def tf32_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with TF32 allowed: one product (float32 for inner dimensions below MIN_TF32_INNER)."""
    if a.shape[-1] < MIN_TF32_INNER:
        return torch.matmul(a, b)
    with tf32_allowed():
        return torch.matmul(a, b)


def products(kind: str, exact: Product) -> Product:
    """The matmul for ``kind`` (one of PRODUCTS); "ieee" gives ``exact`` back."""
    if kind == "ieee":
        return exact
    if kind == "tf32x3":
        return functools.partial(tf32x3_matmul, product=torch.matmul)
    if kind == "tf32":
        return tf32_matmul
    raise ValueError(f"CUDA products must be one of {PRODUCTS}; got {kind!r}")
