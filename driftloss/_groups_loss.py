"""drifting_loss_groups: one drifting loss per feature group, summed (§3.4, A.5; docs/design.md §4)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from array_api_compat import array_namespace

from driftloss._arrays import compute_dtype, from_python
from driftloss._backends import backend_for
from driftloss._drift import DriftOptions
from driftloss._loss import (
    DEFAULT_TAUS,
    _validated,
    full_weight,
    loss_of_checked,
    reduce_problems,
    regression_loss,
)
from driftloss._validation import REDUCTIONS, ValueChecks, as_taus, check_options

# The drifting_loss keyword options that drifting_loss_groups passes through.
_LOSS_OPTIONS = frozenset({"normalize", "kernel", "affinity_floor", "attraction", "repulsion",
                           "x_as_negatives"})


def drifting_loss_groups(
    gen: Mapping[str, Any],
    pos: Mapping[str, Any],
    neg: Mapping[str, Any] | None = None,
    taus: float | Sequence[float] = DEFAULT_TAUS,
    *,
    x_weight: Any = None,
    pos_weight: Any = None,
    neg_weight: Any = None,
    reduction: str = "mean",
    return_stats: bool = False,
    cross_replica_sum: Any = None,
    xp: Any = None,
    **loss_options: Any,
) -> Any:
    """The feature-space drifting loss: the sum over groups of one ``drifting_loss`` per group.

    Args:
      gen: group name -> [..., N, L, C] features of the generated samples (carry the gradient).
           Typically [G, N, L, C]: G independent problems (e.g. classes), N samples, L vectors
           per sample (locations or patches of a feature map), C channels. ``feature_groups``
           gives [n, L, C] per map; reshape n = G*N to [G, N, L, C].
      pos: group name -> [..., P, L, C] features of the positives, same names as ``gen``.
      neg: group name -> [..., M, L, C] extra negatives (e.g. unconditional real samples for
           guidance) or None.
      taus: temperatures, as in ``drifting_loss``.
      x_weight, pos_weight, neg_weight: column weights [..., N] / [..., P] / [..., M]
           (e.g. neg_weight [G, M] from ``cfg_weight``), or boolean masks (0/1), shared by every
           group and broadcast over the L locations.
      reduction: "mean" (default): each group's loss is the mean over its problems (the
           leading dims x L) and the total is their sum over groups. "sum": sum over problems
           and groups. "none": [...] (e.g. [G], one loss per class): each group's loss averaged
           over its L locations, summed over groups; its mean equals the "mean" total.
      return_stats: also return {group name: stats}, each the ``drifting_loss`` stats dict
           (scale, feature_scale, drift_rms [T], neighbours [T], energy_distance: the group's
           progress statistic) plus "loss", the group's own (reduced) loss without gradient,
           for logging.
      cross_replica_sum: as in ``drifting_loss``; S and lambda of each group are then global.
      xp: Array API namespace; inferred from the arrays when None.
      **loss_options: further keyword options of ``drifting_loss`` (normalize, kernel,
           affinity_floor, attraction, repulsion, x_as_negatives).

    Within a group, the leading dims and the L locations are the independent kernel problems of
    one ``drifting_loss`` call on [..., L, N, C]: they share the group's S and lambda, and each
    location has its own kernel over the N (+ M + P) samples at that location.

    Groups of one shape (those of one feature map: same leading dims, n and C) are evaluated
    together on JAX and on torch accelerators: their locations are stacked into one blocked
    evaluation in which each group keeps its own S and lambda, with the same result as separate
    calls and a fraction of the array operations (on a GPU, kernel launches).
    On CUDA with the opt-in fused kernels switched on, shapes they take go to them first
    (``driftloss.adapters.torch_fused.use_fused_kernels``).

    Errors name the group. On eager calls the values of all groups are checked in one read of the
    device, as in ``drifting_loss`` (NaN or inf features, negative weights, a problem without a
    positive pos_weight); under jit, torch.compile or vmap they are not (non-finite features then
    give a NaN loss).

    Returns the total loss (0-d, or [...] with reduction="none"), and the stats if asked.
    """
    fn = "drifting_loss_groups"
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {REDUCTIONS}; got {reduction!r}")
    names = _check_groups(fn, gen, pos, neg)
    if xp is None:
        xp = array_namespace(*_all_arrays(gen, pos, neg))
    given = from_python({"x": gen[names[0]], "x_weight": x_weight, "neg_weight": neg_weight,
                         "pos_weight": pos_weight}, ("x",), xp, backend_for(xp).device)  # Python lists
    weights = tuple(None if w is None else xp.expand_dims(w, axis=-2)  # [..., n] -> [..., 1, n]
                    for w in (given["x_weight"], given["neg_weight"], given["pos_weight"]))
    opts = _options(fn, taus, return_stats, cross_replica_sum, loss_options)
    calls, be, opts = _validated_calls(fn, names, gen, pos, neg, weights, opts, xp)

    if be.fused_loss is not None and not return_stats and reduction != "none":
        total = be.fused_loss(calls, opts, reduction)  # all groups in one fused evaluation (opt-in, CUDA)
        if total is not None:
            return total
    if not return_stats:
        return be.as_array(_summed_loss(calls, opts, reduction, xp, be))  # NumPy reductions give scalars
    total, stats = None, {}
    for name, (loss, group_stats) in zip(names, _shared_losses(calls, opts, reduction, xp, be)):
        loss = _group_term(loss, reduction, xp)
        total = loss if total is None else total + loss
        stats[name] = {**group_stats, "loss": _detached(loss, xp)}
    return be.as_array(total), stats


def _options(fn, taus, return_stats, cross_replica_sum, loss_options) -> DriftOptions:
    """The DriftOptions of every group's call, checked once."""
    unknown = sorted(set(loss_options) - _LOSS_OPTIONS)
    if unknown:
        raise TypeError(f"{fn}: unknown option(s) {unknown}; the drifting_loss options it takes are "
                        f"{sorted(_LOSS_OPTIONS)}")
    opts = DriftOptions(taus=as_taus(fn, taus), with_stats=return_stats, cross_replica_sum=cross_replica_sum,
                        **loss_options)
    check_options(fn, kernel=opts.kernel, reduction=None, affinity_floor=opts.affinity_floor,
                  attraction=opts.attraction, repulsion=opts.repulsion)
    return opts


def _validated_calls(fn, names, gen, pos, neg, weights, opts, xp):
    """Each group as a checked ``drifting_loss`` call (x, pos, neg, (x_w, neg_w, pos_w)) on
    [..., L, n, C] views; errors name the group. The values of all groups (finite points; the
    weights' signs, once: they are the same arrays in every group) are read in one host read.
    Returns (calls, backend, options)."""
    x_w, neg_w, pos_w = weights
    calls = []
    checks = ValueChecks(xp, backend_for(xp).is_concrete)
    for k, name in enumerate(names):
        x, p = _locations_first(gen[name], xp), _locations_first(pos[name], xp)
        q = None if neg is None else _locations_first(neg[name], xp)
        checks.label = f"{fn}: group {name!r}: "
        try:
            _, be, group_opts, points, group_weights = _validated(
                "drifting_loss", x, p, q, x_w, pos_w, neg_w, opts, xp, problem_dims=x.ndim - 2, checks=checks,
                weight_values=k == 0)
        except (ValueError, TypeError) as e:
            if type(e) not in (ValueError, TypeError):  # framework errors (e.g. tracer errors) as they are
                raise
            raise type(e)(f"{fn}: group {name!r}: {e}") from e
        calls.append((*points, group_weights))
    checks.raise_if_failed()
    return calls, be, group_opts


def _group_term(loss: Any, reduction: str, xp: Any) -> Any:
    """A group's term of the total: its loss, averaged over its L locations for reduction="none"."""
    return xp.mean(loss, axis=-1) if reduction == "none" else loss  # [..., L] -> [...]


def _buckets(calls, xp, be) -> list[list[int]]:
    """Indices of the calls of one shape (the groups of a feature map: same leading dims, n, C, P,
    M, dtype and device), bucket by bucket in order of first appearance."""
    buckets: dict[tuple, list[int]] = {}
    for i, (x, p, q, _) in enumerate(calls):
        key = (tuple(x.shape[:-3]), tuple(x.shape[-2:]), p.shape[-2], None if q is None else q.shape[-2],
               compute_dtype(xp, [x, p, q]), be.device(x))
        buckets.setdefault(key, []).append(i)
    return list(buckets.values())


def _stacking_runs(idx: list[int], calls, limit: int | None) -> list[list[int]]:
    """A bucket's calls in consecutive runs whose points (x, pos, neg) hold at most ``limit`` entries
    together (a call above it: a run of its own); None: one run."""
    if limit is None:
        return [idx]
    runs, run, size = [], [], 0
    for i in idx:
        n = sum(math.prod(a.shape) for a in calls[i][:3] if a is not None)
        if run and size + n > limit:
            runs.append(run)
            run, size = [], 0
        run.append(i)
        size += n
    return runs + [run]


def _evaluated_buckets(calls, opts, reduction, xp, be):
    """(indices, shared, results) per run of calls of one shape, in runs of at most
    ``Backend.stack_elements`` stacked points. shared: the run's ``_stacked_drift`` where the backend
    has a fast drift and shares groups (``Backend.share_groups``: the groups of a feature map share
    one evaluation), with results None; else None, with results the (loss, stats) of each call
    evaluated on its own. Each evaluation waits for the losses of the one before (``Backend.after``),
    so that a compiler (XLA) does not run them side by side, holding all their temporaries at once."""
    previous = None
    for bucket in _buckets(calls, xp, be):
        for idx in _stacking_runs(bucket, calls, be.stack_elements):
            group = [calls[i] for i in idx]
            shared = _stacked_drift(group, opts, xp, be, previous) if len(idx) > 1 else None
            results = None
            if shared is None:
                results = []
                for c in group:
                    results.append(loss_of_checked(*c, opts, reduction, xp, be, after=previous))
                    previous = results[-1][0]
            else:
                previous = shared[0]
            yield idx, shared, results


def _shared_losses(calls, opts, reduction, xp, be):
    """[(loss, stats)] per call, the buckets of ``_evaluated_buckets`` sliced back into their calls."""
    out = [None] * len(calls)
    for idx, shared, results in _evaluated_buckets(calls, opts, reduction, xp, be):
        if shared is not None:
            per_problem, sizes, stats = shared
            results, start = [], 0
            for g, size in enumerate(sizes):
                loss = reduce_problems(per_problem[..., start:start + size], reduction, xp, be)
                start += size
                results.append((loss, {k: be.as_array(a[g, ...]) for k, a in stats.items()}))
        for i, result in zip(idx, results):
            out[i] = result
    return out


def _summed_loss(calls, opts, reduction, xp, be):
    """The total of ``drifting_loss_groups`` (no stats): as the sum of ``_shared_losses``, but a
    bucket that shares one evaluation gives its whole term in one weighted sum over its problems
    instead of one slice and one reduction per group (on a GPU, each a kernel launch, forward and
    backward)."""
    total = None
    for _, shared, results in _evaluated_buckets(calls, opts, reduction, xp, be):
        if shared is None:
            terms = [_group_term(loss, reduction, xp) for loss, _ in results]
        else:
            per_problem, sizes, _ = shared  # [..., sum L]
            if reduction == "sum":
                terms = [xp.sum(per_problem)]
            else:  # each group's mean over its locations (and, for "mean", over the leading dims)
                inv_size = be.constant(xp, [1.0 / size for size in sizes for _ in range(size)],
                                       per_problem.dtype, be.device(per_problem))
                per_lead = xp.sum(per_problem * inv_size, axis=-1)  # [...]
                terms = [per_lead if reduction == "none" else xp.mean(per_lead)]
        for term in terms:
            total = term if total is None else total + term
    return total


def _stacked_drift(calls, opts, xp, be, after=None):
    """(per-problem losses [..., sum L], the calls' L, stats with a leading [calls] axis) of calls of
    one shape [..., L_g, n, C] that share their weights, from one ``compute_drift`` over their
    problems stacked along the location axis [..., sum L_g, n, C]: each call is a segment with its
    own S, s and lambda (``_fast_drift.fast_drift``), and one regression gives every problem's loss.
    None where the backend has no fast drift, does not share groups on this device, or declines.
    ``after``: arrays the stacked copies wait for (``Backend.after``), or None."""
    x0, p0, q0, shared_weights = calls[0]
    if be.compute_drift is None or not be.share_groups(x0):
        return None
    cd = compute_dtype(xp, [x0, p0, q0])
    sizes = [c[0].shape[-3] for c in calls]
    run_of_location = [g for g, size in enumerate(sizes) for _ in range(size)]

    def stacked(i):  # the calls' i-th points along the location axis, copied after ``after``
        if calls[0][i] is None:
            return None
        parts = [xp.astype(c[i], cd, copy=False) for c in calls]
        if after is not None and be.after is not None:
            parts = [be.after(a, after) for a in parts]
        return xp.concat(parts, axis=-3)

    xq = stacked(0)  # carries the gradient back to each call's x
    with be.field_context(x0):
        xs, ps, ns = (None if a is None else be.stop_gradient(a) for a in (xq, stacked(1), stacked(2)))
        weights = tuple(None if pts is None else full_weight(w, pts, cd, xp, be)
                        for w, pts in zip(shared_weights, (xs, ns, ps)))  # (x_w, neg_w, pos_w)
        out = be.compute_drift(xs, ps, ns, weights, opts, xp=xp, matmul=be.matmul or xp.matmul,
                               device=be.device, segments=run_of_location * math.prod(x0.shape[:-3]))
    del xs, ps, ns, weights  # the stacked copies of pos and neg are not held through the regression
    if out is None:
        return None
    v, s, stats = out
    if opts.normalize:  # s [G] -> each location's [sum L, 1, 1]
        index = be.constant(xp, run_of_location, None, be.device(x0))
        s = xp.reshape(xp.take(s, index, axis=0), (-1, 1, 1))
    return regression_loss(xq, v, s, "none", xp, be), sizes, stats


def _check_groups(fn: str, gen: Any, pos: Any, neg: Any) -> list[str]:
    """Same group names in gen, pos (and neg); per group [..., n, L, C] with matching dims."""
    for arg, groups in (("gen", gen), ("pos", pos), ("neg", neg)):
        if groups is None and arg == "neg":
            continue
        if not isinstance(groups, Mapping):
            numbers = isinstance(groups, (int, float, tuple))
            hint = " (taus is the fourth argument: pass taus=...)" if numbers else ""
            raise TypeError(
                f"{fn}: {arg} must be a mapping group name -> array; got {type(groups).__name__}{hint}"
            )
        if not groups:
            raise ValueError(f"{fn}: {arg} is empty; give at least one feature group")
    names = list(gen)
    for arg, groups in (("pos", pos), ("neg", neg)):
        if groups is None:
            continue
        missing = [k for k in names if k not in groups]
        extra = [k for k in groups if k not in gen]
        if missing or extra:
            raise ValueError(
                f"{fn}: {arg} must have the same groups as gen; missing in {arg}: {missing}, "
                f"not in gen: {extra}"
            )
    for name in names:
        g = gen[name]
        for arg, groups in (("gen", gen), ("pos", pos), ("neg", neg)):
            if groups is None:
                continue
            a = groups[name]
            if a.ndim < 3:
                raise ValueError(
                    f"{fn}: group {name!r}: {arg} must have shape [..., n, L, C]; got {tuple(a.shape)}"
                )
            if arg != "gen" and (tuple(a.shape[:-3]) != tuple(g.shape[:-3])
                                 or tuple(a.shape[-2:]) != tuple(g.shape[-2:])):
                raise ValueError(
                    f"{fn}: group {name!r}: {arg} has shape {tuple(a.shape)} but gen has {tuple(g.shape)}; "
                    "the leading dims, L and C must match ([..., n, L, C])"
                )
    return names


def _all_arrays(*mappings: Any) -> list[Any]:
    return [a for m in mappings if m is not None for a in m.values()]


def _locations_first(a: Any, xp: Any) -> Any:
    """[..., n, L, C] -> [..., L, n, C] (a view where the library has views): each location
    becomes its own kernel problem."""
    nd = a.ndim
    return xp.permute_dims(a, (*range(nd - 3), nd - 2, nd - 3, nd - 1))


def _detached(a: Any, xp: Any) -> Any:
    """``a`` cut from the autodiff graph, for logging."""
    return backend_for(xp).stop_gradient(a)
