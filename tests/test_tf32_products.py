"""The opt-in TF32 products of torch's fast drift on CUDA (driftloss.adapters.torch_tf32).

TF32 itself needs a GPU; here it is emulated on the CPU (operands rounded to 10 mantissa bits, the
product taken in float64), which is what the tensor cores compute up to the order of accumulation.
Against that emulation the three-product split must keep float32 accuracy where one TF32 product
does not. Torch backend only.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from backends import B

if B.name != "torch":
    pytest.skip("the TF32 products are torch's", allow_module_level=True)

import torch  # noqa: E402
from driftloss.adapters import torch_fast, torch_tf32  # noqa: E402

from driftloss._drift import DriftOptions, reference_drift  # noqa: E402
from driftloss._fast_drift import fast_drift  # noqa: E402


def _to_tf32(a: torch.Tensor) -> torch.Tensor:
    """float32 a rounded to nearest TF32 (10 mantissa bits; ties away from zero, as cvt.rna)."""
    bits = a.view(torch.int32)
    return ((bits + (1 << 12)) & -(1 << 13)).view(torch.float32)


def emulated_tf32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """One TF32 product as the tensor cores give it: rounded operands, a wide accumulator."""
    return torch.matmul(_to_tf32(a).double(), _to_tf32(b).double()).float()


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_split_is_exact_and_its_high_part_fits_tf32():
    rng = np.random.default_rng(0)
    a = torch.tensor(rng.normal(size=(4, 300)) * 10.0 ** rng.integers(-30, 30, (4, 300)), dtype=torch.float32)
    hi, lo = torch_tf32.split_tf32(a)
    assert torch.equal(hi + lo, a)
    assert torch.equal(_to_tf32(hi), hi)  # nothing below TF32's last bit
    assert not torch.equal(hi, a)  # random float32 numbers have low bits to split off
    assert bool(torch.all(lo.abs() <= a.abs() * 2.0**-10))
    hi_t, _ = torch_tf32.split_tf32(a.mT)  # any strides
    assert torch.equal(hi_t, hi.mT)


def test_three_tf32_products_keep_float32_accuracy():
    rng = np.random.default_rng(1)
    a64 = rng.normal(size=(3, 40, 200)) + 2.0
    b64 = rng.normal(size=(1, 200, 30)) - 1.0
    exact = a64 @ b64
    a, b = torch.tensor(a64, dtype=torch.float32), torch.tensor(b64, dtype=torch.float32)
    one = _rel(emulated_tf32(a, b), exact)
    three = _rel(torch_tf32.tf32x3_matmul(a, b, product=emulated_tf32), exact)
    plain = _rel(torch.matmul(a, b), exact)
    assert one > 1e-5  # the emulation does lose TF32's digits
    assert three < 3 * max(plain, 1e-7), (three, plain)
    short = torch.tensor(a64[..., :3], dtype=torch.float32)  # a sum over three temperatures: one product
    assert torch.equal(torch_tf32.tf32x3_matmul(short, b[:, :3], product=emulated_tf32), short @ b[:, :3])


def _device(a):
    return a.device


def _drift_problem(seed: int, n: int = 12, p: int = 20, d: int = 64):
    """Two close clouds with an offset, high-dimensional: distances concentrate, as in features."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(3, n, d)) + 5.0
    pos = rng.normal(size=(3, p, d)) * 1.1 + 5.2
    w = (np.ones((3, n)), None, np.ones((3, p)))
    return x, pos, w


@pytest.mark.parametrize("augment", [False, True])
def test_fast_drift_with_three_tf32_products_equals_float64(augment):
    x64, pos64, w64 = _drift_problem(2)
    opts = DriftOptions(taus=(0.02, 0.05, 0.2))
    as64, as32 = (functools.partial(torch.tensor, dtype=dt) for dt in (torch.float64, torch.float32))
    w_ref = tuple(None if a is None else as64(a) for a in w64)
    v_ref, _, _ = reference_drift(as64(x64), as64(pos64), None, w_ref, opts, xp=B.xp, matmul=torch.matmul,
                                  device=_device)
    args = (as32(x64), as32(pos64), None, tuple(None if a is None else as32(a) for a in w64), opts)

    def drift(matmul):
        v, _, _ = fast_drift(*args, xp=B.xp, matmul=matmul, device=_device, augment=augment)
        return _rel(v, v_ref)

    three = drift(functools.partial(torch_tf32.tf32x3_matmul, product=emulated_tf32))
    assert three < 1e-5, three
    assert drift(emulated_tf32) > 10 * three  # what the split buys


def test_products_setting():
    assert torch_tf32.products("ieee", torch.matmul) is torch.matmul
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    for kind in ("tf32x3", "tf32"):  # on the CPU TF32 does not exist: float32 results
        assert torch.allclose(torch_tf32.products(kind, torch.matmul)(a, b), a @ b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="tf32x3"):
        torch_tf32.products("bf16", torch.matmul)
    assert torch_fast.CUDA_PRODUCTS == "ieee"  # float32 unless a user opts in


def test_tf32_allowed_restores_the_precision():
    saved = torch.get_float32_matmul_precision()
    with torch_tf32.tf32_allowed():
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == saved
