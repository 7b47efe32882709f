"""torch's large CPU products through oneDNN (driftloss.adapters.torch_cpu_products). Torch backend only.

The routed products must equal float64 products to float32 accuracy for every operand layout that
fast_drift passes (transposed views, column slices, batches), fall back to torch.matmul wherever the
route does not apply, and leave the public loss equal to the float64 core on problems large enough to
take it.
"""

from __future__ import annotations

import numpy as np
import pytest
from backends import B

if B.name != "torch":
    pytest.skip("the oneDNN products are torch's", allow_module_level=True)

import torch  # noqa: E402
from driftloss.adapters import torch_cpu_products, torch_fast  # noqa: E402

import driftloss  # noqa: E402
from driftloss._drift import DriftOptions, reference_drift  # noqa: E402

needs_onednn = pytest.mark.skipif(not torch_cpu_products.available(),
                                  reason="this torch build has no working oneDNN product (it falls back)")


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _operands(lead, m, k, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*lead, m, k, generator=gen), torch.randn(*lead, k, n, generator=gen)


@needs_onednn
@pytest.mark.parametrize("layout", ["plain", "transposed", "sliced"])
@pytest.mark.parametrize("lead", [(), (1,), (3,), (2, 2)])
def test_routed_products_equal_float64(layout, lead):
    m, k, n = 96, 320, 288  # 8.8 M multiply-adds per problem: above PER_PROBLEM_MACS
    assert m * k * n >= torch_cpu_products.PER_PROBLEM_MACS
    a, b = _operands(lead, m, k, n)
    if layout == "transposed":  # b as the transposed view of a contiguous [.., N, K], as y3.mT
        b = b.mT.contiguous().mT
    elif layout == "sliced":  # column slices of wider operands, as the kernel's negative columns
        a = torch.cat([a, a[..., :7]], dim=-1)[..., :k]
        b = torch.cat([b, b[..., :5]], dim=-1)[..., :n]
    assert torch_cpu_products._uses_onednn(a, b)
    got = torch_cpu_products.onednn_matmul(a, b)
    assert got.shape == (*lead, m, n) and got.dtype == torch.float32
    assert _rel(got, a.double() @ b.double()) < 1e-6


def test_products_that_stay_with_torch():
    small = _operands((), 8, 16, 8)
    assert not torch_cpu_products._uses_onednn(*small)
    a, b = _operands((), 96, 320, 288)
    assert not torch_cpu_products._uses_onednn(a.double(), b.double())  # float64
    assert not torch_cpu_products._uses_onednn(a[:, :8], b[:8])  # inner dimension below MIN_INNER
    assert not torch_cpu_products._uses_onednn(a.expand(2, -1, -1), b)  # broadcast batch dims
    leaf = a.clone().requires_grad_(True)
    assert not torch_cpu_products._uses_onednn(leaf, b)  # a gradient is wanted: the op has none
    out = torch_cpu_products.onednn_matmul(leaf, b)
    out.sum().backward()
    assert torch.allclose(leaf.grad, b.sum(-1).expand_as(leaf), rtol=1e-5, atol=1e-4)
    with torch.no_grad():  # no gradient wanted: the route applies where oneDNN works
        assert torch_cpu_products._uses_onednn(leaf, b) == torch_cpu_products.available()


def test_products_setting():
    assert torch_cpu_products.products("torch", torch.matmul) is torch.matmul
    assert torch_cpu_products.products("onednn", torch.matmul) is torch_cpu_products.onednn_matmul
    with pytest.raises(ValueError, match="onednn"):
        torch_cpu_products.products("mkl", torch.matmul)
    assert torch_fast.CPU_PRODUCTS == "onednn"


@needs_onednn
@pytest.mark.parametrize("products", ["onednn", "torch"])
def test_loss_with_large_products_equals_the_float64_core(products, monkeypatch):
    """A problem wide enough for the route ([3 * 64, 128] @ [128, 4096] in the drift): the loss and
    its gradient equal the float64 reference drift's."""
    monkeypatch.setattr(torch_fast, "CPU_PRODUCTS", products)
    calls = []
    routed = torch_cpu_products._onednn_product
    monkeypatch.setattr(torch_cpu_products, "_onednn_product", lambda a, b: calls.append(1) or routed(a, b))
    rng = np.random.default_rng(3)
    x64 = rng.normal(size=(64, 4096)) + 5.0
    pos64 = rng.normal(0.2, 1.1, size=(64, 4096)) + 5.0
    x = torch.tensor(x64, dtype=torch.float32, requires_grad=True)
    loss = driftloss.drifting_loss(x, torch.tensor(pos64, dtype=torch.float32))
    loss.backward()
    assert (len(calls) >= 2) == (products == "onednn")  # the distance and drift products took the route
    opts = DriftOptions(taus=driftloss.DEFAULT_TAUS)
    as64 = torch.tensor(x64), torch.tensor(pos64)
    weights = (torch.ones(64, dtype=torch.float64), None, torch.ones(64, dtype=torch.float64))
    v, s, _ = reference_drift(*as64, None, weights, opts, xp=B.xp, matmul=torch.matmul,
                              device=lambda a: a.device)
    assert _rel(loss.item(), float(torch.mean(v * v))) < 1e-5
    assert _rel(x.grad, -2 * v / (s * v.numel())) < 1e-5
