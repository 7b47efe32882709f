"""The fused Triton path (driftloss.adapters.torch_fused) equals the float64 core.

On a CUDA machine the kernels run compiled through the public API; elsewhere they run in Triton's
interpreter (TRITON_INTERPRET=1, set here before the kernels are defined) on CPU tensors, through
the same host code with ``allow_cpu=True``. Torch backend only; needs triton.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import numpy as np
import pytest
from backends import B

if B.name != "torch":
    pytest.skip("the fused path is torch's", allow_module_level=True)

import torch  # noqa: E402

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is installed in the torch tox env (its interpreter runs on CPU)")

import driftloss.adapters.torch as torch_adapter  # noqa: E402
from driftloss.adapters import torch_fused  # noqa: E402

import driftloss  # noqa: E402
from driftloss._drift import DriftOptions  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
TAUS = (0.02, 0.05, 0.2)


@contextlib.contextmanager
def core_only():
    """The general path with both fast hooks off: the reference core."""
    saved = torch_adapter.BACKEND
    torch_adapter.BACKEND = dataclasses.replace(saved, compute_drift=None, fused_loss=None)
    try:
        yield
    finally:
        torch_adapter.BACKEND = saved


@contextlib.contextmanager
def fused_everywhere():
    """Route the public API's fused hook through the fused path on CPU too (interpreter)."""
    saved = torch_adapter.BACKEND

    def hook(calls, opts, reduction):
        return torch_fused.fused_loss([torch_fused.Group(*c) for c in calls], opts, reduction, allow_cpu=True)

    torch_adapter.BACKEND = dataclasses.replace(saved, fused_loss=hook)
    try:
        yield
    finally:
        torch_adapter.BACKEND = saved


def count_fused_calls(monkeypatch) -> list[int]:
    """The number of groups of each call that reaches torch_fused.fused_loss, as it happens."""
    calls, original = [], torch_fused.fused_loss

    def spy(groups, *args, **kwargs):
        calls.append(len(groups))
        return original(groups, *args, **kwargs)

    monkeypatch.setattr(torch_fused, "fused_loss", spy)
    return calls


def points(rng, lead, n, c, offset):
    return torch.tensor(rng.normal(offset, 1.0, size=(*lead, n, c)), dtype=torch.float32, device=DEV)


def make_group(rng, lead, n, p, m, c, offset=0.5):
    x = points(rng, lead, n, c, offset)
    pos = points(rng, lead, p, c, offset + 0.2)
    neg = None if m == 0 else points(rng, lead, m, c, offset + 0.1)
    return x, pos, neg


def reference(groups, taus=TAUS, reduction="mean", **opts):
    """float64 core: summed loss and the gradient of every x."""
    xs = [x.double().requires_grad_(True) for x, *_ in groups]
    total = 0.0
    with core_only():
        for x64, (_, pos, neg, w) in zip(xs, groups):
            w64 = [None if a is None else a.double() for a in w]
            total = total + driftloss.drifting_loss(
                x64, pos.double(), None if neg is None else neg.double(), taus, x_weight=w64[0],
                neg_weight=w64[1], pos_weight=w64[2], reduction=reduction, problem_dims=x64.ndim - 2, **opts)
    total.backward()
    return float(total), [x.grad for x in xs]


def fused(groups, taus=TAUS, reduction="mean", scale=1.0, **opts):
    xs = [x.clone().requires_grad_(True) for x, *_ in groups]
    calls = [torch_fused.Group(x, pos, neg, w) for x, (_, pos, neg, w) in zip(xs, groups)]
    loss = torch_fused.fused_loss(calls, DriftOptions(taus=taus, **opts), reduction, allow_cpu=True)
    assert loss is not None, "the fused path declined a supported call"
    (loss * scale).backward()
    return float(loss.detach()), [x.grad / scale for x in xs]


def assert_close(got, want, tol=2e-5):
    loss, grads = got
    loss_ref, grads_ref = want
    assert abs(loss - loss_ref) <= tol * abs(loss_ref)
    for g, r in zip(grads, grads_ref):
        assert float((g.double() - r).norm()) <= tol * float(r.norm())


CASES = {
    # name: (group specs (lead, n, p, m, c), options)
    "guidance, widths across work items": (
        [((3,), 8, 12, 4, 40), ((1,), 8, 12, 4, 300), ((2, 2), 8, 12, 4, 9)], {}),
    "no extra negatives, odd sizes": ([((2,), 5, 7, 0, 6), ((3,), 5, 7, 0, 33)], {}),
    "affinity floor": ([((2,), 8, 12, 4, 20)], {"affinity_floor": 1e-6}),
    "scaled field": ([((2,), 8, 12, 4, 20)], {"attraction": 2.0, "repulsion": 2.0}),
    "two buckets": ([((2,), 8, 12, 4, 20), ((2,), 6, 9, 3, 20)], {}),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_equals_core(name, reduction):
    specs, opts = CASES[name]
    rng = np.random.default_rng(len(name))
    groups = []
    for lead, n, p, m, c in specs:
        x, pos, neg = make_group(rng, lead, n, p, m, c)
        nw = None if m == 0 else torch.full((m,), 0.7, device=DEV)
        groups.append((x, pos, neg, (None, nw, None)))
    assert_close(fused(groups, reduction=reduction, scale=3.0, **opts),
                 reference(groups, reduction=reduction, **opts))


def test_per_problem_weights():
    """Weights that vary over the problems get one row per problem."""
    rng = np.random.default_rng(1)
    x, pos, neg = make_group(rng, (3,), 8, 12, 4, 24)
    xw = torch.tensor(rng.uniform(0.5, 1.5, size=(3, 8)), dtype=torch.float32, device=DEV)
    pw = torch.tensor(rng.uniform(0.5, 1.5, size=(12,)), dtype=torch.float32, device=DEV)
    nw = torch.tensor(rng.uniform(0.0, 2.0, size=(3, 1, 4)), dtype=torch.float32, device=DEV)[:, 0]
    groups = [(x, pos, neg, (xw, nw, pw))]
    assert_close(fused(groups), reference(groups))


def test_groups_api_with_strided_views(monkeypatch):
    """drifting_loss_groups hands permuted [..., L, n, C] views; every group goes in one fused call."""
    rng = np.random.default_rng(2)
    gen = {"loc": points(rng, (2,), 8, 4 * 10, 0.5).reshape(2, 8, 4, 10),
           "mean": points(rng, (2,), 8, 12, 0.5).reshape(2, 8, 1, 12)}
    pos = {k: points(rng, (2,), 12, v.shape[2] * v.shape[3], 0.7).reshape(2, 12, v.shape[2], v.shape[3])
           for k, v in gen.items()}
    neg = {k: points(rng, (2,), 4, v.shape[2] * v.shape[3], 0.6).reshape(2, 4, v.shape[2], v.shape[3])
           for k, v in gen.items()}
    nw = driftloss.cfg_weight(2.0, 8, 4)
    nw = torch.full((2, 4), float(nw), device=DEV)

    def run(ctx):
        g = {k: v.clone().requires_grad_(True) for k, v in gen.items()}
        with ctx:
            loss = driftloss.drifting_loss_groups(g, pos, neg, TAUS, neg_weight=nw)
        loss.backward()
        return float(loss), [g[k].grad.double() for k in gen]

    calls = count_fused_calls(monkeypatch)
    monkeypatch.setattr(torch_fused, "ENABLED", True)
    got = run(fused_everywhere() if not CUDA else contextlib.nullcontext())
    assert calls == [2]
    assert_close(got, run(core_only()))


def test_declines_what_it_does_not_support():
    rng = np.random.default_rng(3)
    x, pos, neg = make_group(rng, (2,), 8, 12, 4, 20)
    g = [torch_fused.Group(x, pos, neg, (None, None, None))]
    for opts, reduction in ((DriftOptions(taus=TAUS, kernel="y"), "mean"),
                            (DriftOptions(taus=TAUS, with_stats=True), "mean"),
                            (DriftOptions(taus=TAUS, attraction=2.0), "mean"),
                            (DriftOptions(taus=TAUS, normalize=False), "mean"),
                            (DriftOptions(taus=TAUS), "none")):
        assert torch_fused.fused_loss(g, opts, reduction, allow_cpu=True) is None
    assert torch_fused.fused_loss([torch_fused.Group(x.double(), pos.double(), None, (None, None, None))],
                                  DriftOptions(taus=TAUS), "mean", allow_cpu=True) is None
    wide = torch_fused.Group(*make_group(rng, (1,), 8, 300, 0, 20), (None, None, None))
    assert torch_fused.fused_loss([wide], DriftOptions(taus=TAUS), "mean", allow_cpu=True) is None
    if not CUDA:  # the public hook never takes CPU tensors
        assert torch_fused.backend_fused_loss([(x, pos, neg, (None, None, None))], DriftOptions(taus=TAUS),
                                              "mean") is None


def test_kernel_that_cannot_be_built_falls_back_with_a_warning(monkeypatch):
    """A device without the resources for a kernel gets the general path, and one warning."""
    from triton.runtime.errors import OutOfResources

    def no_room(*args, **kwargs):
        raise OutOfResources(300000, 232448, "shared memory")

    monkeypatch.setattr(torch_fused, "_launch", no_room)
    monkeypatch.setattr(torch_fused, "_WARNED", set())
    rng = np.random.default_rng(5)
    x, pos, neg = make_group(rng, (2,), 8, 12, 4, 20)
    g = [torch_fused.Group(x.clone().requires_grad_(True), pos, neg, (None, None, None))]
    with pytest.warns(RuntimeWarning, match="cannot run on this device"):
        assert torch_fused.fused_loss(g, DriftOptions(taus=TAUS), "mean", allow_cpu=True) is None


def test_second_backward_is_refused_not_wrong():
    """The gradient buffers are scaled in place by the first backward; a second one must not reuse them."""
    rng = np.random.default_rng(6)
    x, pos, neg = make_group(rng, (2,), 8, 12, 4, 20)
    xg = x.clone().requires_grad_(True)
    group = torch_fused.Group(xg, pos, neg, (None, None, None))
    loss = torch_fused.fused_loss([group], DriftOptions(taus=TAUS), "mean", allow_cpu=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="gradient once"):
        loss.backward()


def test_fused_kernels_are_opt_in(monkeypatch):
    """The public API offers calls to the fused kernels only after use_fused_kernels()."""
    rng = np.random.default_rng(4)
    x, pos, neg = make_group(rng, (4,), 16, 32, 8, 64)
    monkeypatch.setattr(torch_fused, "ENABLED", torch_fused.ENABLED)  # restored afterwards
    calls = count_fused_calls(monkeypatch)
    assert torch_fused.ENABLED is False
    driftloss.drifting_loss(x, pos, neg, TAUS)
    assert calls == []
    torch_fused.use_fused_kernels()
    driftloss.drifting_loss(x, pos, neg, TAUS)
    assert calls == [1]  # offered; off CUDA it declines and the blocked path runs
    torch_fused.use_fused_kernels(False)
    driftloss.drifting_loss(x, pos, neg, TAUS)
    assert calls == [1]


@pytest.mark.skipif(not CUDA, reason="the public API takes the fused path on CUDA only")
def test_public_api_uses_fused_path_on_cuda(monkeypatch):
    rng = np.random.default_rng(4)
    x, pos, neg = make_group(rng, (4,), 16, 32, 8, 64)
    monkeypatch.setattr(torch_fused, "ENABLED", True)
    calls = count_fused_calls(monkeypatch)
    xg = x.clone().requires_grad_(True)
    loss = driftloss.drifting_loss(xg, pos, neg, TAUS)
    loss.backward()
    assert calls == [1]
    assert_close((float(loss), [xg.grad]), reference([(x, pos, neg, (None, None, None))]))
