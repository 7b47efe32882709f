"""The implementations under test; each turns a scenario into a step() -> (loss, gradients) runner.

paper-literal  benchmarks/paper_literal.py (torch, fp32, one call per feature map)
numpy          driftloss on NumPy (the blocked fast drift, cache-sized blocks): drift_field(normalize=True)
               gives loss mean(V^2) and gradient -2 V / (s * x.size), which is what drifting_loss +
               autodiff would return; its blocks split across the CPUs' threads (DRIFTLOSS_NUM_THREADS);
               numpy-one-thread, the same on one thread; numpy-core, with the hook off (the core)
torch          driftloss.drifting_loss_groups on torch (all groups in one call; one group per call
               for the single-call scenarios) + backward: what a user runs, the blocked fast drift
               (on accelerators the groups of one feature map share one evaluation, each with its
               own S and lambda)
torch-stats    torch asking for the statistics too (return_stats=True, as the reference trainers do:
               feature scale, drift rms and the kernel's effective neighbours per tau)
torch-fused    the same with the fused Triton kernels switched on (driftloss.adapters.torch_fused,
               opt-in; CUDA only: elsewhere they decline and the blocked path runs)
torch-fused:k=v,...  the fused kernels with other settings: prec=D/L/F (tl.dot input precisions of
               the distance, lambda and drift products), warps=, bc= (channels per step), work=
               (channels per work item), stages= (software pipelining depth, lowered
               automatically where shared memory is short); e.g. torch-fused:prec=tf32x3/tf32/tf32x3
torch-pergroup torch with one evaluation per group (what it runs on the CPU, where torch does not share
               them)
torch-augmented torch with the squared distances always from the augmented product (the default
               takes it only where copying the points costs less than the passes it saves)
torch-tf32x3, torch-tf32  torch with the blocked path's products on CUDA from three TF32 products
               (float32-faithful) or one (fast, lossy): driftloss.adapters.torch_tf32, opt-in
torch-mkl      torch with its CPU products left to torch.matmul (MKL), where the default sends the large
               ones to oneDNN (driftloss.adapters.torch_cpu_products)
torch-kept-coefficients  torch with the kernel's coefficients kept in place of F wherever they are
               smaller (V from one more product; the default does so above torch_fast.DRIFT_ELEMENTS)
torch-stack-all  torch with the groups of one shape stacked into one evaluation whatever their size
               (the default stacks them in runs of at most torch_fast.STACK_ELEMENTS points)
torch-whole-columns  torch with the centred columns [L, J, D] of every call made once (the default
               makes them per block above 64 MiB: less memory, one more copy of the inputs per pass)
torch-graphed  torch's step (loss and backward) captured once in a CUDA graph and replayed: the step
               without Python and launch overhead, as torch.compile(mode="reduce-overhead") or a
               graphed training step would run it; its peak memory is the graph's pool, measured
               at capture (CUDA only)
torch-core     torch with the fast-path hooks switched off (the reference core on torch)
jax, jax-core  the sum of one driftloss.adapters.jax.drifting_loss per call (group) under
               jax.jit(jax.value_and_grad(...)), fast path on / off
jax-groups     driftloss.drifting_loss_groups on JAX (all groups in one call, as the torch rows)
jax-tf32x3     jax-groups with the accelerator plan's products in XLA's three-pass TF32 algorithm
               (float32-faithful; adapters/jax_fast.ACCELERATOR_PRODUCTS, opt-in; GPU only)
reference-cuda  the core in float64 on torch CUDA (the error reference on the GPU; the core is tested
               against the independent float64 NumPy reference to 1e-10); reference-cuda-blocked,
               the blocked fast drift in float64 there, where the core's temporaries would not fit
reference      the core in float64 on NumPy (the error reference); where the core's [N, J]
               temporaries exceed the memory limit, the blocked fast drift in float64 on NumPy, which
               tests/test_fast_path.py checks against the core to 1e-10
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from typing import Any
from unittest import mock

import numpy as np

from benchmarks.scenarios import Scenario

# The torch implementations besides torch-fused[:k=v,...].
TORCH_IMPLS = ("torch", "torch-stats", "torch-pergroup", "torch-augmented", "torch-tf32x3", "torch-tf32",
               "torch-mkl", "torch-kept-coefficients", "torch-stack-all", "torch-whole-columns",
               "torch-graphed", "torch-core")
# The implementations that differ from "torch" by one setting of adapters/torch_fast.py: (name, value).
TORCH_FAST_SETTINGS = {
    "torch-augmented": ("AUGMENT", True),  # the squared distances always from the augmented product
    "torch-whole-columns": ("COLUMN_ELEMENTS", 1 << 62),
    "torch-kept-coefficients": ("DRIFT_ELEMENTS", 0),
    "torch-mkl": ("CPU_PRODUCTS", "torch"),
    "torch-tf32x3": ("CUDA_PRODUCTS", "tf32x3"),
    "torch-tf32": ("CUDA_PRODUCTS", "tf32"),
}
IMPLS = ("paper-literal", "numpy", "numpy-one-thread", "numpy-core", *TORCH_IMPLS[:1], "torch-fused",
         *TORCH_IMPLS[1:], "jax", "jax-groups", "jax-tf32x3", "jax-core")


@dataclasses.dataclass
class Runner:
    step: Callable[[], Any]  # one loss and gradient evaluation; returns framework arrays
    sync: Callable[[Any], None]  # waits for the device
    to_numpy: Callable[[Any], tuple[float, list[np.ndarray]]]  # (loss, gradient per call)
    peak_bytes: int | None = None  # memory held for the step where it is set aside at setup (graphs)
    # JAX: the compiled step's memory plan, (temporaries, outputs) in bytes, for XLA compiler options
    xla_plan: Callable[[dict | None], tuple[int, int]] | None = None


@contextlib.contextmanager
def fast_path(adapter: str, enabled: bool, fused: bool | None = None, shared: bool | None = None,
              stack_elements: int | None | bool = False):
    """Temporarily switch a framework's fast-path hooks off: compute_drift (enabled=False) and
    fused_loss (fused=False; default: as enabled); shared=True/False forces share_groups (the
    groups of one shape in one evaluation) on or off; stack_elements (False: as it is) sets the
    backend's limit on the points stacked into one evaluation (None: none)."""
    import importlib

    module = importlib.import_module(f"driftloss.adapters.{adapter}")
    saved = module.BACKEND
    fused = enabled if fused is None else fused
    changes = {} if enabled else {"compute_drift": None}
    if not fused and hasattr(saved, "fused_loss"):
        changes["fused_loss"] = None
    if shared is not None:
        changes["share_groups"] = lambda a: shared
    if stack_elements is not False:
        changes["stack_elements"] = stack_elements
    module.BACKEND = dataclasses.replace(saved, **changes)
    try:
        yield
    finally:
        module.BACKEND = saved


@contextlib.contextmanager
def accelerator_plan():
    """torch's and JAX's blocked paths planned as on a GPU (blocks of CUDA_BLOCK_ELEMENTS /
    ACCELERATOR_BLOCK_ELEMENTS, the groups of one shape in one evaluation) whatever the device: their
    memory and torch's operator counts measured on the CPU."""
    from driftloss.adapters import jax_fast, torch_fast

    with (mock.patch.object(torch_fast, "block_plan", lambda a: "accelerator"),
          mock.patch.object(jax_fast, "block_plan", lambda a: "accelerator"),
          fast_path("torch", True, shared=True)):
        yield


@contextlib.contextmanager
def fused_settings(spec: str):
    """The fused kernels switched on, with settings from 'k=v,...' (prec=D/L/F, warps=, bc=, work=,
    stages=); all restored afterwards."""
    from driftloss.adapters import torch_fused

    saved = torch_fused.PRECISION, torch_fused.TILING, torch_fused.ENABLED
    prec, tiling, _ = saved
    for item in filter(None, spec.split(",")):
        key, value = item.split("=")
        if key == "prec":
            d, lam, f = value.split("/")
            prec = torch_fused.Precision(distances=d, lam=lam, drift=f)
        elif key in ("warps", "bc", "work", "stages"):
            field = {"warps": "warps", "bc": "channels_step", "work": "work_channels",
                     "stages": "stages"}[key]
            tiling = dataclasses.replace(tiling, **{field: int(value)})
        else:
            raise ValueError(f"unknown fused setting {key!r}")
    torch_fused.PRECISION, torch_fused.TILING = prec, tiling
    torch_fused.use_fused_kernels(True)
    try:
        yield
    finally:
        torch_fused.PRECISION, torch_fused.TILING, torch_fused.ENABLED = saved


def context(impl: str) -> contextlib.AbstractContextManager:
    """A fresh context in which ``impl``'s runner must run (hooks switched, settings applied)."""
    if impl.startswith("torch-fused"):
        return fused_settings(impl.partition(":")[2])
    if impl == "reference-cuda-blocked":
        return fast_path("torch", True, fused=False)
    if impl == "torch-pergroup":
        return fast_path("torch", True, fused=False, shared=False)
    if impl in TORCH_FAST_SETTINGS:
        from driftloss.adapters import torch_fast

        return mock.patch.object(torch_fast, *TORCH_FAST_SETTINGS[impl])
    if impl == "torch-stack-all":
        return fast_path("torch", True, stack_elements=None)
    if impl in ("torch-core", "reference-cuda"):
        return fast_path("torch", False)
    if impl in ("jax", "jax-core"):
        return fast_path("jax", impl == "jax")
    if impl == "jax-tf32x3":
        from driftloss.adapters import jax_fast

        return mock.patch.object(jax_fast, "ACCELERATOR_PRODUCTS", "tf32x3")
    if impl in ("reference", "numpy-core"):
        return numpy_core()
    if impl == "numpy-one-thread":
        return mock.patch.dict(os.environ, {"DRIFTLOSS_NUM_THREADS": "1"})
    return contextlib.nullcontext()


@contextlib.contextmanager
def numpy_core():
    """NumPy's blocked fast drift switched off: the reference core."""
    from driftloss import _backends

    saved = _backends._NUMPY
    _backends._NUMPY = dataclasses.replace(saved, compute_drift=None)
    try:
        yield
    finally:
        _backends._NUMPY = saved


def make(impl: str, scen: Scenario, device: str) -> tuple[Runner, contextlib.AbstractContextManager]:
    """A runner and the context it must run in (``context(impl)`` gives another)."""
    if impl == "paper-literal":
        runner = _paper_literal(scen, device)
    elif impl == "torch-graphed":
        runner = _graphed(_torch(scen, device))
    elif impl in TORCH_IMPLS or impl.startswith("torch-fused"):
        runner = _torch(scen, device, stats=impl == "torch-stats")
    elif impl in ("reference-cuda", "reference-cuda-blocked"):
        runner = _torch(scen, device, dtype="float64")
    elif impl in ("jax", "jax-groups", "jax-tf32x3", "jax-core"):
        runner = _jax(scen, groups=impl in ("jax-groups", "jax-tf32x3"))
    elif impl in ("numpy", "numpy-one-thread", "numpy-core"):
        runner = _numpy(scen, np.float32)
    elif impl == "reference":
        runner = _numpy(scen, np.float64)
    elif impl == "reference-blocked":
        runner = _numpy(scen, np.float64, blocked=True)
    else:
        raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")
    return runner, context(impl)


def _torch_inputs(scen: Scenario, device: str, dtype: str = "float32"):
    import torch

    dt = getattr(torch, dtype)

    def t(a):
        return None if a is None else torch.tensor(a, dtype=dt, device=device)

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


def _graphed(runner: Runner) -> Runner:
    """``runner``'s step captured in one CUDA graph (after warm-up steps on a side stream, as
    torch.cuda.graph requires) and replayed; the gradients live in the graph's pool."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("torch-graphed needs CUDA")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            runner.sync(runner.step())
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = runner.step()  # sets the gradients to None first: backward allocates them in the pool
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before

    def step():
        graph.replay()
        return loss

    return Runner(step, runner.sync, runner.to_numpy, peak_bytes=peak)


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


def _torch(scen: Scenario, device: str, dtype: str = "float32", stats: bool = False) -> Runner:
    from driftloss.adapters.torch import drifting_loss

    import driftloss

    torch, xs, poss, negs = _torch_inputs(scen, device, dtype)
    # One guidance weight vector shared by every group, as drifting_loss_groups receives it.
    weight = scen.calls[0].neg_weight
    w = None if weight is None else torch.full((scen.calls[0].neg.shape[1],), weight,
                                               dtype=getattr(torch, dtype), device=device)

    def loss_fn():
        if len(xs) == 1:
            out = drifting_loss(xs[0], poss[0], negs[0], scen.taus, neg_weight=w, return_stats=stats)
        else:
            # calls [L, n, C] -> groups [n, L, C] (views); drifting_loss_groups makes each location a
            # problem.
            gen = {str(k): x.transpose(0, 1) for k, x in enumerate(xs)}
            pos = {str(k): p.transpose(0, 1) for k, p in enumerate(poss)}
            neg = None if negs[0] is None else {str(k): q.transpose(0, 1) for k, q in enumerate(negs)}
            out = driftloss.drifting_loss_groups(gen, pos, neg, scen.taus, neg_weight=w, return_stats=stats)
        return out[0] if stats else out

    return _torch_runner(torch, xs, loss_fn)


def _jax(scen: Scenario, groups: bool = False) -> Runner:
    import jax
    import jax.numpy as jnp
    from driftloss.adapters.jax import drifting_loss

    import driftloss

    def j(a):
        return None if a is None else jnp.asarray(a, dtype=jnp.float32)

    xs = [j(c.x) for c in scen.calls]
    poss = [j(c.pos) for c in scen.calls]
    negs = [j(c.neg) for c in scen.calls]
    # One guidance weight vector shared by every group, as drifting_loss_groups receives it.
    c0 = scen.calls[0]
    w = None if c0.neg_weight is None else jnp.full((c0.neg.shape[1],), c0.neg_weight, jnp.float32)

    def as_groups(arrays):  # calls [L, n, C] -> groups [n, L, C], as the torch runner
        return None if arrays[0] is None else {str(k): jnp.swapaxes(a, 0, 1) for k, a in enumerate(arrays)}

    def total(xs, poss, negs):
        if groups and len(xs) > 1:
            return driftloss.drifting_loss_groups(as_groups(xs), as_groups(poss), as_groups(negs), scen.taus,
                                                  neg_weight=w)
        return sum(drifting_loss(x, p, q, scen.taus, neg_weight=w)
                   for x, p, q in zip(xs, poss, negs, strict=True))

    f = jax.jit(jax.value_and_grad(total))

    def to_numpy(out):
        loss, grads = out
        return float(loss), [np.asarray(g, dtype=np.float64) for g in grads]

    def xla_plan(options=None):
        memory = f.lower(xs, poss, negs).compile(options).memory_analysis()
        return memory.temp_size_in_bytes, memory.output_size_in_bytes

    return Runner(lambda: f(xs, poss, negs), lambda out: jax.block_until_ready(out), to_numpy,
                  xla_plan=xla_plan)


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
