"""Public entry points: drifting_loss and drift_field."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from driftloss._arrays import (
    check_real_floating,
    check_same_device,
    compute_dtype,
    from_python,
    resolve_namespace,
)
from driftloss._backends import backend_for
from driftloss._drift import DriftOptions, compute_drift
from driftloss._validation import ValueChecks, as_taus, check_options, check_points, check_weight

DEFAULT_TAUS = (0.02, 0.05, 0.2)


def drifting_loss(
    x: Any,
    pos: Any,
    neg: Any = None,
    taus: float | Sequence[float] = DEFAULT_TAUS,
    *,
    x_weight: Any = None,
    pos_weight: Any = None,
    neg_weight: Any = None,
    x_as_negatives: bool = True,
    normalize: bool = True,
    kernel: str = "both",
    affinity_floor: float = 0.0,
    attraction: float = 1.0,
    repulsion: float = 1.0,
    reduction: str = "mean",
    return_stats: bool = False,
    cross_replica_sum: Any = None,
    problem_dims: int | None = None,
    xp: Any = None,
) -> Any:
    """The drifting loss (Deng et al. 2026, Eq. 6 with the field of Eq. 8-11, Alg. 2, A.6).

    Each generated sample is pulled toward nearby positives and pushed away from nearby
    negatives by the kernel mean-shift field V; the loss regresses x onto the stop-gradient
    target x/s + V, so that d loss / d x = -2 V / (s * x.size) with reduction="mean".

    Args:
      x:   [N, D] generated samples (or features of them), each a flat D-vector (flatten images:
           x.reshape(N, -1)), or [G, N, D] for G independent problems, or [..., N, D] with
           ``problem_dims``; carries the gradient. They are also negatives, each excluding
           itself, unless x_as_negatives=False.
      pos: [..., P, D] positives (real data); [P, D] (or any leading dims that broadcast to x's)
           is shared by every problem of x, without a copy.
      neg: [..., M, D] extra negatives (e.g. unconditional real samples for guidance, §3.5) or None;
           broadcast like pos.
      taus: temperature or temperatures; each tau's drift is scaled to unit RMS and summed (A.6).
      x_weight, pos_weight, neg_weight: [..., N] / [..., P] / [..., M] non-negative column
           weights (default 1), or boolean masks (read as 0/1); leading dims may broadcast. Every
           problem needs a positive pos_weight somewhere (else its loss would be identically 0).
           See ``cfg_weight`` for guidance.
      x_as_negatives: use x as negatives (default). False: the negatives are exactly ``neg``.
      normalize: scale features so the mean distance is sqrt(D) and each tau's drift to unit RMS
           (A.6). False: raw Alg. 2 on raw coordinates with the given tau.
      kernel: "both" (softmax over y and over x, default), "y" (over y only) or "none" (Table 11).
      affinity_floor: 0 (exact). 1e-6 reproduces the authors' released implementation.
      attraction, repulsion: V = attraction * V+ - repulsion * V- (Table 1); 1 and 1 keep V
           anti-symmetric.
      reduction: "mean" -> scalar; "sum" -> sum over problems; "none" -> per-problem loss [...].
      return_stats: also return a dict of diagnostics (arrays, no gradient):
           scale S (0-d), feature_scale s (0-d), drift_rms [T] (lambda_tau, the RMS of each
           tau's drift before normalization; the normalization divides by max(lambda_tau, 1e-4),
           sqrt(max(mean F^2, 1e-8)), so a tau whose drift_rms is below 1e-4 counts less than
           unit RMS: far from the data, and from a collapsed start, where it can rise before it
           falls), neighbours [T] (exp of the kernel-weight entropy per row, averaged: the
           effective number of neighbours), energy_distance (0-d: the progress statistic, the
           energy distance 2 E|x - pos| - E|x - x'| - E|pos - pos'| between x and pos weighted by
           x_weight and pos_weight, per problem, averaged, in units of max(S, 1e-3) (raw units
           with normalize=False); >= 0, falls as the samples approach the data from any start,
           about 1/N + 1/P for a perfect generator; driftloss/_progress.py). The loss itself
           stays near its value by design (mean(V^2): T to T^2 for T temperatures).
      cross_replica_sum: for data-parallel training, a function that sums a small array over all
           replicas (torch.distributed all_reduce, jax.lax.psum). S and lambda then come from the
           global batch, so R replicas that each hold some of the problems (leading dims)
           compute exactly the single-device loss; averaging gradients over replicas (DDP) then
           gives the single-device gradient. With torch.distributed initialized the torch path
           does this automatically (pass ``lambda a: a`` to keep statistics local);
           ``driftloss.adapters.jax.drifting_loss(..., axis_name=...)`` does it under
           shard_map/pmap.
      problem_dims: the number of leading dims of x that index independent problems; needed
           when x, pos or neg has 4 or more dims (e.g. 2 for [G, L, N, C]), so that a batch of
           images [N, C, H, W] is refused instead of read as N*C problems. None (default): x is
           [N, D] or [G, N, D].
      xp: Array API namespace; inferred from the inputs when None.

    Leading dims ``...`` index independent kernel problems that share S and lambda (docs/design.md §2).
    Computation is in float32 (float64 if any input is float64); half-precision inputs are
    upcast and the loss is returned in float32. Python lists and numbers are accepted as arrays
    (of the other inputs' library, NumPy when all are lists), numbers as floating point.

    Bad input raises ValueError or TypeError naming the argument. On eager calls the values are
    checked too, in one read of the device: NaN or inf in x, pos or neg, negative or non-finite
    weights, a problem whose pos_weight is all zero. Under jit, torch.compile, vmap or CUDA-graph
    capture values cannot be read and are not checked: non-finite input then gives a NaN loss.

    Returns the loss (0-d, or [...] with reduction="none"), and the stats dict if asked.
    """
    fn = "drifting_loss"
    check_options(fn, kernel=kernel, reduction=reduction, affinity_floor=affinity_floor,
                  attraction=attraction, repulsion=repulsion)
    opts = DriftOptions(taus=as_taus(fn, taus), x_as_negatives=x_as_negatives, normalize=normalize,
                        kernel=kernel, affinity_floor=affinity_floor, attraction=attraction,
                        repulsion=repulsion, with_stats=return_stats, cross_replica_sum=cross_replica_sum)
    xp, be, opts, (x, pos, neg), weights = _validated(fn, x, pos, neg, x_weight, pos_weight, neg_weight, opts,
                                                      xp, problem_dims=problem_dims)
    if be.fused_loss is not None:  # one fused evaluation of loss and gradient (opt-in, torch CUDA)
        loss = be.fused_loss([(x, pos, neg, weights)], opts, reduction)
        if loss is not None:
            return loss
    loss, stats = loss_of_checked(x, pos, neg, weights, opts, reduction, xp, be)
    return (loss, stats) if return_stats else loss


def loss_of_checked(x, pos, neg, weights, opts, reduction, xp, be, after=None):
    """(loss, stats) of one validated call through the drift hooks; weights (x_w, neg_w, pos_w).
    ``after``: as ``compute_drift``'s."""
    x_weight, neg_weight, pos_weight = weights
    xq, v, s, stats = _drift_of(x, pos, neg, x_weight, pos_weight, neg_weight, opts, xp, be, after)
    return regression_loss(xq, v, s, reduction, xp, be), {k: be.as_array(a) for k, a in stats.items()}


def regression_loss(xq: Any, v: Any, s: Any, reduction: str, xp: Any, be: Any) -> Any:
    """The loss of docs/design.md §2 step 5: mean over [..., N, D] of (x/s - stop_gradient(x/s + V))^2 per
    problem, reduced by ``reduction``. xq [..., N, D] in the compute dtype carries the gradient."""
    if be.regression_loss is not None:  # torch: one autograd function (adapters/torch_regression.py)
        return reduce_problems(be.regression_loss(xq, v, s), reduction, xp, be)
    # Three x-sized temporaries at most, two after the subtraction: the target is not named, and x/s is
    # dropped once diff exists (autodiff keeps only s for the division). On b2-class's largest feature
    # map (0.5 GiB of x), the peak of torch's step on the GPU plan was these temporaries.
    scaled = xq / s
    diff = scaled - be.stop_gradient(scaled + v)
    del scaled
    return reduce_problems(xp.mean(diff * diff, axis=(-2, -1)), reduction, xp, be)


def reduce_problems(per_problem: Any, reduction: str, xp: Any, be: Any) -> Any:
    """Per-problem losses [...] -> their mean (0-d), sum (0-d) or themselves ("none")."""
    if reduction == "mean":
        return be.as_array(xp.mean(per_problem))
    if reduction == "sum":
        return be.as_array(xp.sum(per_problem))
    return be.as_array(per_problem)


def drift_field(
    x: Any,
    pos: Any,
    neg: Any = None,
    tau: float | Sequence[float] = 0.05,
    *,
    x_weight: Any = None,
    pos_weight: Any = None,
    neg_weight: Any = None,
    x_as_negatives: bool = True,
    normalize: bool = False,
    kernel: str = "both",
    affinity_floor: float = 0.0,
    attraction: float = 1.0,
    repulsion: float = 1.0,
    return_stats: bool = False,
    cross_replica_sum: Any = None,
    problem_dims: int | None = None,
    xp: Any = None,
) -> Any:
    """The drift V [..., N, D] of each generated sample (Alg. 2; Eq. 8-11), without gradient.

    Same arguments and checks as ``drifting_loss`` (x [N, D], [G, N, D], or [..., N, D] with
    ``problem_dims``; pos and neg broadcast over x's problems). With normalize=False (default) V is Alg. 2's
    W+ y+ - W- y- on raw coordinates, summed over the given temperature(s). With normalize=True
    V is the normalized drift the loss uses, in units of the feature scale s
    (stats["feature_scale"]): d drifting_loss / d x = -2 V / (s * x.size).
    With x_as_negatives=False the negatives are exactly ``neg``, and V(x; p, q) = -V(x; q, p).
    Returned in the compute dtype (float32, or float64 for float64 input).
    """
    fn = "drift_field"
    check_options(fn, kernel=kernel, reduction=None, affinity_floor=affinity_floor,
                  attraction=attraction, repulsion=repulsion)
    opts = DriftOptions(taus=as_taus(fn, tau), x_as_negatives=x_as_negatives, normalize=normalize,
                        kernel=kernel, affinity_floor=affinity_floor, attraction=attraction,
                        repulsion=repulsion, with_stats=return_stats, cross_replica_sum=cross_replica_sum)
    xp, be, opts, (x, pos, neg), (x_w, neg_w, pos_w) = _validated(
        fn, x, pos, neg, x_weight, pos_weight, neg_weight, opts, xp, problem_dims=problem_dims)
    _, v, _, stats = _drift_of(x, pos, neg, x_w, pos_w, neg_w, opts, xp, be)
    return (v, {k: be.as_array(a) for k, a in stats.items()}) if return_stats else v


def _validated(fn, x, pos, neg, x_weight, pos_weight, neg_weight, opts, xp, *, problem_dims=None,
               checks=None, weight_values=True):
    """Check the inputs of one call.

    Returns (xp, backend, opts with the default replica sum, (x, pos, neg), (x_w, neg_w, pos_w)):
    Python lists and numbers converted to arrays, pos and neg broadcast over x's leading dims
    (views), boolean weights cast to 0/1. Values (finite points, non-negative weights, a positive
    weight in every problem) are checked where they can be read, in one host read: here, or, when
    ``checks`` (a ``ValueChecks``) is given, by the caller, which adds more calls' checks to it first.
    weight_values=False skips the weights' values, for a caller that has checked the same weights.
    """
    arrays = {"x": x, "pos": pos, "neg": neg, "x_weight": x_weight, "pos_weight": pos_weight,
              "neg_weight": neg_weight}
    xp = resolve_namespace(fn, arrays, xp)
    be = backend_for(xp)
    arrays = from_python(arrays, ("x", "pos", "neg"), xp, be.device)
    check_same_device(fn, arrays, be.device)
    x, pos, neg = arrays["x"], arrays["pos"], arrays["neg"]
    check_real_floating(fn, xp, {"x": x, "pos": pos, "neg": neg})
    check_points(fn, x, pos, neg, x_as_negatives=opts.x_as_negatives, problem_dims=problem_dims)
    given = (x, pos, neg)
    pos, neg = (None if a is None else _over_problems(a, x, xp) for a in (pos, neg))
    x_weight, pos_weight, neg_weight = (
        check_weight(fn, name, arrays[name], pts, pts_name, xp)
        for name, pts, pts_name in (("x_weight", x, "x"), ("pos_weight", pos, "pos"),
                                    ("neg_weight", neg, "neg")))
    read_here = checks is None
    if read_here:
        checks = ValueChecks(xp, be.is_concrete)
    for name, a in zip(("x", "pos", "neg"), given):
        checks.finite(fn, name, a)
    if weight_values:
        for name, w in (("x_weight", x_weight), ("pos_weight", pos_weight), ("neg_weight", neg_weight)):
            checks.non_negative(fn, name, w)
        checks.some_positive(fn, "pos_weight", pos_weight, "pos")
    if read_here:
        checks.raise_if_failed()
    if opts.cross_replica_sum is None:
        opts = dataclasses.replace(opts, cross_replica_sum=be.default_replica_sum())
    return xp, be, opts, (x, pos, neg), (x_weight, neg_weight, pos_weight)


def _over_problems(a, x, xp):
    """pos or neg [..., n, D] broadcast over x's leading problem dims (a view; ``a`` if they match)."""
    shape = (*x.shape[:-2], *a.shape[-2:])
    return a if tuple(a.shape) == shape else xp.broadcast_to(a, shape)


def _drift_of(x, pos, neg, x_weight, pos_weight, neg_weight, opts, xp, be, after=None):
    """(x in compute dtype with gradient, V, s, stats) of validated inputs; ``after`` as
    ``compute_drift``'s."""
    cd = compute_dtype(xp, [x, pos, neg])
    matmul = be.matmul or xp.matmul
    xq = xp.astype(x, cd, copy=False)
    with be.field_context(x):
        xs, ps = (be.stop_gradient(xp.astype(a, cd, copy=False)) for a in (x, pos))
        ns = None if neg is None else be.stop_gradient(xp.astype(neg, cd, copy=False))
        weights = tuple(
            None if pts is None else full_weight(w, pts, cd, xp, be)
            for w, pts in ((x_weight, x), (neg_weight, neg), (pos_weight, pos))
        )
        v, s, stats = compute_drift(xs, ps, ns, weights, opts, xp=xp, matmul=matmul, device=be.device,
                                    after=after)
    return xq, v, s, stats


def full_weight(w, points, dtype, xp, be):
    """Column weight broadcast to points.shape[:-1] in ``dtype``; ones when None."""
    shape = tuple(points.shape[:-1])
    if w is None:
        return xp.ones(shape, dtype=dtype, device=be.device(points))
    return xp.broadcast_to(be.stop_gradient(xp.astype(w, dtype)), shape)
