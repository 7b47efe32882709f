"""torch's regression step as one autograd function (driftloss.adapters.torch_regression) against the
array form of docs/design.md §2 step 5 (driftloss._loss.regression_loss without the hook). Torch only."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from backends import B

if B.name != "torch":
    pytest.skip("the regression function is torch's", allow_module_level=True)

import torch  # noqa: E402
from driftloss.adapters import torch as torch_adapter  # noqa: E402
from driftloss.adapters import torch_regression  # noqa: E402

import driftloss  # noqa: E402
from driftloss._loss import regression_loss  # noqa: E402

ARRAY_FORM = dataclasses.replace(torch_adapter.BACKEND, regression_loss=None)
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="the vector-norm branch runs on GPUs")
DEVICES = ["cpu", pytest.param("cuda", marks=NO_CUDA)]
SHAPES = [((5, 7), ()), ((3, 2, 5, 7), (3, 2, 1, 1)), ((4, 6, 3), (4, 1, 1))]  # (x and v, s)


def _inputs(shape, s_shape, device, dtype=torch.float64, seed=0):
    g = np.random.default_rng(seed)
    x = torch.tensor(g.normal(size=shape) + 3.0, dtype=dtype, device=device, requires_grad=True)
    v = torch.tensor(g.normal(size=shape) * 0.5, dtype=dtype, device=device)
    s = torch.tensor(g.uniform(0.5, 2.0, size=s_shape), dtype=dtype, device=device)
    return x, v, s


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape,s_shape", SHAPES)
def test_function_equals_the_array_form(reduction, shape, s_shape):
    _check_against_the_array_form("cpu", reduction, shape, s_shape)


@NO_CUDA
def test_function_on_cuda_equals_the_array_form():
    for reduction in ("mean", "sum", "none"):
        for shape, s_shape in SHAPES:
            _check_against_the_array_form("cuda", reduction, shape, s_shape)


def _check_against_the_array_form(device, reduction, shape, s_shape):
    x, v, s = _inputs(shape, s_shape, device)
    x_ref = x.detach().clone().requires_grad_(True)
    got = regression_loss(x, v, s, reduction, torch_adapter.xp_torch, torch_adapter.BACKEND)
    want = regression_loss(x_ref, v, s, reduction, torch_adapter.xp_torch, ARRAY_FORM)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    weights = torch.linspace(0.5, 1.5, got.numel(), dtype=got.dtype, device=device).reshape(got.shape)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-15)
    # the value is mean(V^2) per problem; the gradient -2 V / (s N D), per problem
    n_d = shape[-2] * shape[-1]
    per_problem = (v * v).mean(dim=(-2, -1))
    expected = {"mean": per_problem.mean(), "sum": per_problem.sum(), "none": per_problem}[reduction]
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    scale = weights / per_problem.numel() if reduction == "mean" else weights  # d (weighted sum) / d problem
    torch.testing.assert_close(x.grad, -2 * v * scale[..., None, None] / (s * n_d), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_function_is_closer_to_float64_than_the_array_form(device):
    """In float32 the array form rounds x/s + V before subtracting x/s; the function does not."""
    x, v, s = _inputs((64, 256), (), device, seed=1)
    x32, v32, s32 = (a.detach().float() for a in (x, v, s))
    exact = (v * v).mean()
    fn = regression_loss(x32, v32, s32, "mean", torch_adapter.xp_torch, torch_adapter.BACKEND)
    arr = regression_loss(x32, v32, s32, "mean", torch_adapter.xp_torch, ARRAY_FORM)
    assert abs(float(fn) / float(exact) - 1) < 1e-6
    assert abs(float(fn) / float(exact) - 1) <= abs(float(arr) / float(exact) - 1)


def test_no_gradient_reaches_v_or_s():
    x, v, s = _inputs((3, 5, 7), (3, 1, 1), "cpu")
    v.requires_grad_(True)
    s.requires_grad_(True)
    torch_regression.per_problem_loss(x, v, s).sum().backward()
    assert v.grad is None and s.grad is None and x.grad is not None


def test_drifting_loss_gradient_is_the_drift_through_the_function():
    """End to end: d loss / d x = -2 V / (s x.numel()) with V from drift_field (README)."""
    g = np.random.default_rng(2)
    x = torch.tensor(g.normal(size=(12, 5)), requires_grad=True)
    pos = torch.tensor(g.normal(size=(9, 5)) + 0.5)
    loss, stats = driftloss.drifting_loss(x, pos, return_stats=True)
    loss.backward()
    v = driftloss.drift_field(x.detach(), pos, tau=(0.02, 0.05, 0.2), normalize=True)
    torch.testing.assert_close(x.grad, -2 * v / (stats["feature_scale"] * x.numel()), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(loss, (v * v).mean(), rtol=1e-10, atol=0)
