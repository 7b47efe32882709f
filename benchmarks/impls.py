"""The implementations under test; each turns a scenario into a step() -> (loss, gradients) runner.

paper-literal  benchmarks/paper_literal.py (torch, fp32, one call per feature map)
numpy          driftloss on NumPy (the core): drift_field(normalize=True) gives loss mean(V^2) and
               gradient -2 V / (s * x.size), which is what drifting_loss + autodiff would return
torch          driftloss.adapters.torch.drifting_loss (the fast path, used automatically) + backward
torch-core     the same with the fast-path hook switched off (the reference core on torch)
jax, jax-core  driftloss.adapters.jax under jax.jit(jax.value_and_grad(...)), fast path on / off
reference      the core in float64 on NumPy (the error reference); where the core's [N, J]
               temporaries exceed the memory limit, the blocked fast drift in float64 on NumPy, which
               tests/test_fast_path.py checks against the core to 1e-10
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.scenarios import Scenario

IMPLS = ("paper-literal", "numpy", "torch", "torch-core", "jax", "jax-core")


@dataclasses.dataclass
class Runner:
    step: Callable[[], Any]  # one loss and gradient evaluation; returns framework arrays
    sync: Callable[[Any], None]  # waits for the device
    to_numpy: Callable[[Any], tuple[float, list[np.ndarray]]]  # (loss, gradient per call)


@contextlib.contextmanager
def fast_path(adapter: str, enabled: bool):
    """Temporarily switch a framework's fast-path hook off (enabled=False)."""
    import importlib

    module = importlib.import_module(f"driftloss.adapters.{adapter}")
    saved = module.BACKEND
    if not enabled:
        module.BACKEND = dataclasses.replace(saved, compute_drift=None)
    try:
        yield
    finally:
        module.BACKEND = saved


def make(impl: str, scen: Scenario, device: str) -> tuple[Runner, contextlib.AbstractContextManager]:
    """A runner and the context it must run in."""
    if impl == "paper-literal":
        return _paper_literal(scen, device), contextlib.nullcontext()
    if impl in ("torch", "torch-core"):
        return _torch(scen, device), fast_path("torch", impl == "torch")
    if impl in ("jax", "jax-core"):
        return _jax(scen), fast_path("jax", impl == "jax")
    if impl == "numpy":
        return _numpy(scen, np.float32), contextlib.nullcontext()
    if impl == "reference":
        return _numpy(scen, np.float64), contextlib.nullcontext()
    if impl == "reference-blocked":
        return _numpy(scen, np.float64, blocked=True), contextlib.nullcontext()
    raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")


def _torch_inputs(scen: Scenario, device: str):
    import torch

    def t(a):
        return None if a is None else torch.tensor(a, dtype=torch.float32, device=device)

    xs = [t(c.x).requires_grad_(True) for c in scen.calls]
    return torch, xs, [t(c.pos) for c in scen.calls], [t(c.neg) for c in scen.calls]


def _torch_runner(torch, xs, loss_fn) -> Runner:
    def step():
        for x in xs:
            x.grad = None
        loss = loss_fn()
        loss.backward()
        return loss

    def sync(_):
        if xs[0].is_cuda:
            torch.cuda.synchronize()

    def to_numpy(loss):
        return float(loss.detach()), [x.grad.detach().cpu().double().numpy() for x in xs]

    return Runner(step, sync, to_numpy)


def _paper_literal(scen: Scenario, device: str) -> Runner:
    from benchmarks.paper_literal import map_loss

    torch, xs, poss, negs = _torch_inputs(scen, device)
    maps: dict[int, list[int]] = {}
    for i, c in enumerate(scen.calls):
        maps.setdefault(c.map_id, []).append(i)
    weight = scen.calls[0].neg_weight

    def loss_fn():
        return sum(map_loss([xs[i] for i in idx], [poss[i] for i in idx], [negs[i] for i in idx],
                            weight, scen.taus) for idx in maps.values())

    return _torch_runner(torch, xs, loss_fn)


def _torch(scen: Scenario, device: str) -> Runner:
    from driftloss.adapters.torch import drifting_loss

    torch, xs, poss, negs = _torch_inputs(scen, device)
    weights = [None if c.neg_weight is None else torch.full((c.neg.shape[1],), c.neg_weight, device=device)
               for c in scen.calls]

    def loss_fn():
        return sum(drifting_loss(x, p, q, scen.taus, neg_weight=w)
                   for x, p, q, w in zip(xs, poss, negs, weights, strict=True))

    return _torch_runner(torch, xs, loss_fn)


def _jax(scen: Scenario) -> Runner:
    import jax
    import jax.numpy as jnp
    from driftloss.adapters.jax import drifting_loss

    def j(a):
        return None if a is None else jnp.asarray(a, dtype=jnp.float32)

    xs = [j(c.x) for c in scen.calls]
    poss = [j(c.pos) for c in scen.calls]
    negs = [j(c.neg) for c in scen.calls]
    weights = [None if c.neg_weight is None else jnp.full((c.neg.shape[1],), c.neg_weight, jnp.float32)
               for c in scen.calls]

    def total(xs, poss, negs, weights):
        return sum(drifting_loss(x, p, q, scen.taus, neg_weight=w)
                   for x, p, q, w in zip(xs, poss, negs, weights, strict=True))

    f = jax.jit(jax.value_and_grad(total))

    def to_numpy(out):
        loss, grads = out
        return float(loss), [np.asarray(g, dtype=np.float64) for g in grads]

    return Runner(lambda: f(xs, poss, negs, weights), lambda out: jax.block_until_ready(out), to_numpy)


def _numpy(scen: Scenario, dtype, blocked: bool = False) -> Runner:
    import array_api_compat.numpy as xp_np

    import driftloss
    from driftloss._drift import DriftOptions
    from driftloss._fast_drift import fast_drift

    def drift(x, p, q, w):
        if not blocked:
            v, st = driftloss.drift_field(x, p, q, scen.taus, neg_weight=w, normalize=True, return_stats=True)
            return v, float(st["feature_scale"])
        lead = x.shape[:-2]
        full = (np.ones(x.shape[:-1], dtype), None if q is None else np.broadcast_to(w, q.shape[:-1]),
                np.ones((*lead, p.shape[-2]), dtype))
        v, s, _ = fast_drift(x, p, q, full, DriftOptions(taus=scen.taus), xp=xp_np, matmul=np.matmul)
        return v, float(s)

    xs = [c.x.astype(dtype) for c in scen.calls]
    poss = [c.pos.astype(dtype) for c in scen.calls]
    negs = [None if c.neg is None else c.neg.astype(dtype) for c in scen.calls]
    weights = [None if c.neg_weight is None else np.full((c.neg.shape[1],), c.neg_weight, dtype)
               for c in scen.calls]

    def step():
        loss, grads = 0.0, []
        for x, p, q, w in zip(xs, poss, negs, weights, strict=True):
            v, s = drift(x, p, q, w)
            loss += float(np.mean(v * v))
            grads.append(-2.0 * v / (s * x.size))
        return loss, grads

    return Runner(step, lambda out: None, lambda out: (out[0], [np.asarray(g, np.float64) for g in out[1]]))
