"""The public torch loss on CUDA graphs, and the cached device constants that make it capturable.

A CUDA graph replays a captured step without Python or launch overhead; capture fails on any
host-device synchronization or copy from host memory. The loss takes its constants (temperature
rates, segment indices) from ``torch_fast.device_constant``, cached per device, and skips the
value check of weights while a capture is running. Capture itself needs CUDA (benchmarks/gpu.sh runs
this file on the card with GPU_CHECKS=1); the cache is checked everywhere. Torch backend only.
"""

from __future__ import annotations

import numpy as np
import pytest
from backends import B

if B.name != "torch":
    pytest.skip("CUDA graphs are torch's", allow_module_level=True)

import torch  # noqa: E402
from driftloss.adapters import torch_fast  # noqa: E402

import driftloss  # noqa: E402

CUDA = torch.cuda.is_available()


def test_device_constants_are_made_once_per_accelerator_device():
    meta = torch.device("meta")  # an accelerator-like device without data
    a = torch_fast.device_constant(torch, [[1.0], [2.0]], torch.float32, meta)
    assert a is torch_fast.device_constant(torch, [[1.0], [2.0]], torch.float32, meta)
    assert a.shape == (2, 1) and a.device == meta
    assert torch_fast.device_constant(torch, [[1.0], [3.0]], torch.float32, meta) is not a
    assert torch_fast.device_constant(torch, [1, 2], None, meta).dtype == torch.int64
    cpu = torch_fast.device_constant(torch, [0.5, 2.0], torch.float64, torch.device("cpu"))
    assert torch.equal(cpu, torch.tensor([0.5, 2.0], dtype=torch.float64))
    assert cpu is not torch_fast.device_constant(torch, [0.5, 2.0], torch.float64, torch.device("cpu"))


def _groups(rng, dev):
    def t(*shape):
        return torch.tensor(rng.normal(size=shape) + 1.0, dtype=torch.float32, device=dev)

    gen = {"loc": t(8, 6, 16), "mean": t(8, 1, 16)}
    pos = {"loc": t(12, 6, 16), "mean": t(12, 1, 16)}
    neg = {"loc": t(4, 6, 16), "mean": t(4, 1, 16)}
    return gen, pos, neg


@pytest.mark.skipif(not CUDA, reason="capturing a CUDA graph needs a CUDA device")
def test_loss_and_gradient_replay_from_a_cuda_graph():
    rng = np.random.default_rng(0)
    gen, pos, neg = _groups(rng, "cuda")
    weight = torch.full((4,), 2.0, device="cuda")
    leaves = {k: v.clone().requires_grad_(True) for k, v in gen.items()}

    def step():
        for v in leaves.values():
            v.grad = None
        loss = driftloss.drifting_loss_groups(leaves, pos, neg, neg_weight=weight)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for fresh in (_groups(rng, "cuda") for _ in range(2)):  # new inputs copied into the captured ones
        with torch.no_grad():
            for k in leaves:
                leaves[k].copy_(fresh[0][k])
                pos[k].copy_(fresh[1][k])
                neg[k].copy_(fresh[2][k])
        graph.replay()
        eager = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
        loss = driftloss.drifting_loss_groups(eager, pos, neg, neg_weight=weight)
        loss.backward()
        torch.testing.assert_close(captured, loss, rtol=1e-6, atol=0)
        for k in leaves:
            torch.testing.assert_close(leaves[k].grad, eager[k].grad, rtol=1e-5, atol=1e-9)
