"""Large float32 matrix products of torch's fast drift on the CPU through oneDNN.

torch's CPU ``matmul`` calls MKL, which on AMD processors runs its AVX2 kernels: about 200-220 GFLOP/s
on the benchmark machine's two Zen 5 cores (AVX-512), where oneDNN, also inside every torch CPU
build, reaches 430-490 GFLOP/s on the drift's products (cifar-like: [768, 512] @ [512, 2048] and
[256, 2048] @ [2048, 512]; benchmarks/RESULTS.md). torch exposes oneDNN's float32 product only through
``torch.ops.mkldnn._linear_pointwise``, the op its compiler emits for linear layers: one 2-D product
``input @ weight.T`` per call. It is an internal op, so it is checked against ``torch.matmul`` once
per process and any failure falls back to ``torch.matmul`` for good; ``products`` routes to it only the
products where it pays (PER_PROBLEM_MACS) and that need no gradient.
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Callable

import torch

Product = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

PRODUCTS = ("onednn", "torch")
# Multiply-adds per problem from which oneDNN is used, one call per problem. Measured on 2 Zen 5 cores
# (GFLOP/s, batched MKL vs a loop of oneDNN calls): 192x224x192 (7.9 M) 141 vs 209; 192x224x384
# (15.8 M) 199 vs 290; 192x224x640 (26 M) 142 vs 330; 128x128x128 (2 M) 139 vs 132.
PER_PROBLEM_MACS = 1 << 23
# Inner dimensions below this stay with torch (fast_drift's sum over temperatures: bound by memory).
MIN_INNER = 16


def _onednn_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for 2-D float32 CPU tensors by oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(a, b.mT, None, "none", [], "")


@functools.cache
def available() -> bool:
    """Whether oneDNN's product runs here and agrees with ``torch.matmul`` (checked once). x86-64 only:
    measured there against MKL; other processors' torch builds use other libraries, not measured."""
    try:
        if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
            return False
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(48, 40, generator=gen)
        b = torch.randn(72, 40, generator=gen).mT  # a transposed view, as fast_drift passes them
        got = _onednn_product(a, b)
        want = torch.matmul(a.double(), b.double())
        return got.shape == want.shape and bool(torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4))
    except Exception:  # an internal op: absent, renamed or resigned in another torch version
        return False


def _uses_onednn(a: torch.Tensor, b: torch.Tensor) -> bool:
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in (a, b)):
        return False
    if a.ndim < 2 or b.ndim < 2 or a.shape[:-2] != b.shape[:-2] or a.shape[-1] < MIN_INNER:
        return False
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):  # the op has no derivative
        return False
    if torch.compiler.is_compiling() or any(map(torch._C._functorch.is_functorch_wrapped_tensor, (a, b))):
        return False  # compiled graphs and torch.func transforms keep torch's own (traceable) product
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    return m * k * n >= PER_PROBLEM_MACS and available()


def onednn_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b ([..., M, K] @ [..., K, N], same leading dims): oneDNN, one call per problem, where it
    pays (see ``_uses_onednn``), else ``torch.matmul``. Same float32 accuracy either way."""
    if not _uses_onednn(a, b):
        return torch.matmul(a, b)
    lead, m, n = a.shape[:-2], a.shape[-2], b.shape[-1]
    a3, b3 = a.reshape(-1, m, a.shape[-1]), b.reshape(-1, *b.shape[-2:])
    if a3.shape[0] == 1:  # one problem: oneDNN's result as it is, no copy
        return _onednn_product(a3[0], b3[0]).reshape(*lead, m, n)
    out = torch.empty((a3.shape[0], m, n), dtype=a.dtype)
    for i in range(a3.shape[0]):
        out[i] = _onednn_product(a3[i], b3[i])
    return out.reshape(*lead, m, n)


def products(kind: str, default: Product) -> Product:
    """The CPU matmul for ``kind`` (one of PRODUCTS); "torch" gives ``default`` back."""
    if kind == "onednn":
        return onednn_matmul
    if kind == "torch":
        return default
    raise ValueError(f"CPU products must be one of {PRODUCTS}; got {kind!r}")
