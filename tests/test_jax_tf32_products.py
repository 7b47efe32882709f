"""The opt-in TF32 products of JAX's fast drift on accelerators (adapters/jax_fast.ACCELERATOR_PRODUCTS).

XLA's CPU compiler rejects the TF32 algorithms, so on the CPU the step is exported for CUDA
(``jax.export``, lowering only) and its products are read from the module: with "tf32x3" every
float32 product over MIN_TF32_INNER or more terms, gradient included, must carry XLA's three-pass
TF32 algorithm, and by default every product must be a float32 one at HIGHEST precision. The
accuracy of the algorithm itself is checked where a GPU runs the test (benchmarks/gpu.sh with
GPU_CHECKS=1). JAX backend only.
"""

from __future__ import annotations

import importlib
import math
import re

import numpy as np
import pytest
from backends import B

if B.name != "jax":
    pytest.skip("the accelerator products are JAX's", allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import driftloss  # noqa: E402

jax_fast = importlib.import_module("driftloss.adapters.jax_fast")

_DOT = re.compile(r"stablehlo\.dot_general .*contracting_dims = \[([\d, ]*)\] x .*: \(tensor<([\dx]+)x(\w+)>")
_TF32X3 = "lhs_precision_type = tf32, rhs_precision_type = tf32, accumulation_type = f32"


def _groups_problem(dtype=np.float32):
    """Two feature groups [n, L, C] (C = 40 and 24, so the distance products are long ones)."""
    rng = np.random.default_rng(3)
    shapes = {"a": (6, 3, 40), "b": (6, 1, 24)}
    gen = {k: jnp.asarray((rng.normal(size=s) + 1.0).astype(dtype)) for k, s in shapes.items()}
    pos = {k: jnp.asarray(rng.normal(size=(7, *s[1:])).astype(dtype)) for k, s in shapes.items()}
    neg = {k: jnp.asarray((rng.normal(size=(3, *s[1:])) - 1.0).astype(dtype)) for k, s in shapes.items()}
    return gen, pos, neg


def _step(pos, neg):
    def loss(gen):
        return driftloss.drifting_loss_groups(gen, pos, neg, taus=(0.05, 0.2),
                                              neg_weight=jnp.full(3, 1.5, dtype=jnp.float32))

    return jax.jit(jax.value_and_grad(loss))


def _products(module: str) -> list[tuple[int, str, str]]:
    """(terms summed, dtype, the line) of every dot_general in an exported module's text."""
    found = []
    for line in module.splitlines():
        m = _DOT.search(line)
        if m:
            dims = [int(d) for d in m.group(2).split("x")]
            axes = [int(a) for a in m.group(1).split(",") if a.strip()]
            found.append((math.prod(dims[a] for a in axes), m.group(3), line))
    return found


def _exported_for_cuda(monkeypatch, setting: str) -> list[tuple[int, str, str]]:
    monkeypatch.setattr(jax_fast, "block_plan", lambda a: "accelerator")
    monkeypatch.setattr(jax_fast, "ACCELERATOR_PRODUCTS", setting)
    gen, pos, neg = _groups_problem()
    exported = jax.export.export(_step(pos, neg), platforms=["cuda"])(gen)
    return _products(exported.mlir_module())


def test_tf32x3_reaches_every_long_float32_product(monkeypatch):
    products = _exported_for_cuda(monkeypatch, "tf32x3")
    long = [p for p in products if p[0] >= jax_fast.MIN_TF32_INNER and p[1] == "f32"]
    assert len(long) >= 4, products  # distances, drift and V's products at least
    for _, _, line in long:
        assert _TF32X3 in line and "num_primitive_operations = 3" in line, line
    for terms, _, line in products:
        if terms < jax_fast.MIN_TF32_INNER:
            assert "HIGHEST" in line and "algorithm" not in line, line


def test_float32_products_by_default(monkeypatch):
    assert jax_fast.ACCELERATOR_PRODUCTS == "highest"  # float32 unless a user opts in
    products = _exported_for_cuda(monkeypatch, "highest")
    assert products
    for _, _, line in products:
        assert "precision = [HIGHEST, HIGHEST]" in line and "algorithm" not in line, line


def test_cpu_plan_ignores_the_setting(monkeypatch):
    gen, pos, neg = _groups_problem()
    expected = _step(pos, neg)(gen)
    monkeypatch.setattr(jax_fast, "ACCELERATOR_PRODUCTS", "tf32x3")
    got = _step(pos, neg)(gen)
    assert float(got[0]) == float(expected[0])
    for k in gen:
        np.testing.assert_array_equal(np.asarray(got[1][k]), np.asarray(expected[1][k]))


def test_unknown_setting_is_refused(monkeypatch):
    monkeypatch.setattr(jax_fast, "block_plan", lambda a: "accelerator")
    monkeypatch.setattr(jax_fast, "ACCELERATOR_PRODUCTS", "tf32")
    gen, pos, neg = _groups_problem()
    with pytest.raises(ValueError, match="ACCELERATOR_PRODUCTS must be one of"):
        _step(pos, neg)(gen)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="TF32 products need a GPU (benchmarks/gpu.sh)")
def test_tf32x3_on_gpu_keeps_float32_accuracy(monkeypatch):
    """On the GPU the three-pass products give the float64 loss and gradient to float32's order,
    where one TF32 pass per product does not."""
    gen, pos, neg = _groups_problem()
    gen64, pos64, neg64 = _groups_problem(np.float64)
    with jax.default_device(jax.devices("cpu")[0]):
        loss64, grad64 = _step(pos64, neg64)(gen64)

    def error(setting, products=None):
        monkeypatch.setattr(jax_fast, "ACCELERATOR_PRODUCTS", setting)
        if products is not None:
            monkeypatch.setattr(jax_fast, "accelerator_products", products)
        loss, grad = _step(pos, neg)(gen)
        return max(abs(float(loss) / float(loss64) - 1), *(
            float(np.linalg.norm(np.asarray(grad[k], np.float64) - np.asarray(grad64[k]))
                  / np.linalg.norm(np.asarray(grad64[k]))) for k in gen))

    three = error("tf32x3")
    assert three < 1e-5, three
    one_pass = jax.lax.DotAlgorithmPreset.TF32_TF32_F32
    single = error("tf32x3", lambda setting, matmul: lambda a, b: jnp.matmul(a, b, precision=one_pass))
    assert single > 10 * three, (single, three)
