"""drifting_loss_groups: one drifting loss per feature group, summed (§3.4, A.5; DESIGN §4)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from array_api_compat import array_namespace

from driftloss._backends import backend_for
from driftloss._drift import DriftOptions
from driftloss._loss import DEFAULT_TAUS, _validated, drifting_loss
from driftloss._validation import REDUCTIONS, as_taus, check_options

# drifting_loss options the fused path reads (it declines values it does not support).
_FUSABLE_OPTIONS = frozenset({"normalize", "kernel", "affinity_floor", "attraction", "repulsion",
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
           (e.g. neg_weight [G, M] from ``cfg_weight``), shared by every group and broadcast
           over the L locations.
      reduction: "mean" (default): each group's loss is the mean over its problems (the
           leading dims x L) and the total is their sum over groups. "sum": sum over problems
           and groups. "none": [...] (e.g. [G], one loss per class): each group's loss averaged
           over its L locations, summed over groups; its mean equals the "mean" total.
      return_stats: also return {group name: stats}, each the ``drifting_loss`` stats dict
           (scale, feature_scale, drift_rms [T], neighbours [T]) plus "loss", the group's own
           (reduced) loss without gradient, for logging.
      cross_replica_sum: as in ``drifting_loss``; S and lambda of each group are then global.
      xp: Array API namespace; inferred from the arrays when None.
      **loss_options: further keyword options of ``drifting_loss`` (normalize, kernel,
           affinity_floor, attraction, repulsion, x_as_negatives).

    Within a group, the leading dims and the L locations are the independent kernel problems of
    one ``drifting_loss`` call on [..., L, N, C]: they share the group's S and lambda, and each
    location has its own kernel over the N (+ M + P) samples at that location.

    Returns the total loss (0-d, or [...] with reduction="none"), and the stats if asked.
    """
    fn = "drifting_loss_groups"
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {REDUCTIONS}; got {reduction!r}")
    names = _check_groups(fn, gen, pos, neg)
    if xp is None:
        xp = array_namespace(*_all_arrays(gen, pos, neg))
    weights = {k: None if w is None else xp.expand_dims(w, axis=-2)  # [..., n] -> [..., 1, n]
               for k, w in (("x_weight", x_weight), ("pos_weight", pos_weight), ("neg_weight", neg_weight))}

    fused = _fused_total(names, gen, pos, neg, taus, weights, reduction, return_stats, cross_replica_sum,
                         loss_options, xp)
    if fused is not None:
        return fused
    total, stats = None, {}
    for name in names:
        x, p = _locations_first(gen[name], xp), _locations_first(pos[name], xp)
        q = None if neg is None else _locations_first(neg[name], xp)
        try:
            out = drifting_loss(x, p, q, taus, **weights, reduction=reduction, return_stats=return_stats,
                                cross_replica_sum=cross_replica_sum, xp=xp, **loss_options)
        except (ValueError, TypeError) as e:
            if type(e) not in (ValueError, TypeError):  # framework errors (e.g. tracer errors) as they are
                raise
            raise type(e)(f"{fn}: group {name!r}: {e}") from e
        loss, group_stats = out if return_stats else (out, None)
        if reduction == "none":
            loss = xp.mean(loss, axis=-1)  # [..., L] -> [...]
        total = loss if total is None else total + loss
        if return_stats:
            stats[name] = {**group_stats, "loss": _detached(loss, xp)}
    total = backend_for(xp).as_array(total)  # NumPy reductions give scalars
    return (total, stats) if return_stats else total


def _fused_total(names, gen, pos, neg, taus, weights, reduction, return_stats, cross_replica_sum,
                 loss_options, xp):
    """Every group in one fused evaluation where the backend has one (torch on CUDA), else None."""
    be = backend_for(xp)
    if be.fused_loss is None or return_stats or reduction == "none":
        return None
    try:
        opts = DriftOptions(taus=as_taus("drifting_loss", taus), cross_replica_sum=cross_replica_sum,
                            **{k: v for k, v in loss_options.items() if k in _FUSABLE_OPTIONS})
        if set(loss_options) - _FUSABLE_OPTIONS:
            return None
        check_options("drifting_loss", kernel=opts.kernel, reduction=reduction,
                      affinity_floor=opts.affinity_floor, attraction=opts.attraction,
                      repulsion=opts.repulsion)
        calls = []
        for name in names:
            x, p = _locations_first(gen[name], xp), _locations_first(pos[name], xp)
            q = None if neg is None else _locations_first(neg[name], xp)
            _, _, opts_g = _validated("drifting_loss", x, p, q, weights["x_weight"], weights["pos_weight"],
                                      weights["neg_weight"], opts, xp)
            calls.append((x, p, q, (weights["x_weight"], weights["neg_weight"], weights["pos_weight"])))
    except (ValueError, TypeError):
        return None  # the per-group path reports the error with the group's name
    return be.fused_loss(calls, opts_g, reduction)


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
