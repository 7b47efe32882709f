"""The fused CUDA drifting loss: every group of a call in three Triton launches. Opt-in.

``use_fused_kernels()`` switches it on; by default torch runs the blocked fast drift everywhere,
because these kernels have not yet been measured faster than it (see Speed below).
``driftloss.adapters.torch.BACKEND.fused_loss`` points here. When switched on, ``drifting_loss`` (one
group) and ``drifting_loss_groups`` (all groups at once) hand their validated inputs to ``fused_loss``, which
takes CUDA float32 calls of the common configuration (normalize, "both" kernel, x as negatives,
attraction == repulsion, reduction mean or sum, no stats, no cross-replica sum, N <= 128 and
J = N + M + P <= 256, D > 4) and returns None for anything else, which then runs the general path.

Per launch bucket (groups of equal N, M, P):
  1. distances_kernel  (one program per problem)  -> d, channel means, shares of S
  2. S, s per group (a few small torch ops)
  3. drift_kernel       (one program per work item: a problem and <= WORK_CHANNELS channels)
                        -> sum F_tau^2 per temperature;  lambda_tau per group
  4. drift_kernel FINAL -> the gradient -2 V / (s * count) written straight into buffers, and V^2
The loss is mean(V^2) per group (the value of mean((x/s - sg(x/s + V))^2)), summed over groups;
backward returns the buffers times the incoming gradient. Extra memory: d [problems, NX, JW],
channel means, the gradient buffers (x-sized, which autograd would hold anyway).

Precision: the three products run as tl.dot with ``PRECISION`` ("tf32x3": three TF32 products,
float32-faithful, the default; "ieee"; or the opt-in "tf32"). On an H200, b2-class
(benchmarks/RESULTS.md): tf32x3 5.5e-7 relative gradient error, all-tf32 2.3e-3.

Speed: on that card the first version of these kernels took 121 ms for b2-class (the
paper-literal baseline 59 ms; JAX 36 ms, which runs the blocked algorithm): they were bound by
register spills, not by the matrix units (tf32 ran no faster than tf32x3). This version splits the
columns into x | neg | pos tiles, loads through block pointers and forms each temperature's weights
one tile at a time, which ptxas reports as far fewer spills; it has not been timed on a GPU yet
(benchmarks/gpu.sh times it as "torch-fused" next to the default "torch").
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from driftloss._drift import RMS_FLOOR_SQ, SCALE_FLOOR, DriftOptions

MAX_ROWS = 128  # N, in one tile
MAX_COLUMNS = 256  # J = N + M + P, in one tile
MIN_FEATURES = 5  # D <= 4: the core's exact differences (the Gram form would lose digits)
WORK_CHANNELS = 256  # channels per drift work item


@dataclass(frozen=True)
class Precision:
    """tl.dot input precision of the distance, lambda and final drift products."""

    distances: str = "tf32x3"
    lam: str = "tf32x3"
    drift: str = "tf32x3"


@dataclass(frozen=True)
class Tiling:
    """Launch parameters (tuned by benchmarks/, see RESULTS.md)."""

    channels_step: int = 32  # BC
    warps: int = 8
    work_channels: int = WORK_CHANNELS
    stages: int = 1  # pipelining depth (1 measured fastest on an H200); lowered where shared memory is short


PRECISION = Precision()
TILING = Tiling()
ENABLED = False  # use_fused_kernels()


def use_fused_kernels(enabled: bool = True) -> None:
    """Route supported torch CUDA calls to the fused kernels (True) or to the blocked path (False,
    the default) from now on."""
    global ENABLED
    ENABLED = bool(enabled)


@dataclass
class Group:
    """One drifting_loss call: x [..., N, D] (gradient), pos [..., P, D], neg [..., M, D] or None,
    and its raw column weights (x_w, neg_w, pos_w), each None or broadcastable to [..., n]."""

    x: torch.Tensor
    pos: torch.Tensor
    neg: torch.Tensor | None
    weights: tuple[Any, Any, Any]


def supported(groups: list[Group], opts: DriftOptions, reduction: str, *, allow_cpu: bool = False) -> bool:
    """Whether ``fused_loss`` takes this call (else the general path runs it)."""
    if (not opts.normalize or opts.kernel != "both" or not opts.x_as_negatives or opts.with_stats
            or opts.attraction != opts.repulsion or opts.cross_replica_sum is not None
            or reduction not in ("mean", "sum")):
        return False
    dev = groups[0].x.device
    if dev.type != "cuda" and not allow_cpu:
        return False
    for g in groups:
        arrays = [g.x, g.pos] + ([] if g.neg is None else [g.neg])
        arrays += [w for w in g.weights if isinstance(w, torch.Tensor)]
        if any(a.dtype != torch.float32 or a.device != dev for a in arrays):
            return False
        if any(isinstance(w, torch.Tensor) and w.requires_grad for w in g.weights):
            return False
        n, d = g.x.shape[-2], g.x.shape[-1]
        j = n + g.pos.shape[-2] + (0 if g.neg is None else g.neg.shape[-2])
        if n > MAX_ROWS or j > MAX_COLUMNS or d < MIN_FEATURES or g.x.numel() == 0:
            return False
    return True


def backend_fused_loss(calls: list[tuple[Any, Any, Any, tuple[Any, Any, Any]]], opts: DriftOptions,
                       reduction: str) -> torch.Tensor | None:
    """The ``Backend.fused_loss`` hook: validated calls (x, pos, neg, raw weights) -> loss or None."""
    if not ENABLED or torch.compiler.is_compiling() or not _triton_available():
        return None
    if any(torch._C._functorch.is_functorch_wrapped_tensor(c[0]) for c in calls):
        return None  # vmap / grad transforms: the general path
    return fused_loss([Group(*c) for c in calls], opts, reduction)


def _triton_available() -> bool:
    global _TRITON
    if _TRITON is None:
        _TRITON = importlib.util.find_spec("triton") is not None
    return _TRITON


_TRITON: bool | None = None


def fused_loss(groups: list[Group], opts: DriftOptions, reduction: str, *,
               allow_cpu: bool = False) -> torch.Tensor | None:
    """Sum over groups of ``drifting_loss(group)`` with its gradient, or None if not ``supported``.

    allow_cpu: run on CPU tensors too (tests, under TRITON_INTERPRET=1).
    """
    if not groups or not supported(groups, opts, reduction, allow_cpu=allow_cpu):
        return None
    try:
        return _FusedLoss.apply(_Plan(groups, opts, reduction), *[g.x for g in groups])
    except _compile_failures() as e:  # raised at a launch, before any loss exists: fall back
        key = (type(e).__name__, str(e)[:200])
        if key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(f"driftloss: the fused Triton path cannot run on this device ({key[0]}: {key[1]}); "
                          "using the general path", RuntimeWarning, stacklevel=3)
        return None


_WARNED: set[tuple[str, str]] = set()


def _compile_failures() -> tuple[type[BaseException], ...]:
    """Triton's compile-time and resource errors (a kernel that cannot be built for this device)."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    return (CompilationError, OutOfResources)


class _Plan:
    """What the autograd function needs besides the differentiable x's."""

    def __init__(self, groups: list[Group], opts: DriftOptions, reduction: str):
        self.groups, self.opts, self.reduction = groups, opts, reduction


class _FusedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _Plan, *xs: torch.Tensor) -> torch.Tensor:
        grads = [torch.empty(x.shape, dtype=torch.float32, device=x.device) for x in xs]
        buckets: dict[tuple[int, int, int], list[int]] = {}
        for k, g in enumerate(plan.groups):
            m = 0 if g.neg is None else g.neg.shape[-2]
            buckets.setdefault((g.x.shape[-2], m, g.pos.shape[-2]), []).append(k)
        total = None
        for (n, m, p), idx in buckets.items():
            loss = _bucket_loss([plan.groups[k] for k in idx], [grads[k] for k in idx], n, m, p,
                                plan.opts, plan.reduction)
            total = loss if total is None else total + loss
        ctx.grads = grads
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grads = ctx.grads
        if grads is None:
            raise RuntimeError("driftloss: the fused drifting loss gives its gradient once; compute the loss "
                               "again for a second backward")
        ctx.grads = None
        torch._foreach_mul_(grads, grad_out)  # in place: the buffers are this call's own
        return (None, *grads)


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _problem_offsets(t: torch.Tensor) -> np.ndarray:
    """Element offsets of each problem's [n, D] block in t [..., n, D], in C order of ``...``."""
    lead, strides = t.shape[:-2], t.stride()[:-2]
    off = np.zeros((), dtype=np.int64)
    for size, stride in zip(lead, strides):
        off = off[..., None] + np.arange(size, dtype=np.int64) * stride
    return off.reshape(-1)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _bucket_loss(groups: list[Group], grads: list[torch.Tensor], n: int, m: int, p: int,
                 opts: DriftOptions, reduction: str) -> torch.Tensor:
    from driftloss.adapters import torch_triton as K

    dev = groups[0].x.device
    # Column segments x | neg | pos, each padded to a power of two (a dummy neg tile when M = 0).
    NX, MX, PX = _pow2(n), _pow2(m) if m else 16, _pow2(p)
    JW = NX + MX + PX
    T = len(opts.taus)
    G = len(groups)

    # Weight rows: one per group whose weights do not vary over problems, else one per problem.
    w_rows: list[torch.Tensor] = []
    rows_of_group: list[np.ndarray] = []
    xs, poss, negs = [], [], []
    for g in groups:
        x = _unit_last(g.x.detach())
        pos = _unit_last(g.pos.detach())
        neg = None if g.neg is None else _unit_last(g.neg.detach())
        xs.append(x), poss.append(pos), negs.append(neg)
        lead = tuple(x.shape[:-2])
        n_probs = math.prod(lead)
        parts, per_problem = [], False
        for w, k, width in zip(g.weights, (n, m, p), (NX, MX, PX)):
            if w is None:
                w = torch.ones((1, k), dtype=torch.float32, device=dev)
            elif all(s == 1 for s in w.shape[:-1]):
                w = w.reshape(1, -1).expand(1, k)
            else:
                per_problem = True
                w = torch.broadcast_to(w, lead + (w.shape[-1],)).reshape(n_probs, -1).expand(n_probs, k)
            parts.append(torch.nn.functional.pad(w, (0, width - k)))  # zero weight on padding
        if per_problem:
            parts = [a.expand(n_probs, a.shape[-1]) for a in parts]
        rows = torch.cat(parts, dim=-1)  # [1 or problems, JW]
        base = sum(r.shape[0] for r in w_rows)
        rows_of_group.append(base + (np.arange(n_probs) if per_problem else np.zeros(n_probs, np.int64)))
        w_rows.append(rows)
    w_tab = torch.cat(w_rows)  # [R, JW]

    # Problem table, largest widths first (programs then finish together).
    order = sorted(range(G), key=lambda k: -xs[k].shape[-1])
    tab_parts, mu_total = [], 0
    widths = np.array([x.shape[-1] for x in xs], dtype=np.int64)
    for k in order:
        x, pos, neg, grad = xs[k], poss[k], negs[k], grads[k]
        c = x.shape[-1]
        offs = _problem_offsets(x)
        lp = offs.shape[0]
        t = np.empty((lp, K.FIELDS), dtype=np.int64)
        t[:, K.F_X] = x.data_ptr() + 4 * offs
        t[:, K.F_POS] = pos.data_ptr() + 4 * _problem_offsets(pos)
        q = x if neg is None else neg  # any valid address: the kernels read no rows of it when M = 0
        t[:, K.F_NEG] = q.data_ptr() + 4 * _problem_offsets(q)
        t[:, K.F_GRAD] = grad.data_ptr() + 4 * np.arange(lp, dtype=np.int64) * (n * c)
        t[:, K.F_SX] = x.stride(-2)
        t[:, K.F_SPOS] = pos.stride(-2)
        t[:, K.F_SNEG] = x.stride(-2) if neg is None else neg.stride(-2)
        t[:, K.F_C] = c
        t[:, K.F_GROUP] = k
        t[:, K.F_WROW] = rows_of_group[k]
        t[:, K.F_MU] = mu_total + np.arange(lp, dtype=np.int64) * c
        mu_total += lp * c
        tab_parts.append(t)
    tab_np = np.concatenate(tab_parts)
    n_probs_total = tab_np.shape[0]
    work_np = _work_items(tab_np[:, K.F_C], TILING.work_channels)
    work_group_np = tab_np[work_np[:, 0], K.F_GROUP]
    tab = torch.from_numpy(tab_np).to(dev)
    work = torch.from_numpy(work_np).to(dev)
    prob_group = tab[:, K.F_GROUP]
    work_group = torch.from_numpy(work_group_np).to(dev)

    d = torch.empty((n_probs_total, NX, JW), dtype=torch.float32, device=dev)
    mu = torch.empty((mu_total,), dtype=torch.float32, device=dev)
    spart = torch.empty((n_probs_total,), dtype=torch.float32, device=dev)
    prec, tiling = PRECISION, TILING
    _launch(K.distances_kernel, n_probs_total, (tab, w_tab, d, mu, spart, n, m, p),
            dict(NX=NX, MX=MX, PX=PX, HAS_NEG=m > 0, BC=tiling.channels_step, PREC=prec.distances,
                 WHILE=K.INTERPRETED,
                 num_warps=tiling.warps))

    # S per group: weighted mean distance over its problems, rows and columns (docs/design.md §2 step 2).
    lp_group = torch.tensor([math.prod(x.shape[:-2]) for x in xs], dtype=torch.float32, device=dev)
    width = torch.from_numpy(widths.astype(np.float32)).to(dev)
    den = torch.zeros(G, dtype=torch.float32, device=dev).index_add_(
        0, prob_group, n * w_tab.sum(dim=1)[tab[:, K.F_WROW]])
    num = torch.zeros(G, dtype=torch.float32, device=dev).index_add_(0, prob_group, spart)
    scale = num / den.clamp(min=1e-30)
    unit = scale.clamp(min=SCALE_FLOOR)
    s = (scale / width.sqrt()).clamp(min=SCALE_FLOOR)
    count = lp_group * n * width  # entries of x per group
    rates = torch.tensor([0.5 / t for t in opts.taus], dtype=torch.float32, device=dev)
    floor_sqrt = math.sqrt(opts.affinity_floor)
    common = dict(T=T, NX=NX, MX=MX, PX=PX, HAS_NEG=m > 0, BC=tiling.channels_step,
                  HAS_FLOOR=opts.affinity_floor > 0,
                  WHILE=K.INTERPRETED, num_warps=tiling.warps)

    # lambda_tau per group: RMS of F_tau / s over its problems, rows and channels (step 4).
    fpart = torch.empty((work.shape[0], T), dtype=torch.float32, device=dev)
    shared = (tab, work, w_tab, d, mu, unit, rates)
    _launch(K.drift_kernel, work.shape[0], (*shared, rates, s, fpart, n, m, p, floor_sqrt),
            dict(PREC=prec.lam, FINAL=False, **common))
    ms = torch.zeros((G, T), dtype=torch.float32, device=dev).index_add_(0, work_group, fpart)
    ms = ms / (s * s * count)[:, None]
    tcoef = 1.0 / (s[:, None] * ms.clamp(min=RMS_FLOOR_SQ).sqrt())  # [G, T]: 1 / (s lambda_tau)

    # V, the gradient and the loss. mean: each group's loss is mean(V^2) over its entries;
    # sum: the sum over its problems of mean(V^2) over [N, D].
    per_entry = 1.0 / (count if reduction == "mean" else n * width)  # [G]
    gcoef = -2.0 * per_entry / s
    vpart = torch.empty((work.shape[0],), dtype=torch.float32, device=dev)
    _launch(K.drift_kernel, work.shape[0], (*shared, tcoef, gcoef, vpart, n, m, p, floor_sqrt),
            dict(PREC=prec.drift, FINAL=True, **common))
    return torch.sum(vpart * per_entry[work_group])


# (kernel, launch constants, requested stages) -> the pipelining depth that fit this device.
_STAGES: dict[tuple[Any, ...], int] = {}


def _launch(kernel: Any, programs: int, args: tuple[Any, ...], consts: dict[str, Any]) -> None:
    """kernel[(programs,)](*args, **consts), lowering num_stages until its shared memory fits."""
    from triton.runtime.errors import OutOfResources

    key = (kernel, tuple(sorted(consts.items())), TILING.stages)
    stages = _STAGES.get(key, TILING.stages)
    while True:
        try:
            kernel[(programs,)](*args, **consts, num_stages=stages)
        except OutOfResources:
            if stages <= 1:
                raise
            stages -= 1
            continue
        _STAGES[key] = stages
        return


def _work_items(widths: np.ndarray, chunk: int) -> np.ndarray:
    """[items, 3] int64 rows (problem, first channel, end channel), chunks of <= chunk channels."""
    per = -(-widths // chunk)
    prob = np.repeat(np.arange(widths.shape[0], dtype=np.int64), per)
    first = np.arange(prob.shape[0], dtype=np.int64) - np.repeat(np.cumsum(per) - per, per)
    lo = first * chunk
    hi = np.minimum(lo + chunk, widths[prob])
    return np.stack([prob, lo, hi], axis=1)
