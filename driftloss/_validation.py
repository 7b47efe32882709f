"""Entry-point checks for the drifting loss: shapes, weights, temperatures, options."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

KERNELS = ("both", "y", "none")
REDUCTIONS = ("mean", "sum", "none")


def check_points(fn: str, x: Any, pos: Any, neg: Any, *, x_as_negatives: bool) -> None:
    """x [..., N, D], pos [..., P, D], neg [..., M, D] or None: same D, same leading dims."""
    named = {"x": x, "pos": pos, "neg": neg}
    for name, a in named.items():
        if a is not None and a.ndim < 2:
            raise ValueError(f"{fn}: {name} must have shape [..., n, D]; got shape {tuple(a.shape)}")
    D, lead = x.shape[-1], tuple(x.shape[:-2])
    for name, a in named.items():
        if a is None or name == "x":
            continue
        if a.shape[-1] != D:
            raise ValueError(
                f"{fn}: {name} has D={a.shape[-1]} features but x has D={D} "
                f"(x.shape={tuple(x.shape)}, {name}.shape={tuple(a.shape)})"
            )
        if tuple(a.shape[:-2]) != lead:
            raise ValueError(
                f"{fn}: {name} has leading dims {tuple(a.shape[:-2])} but x has {lead} "
                f"(x.shape={tuple(x.shape)}, {name}.shape={tuple(a.shape)}); leading dims index "
                "independent problems and must match"
            )
    if D == 0:
        raise ValueError(f"{fn}: D must be at least 1; got x.shape={tuple(x.shape)}")
    if pos.shape[-2] == 0:
        raise ValueError(
            f"{fn}: pos is empty (pos.shape={tuple(pos.shape)}); at least one positive is needed")
    N = x.shape[-2]
    M = 0 if neg is None else neg.shape[-2]
    if N == 0:
        raise ValueError(f"{fn}: x is empty (x.shape={tuple(x.shape)})")
    if x_as_negatives and N < 2 and M == 0:
        raise ValueError(
            f"{fn}: x has N={N} sample(s) and no extra negatives; x serves as its own negative set "
            "excluding each sample itself, so it needs N >= 2 (or pass neg)"
        )
    if not x_as_negatives and M == 0:
        got = None if neg is None else tuple(neg.shape)
        raise ValueError(f"{fn}: x_as_negatives=False needs a non-empty neg (got neg={got})")


def check_weight(fn: str, name: str, w: Any, points: Any, points_name: str, xp: Any,
                 is_concrete: Any, check_sign: bool = True) -> None:
    """A column weight: shape [..., n] broadcastable to points.shape[:-1], non-negative.

    The sign is checked only where the values can be read (not under jit, compile or vmap), and
    not with check_sign=False (a caller that checked the same weight already: on a GPU, reading a
    value waits for the device).
    """
    if w is None:
        return
    if points is None:
        raise ValueError(f"{fn}: {name} is given but {points_name} is None")
    target = tuple(points.shape[:-1])
    shape = tuple(w.shape)
    ok = 1 <= len(shape) <= len(target) and all(
        s == t or s == 1 for s, t in zip(shape[::-1], target[::-1])
    ) and shape[-1] == target[-1]
    if not ok:
        raise ValueError(
            f"{fn}: {name} must have shape {target} (one weight per {points_name} column, leading dims "
            f"broadcastable); got {shape} for {points_name}.shape={tuple(points.shape)}"
        )
    if not xp.isdtype(w.dtype, "real floating"):
        raise TypeError(f"{fn}: {name} must have a real floating dtype; got {w.dtype}")
    if not check_sign:
        return
    negative = xp.any(w < 0)
    if is_concrete(negative) and bool(negative):
        raise ValueError(f"{fn}: {name} must be non-negative; got a minimum of {float(xp.min(w))}")


def as_taus(fn: str, taus: Any) -> tuple[float, ...]:
    """Temperatures as a non-empty tuple of positive finite Python floats."""
    if isinstance(taus, (int, float)) or (hasattr(taus, "shape") and tuple(taus.shape) == ()):
        taus = (taus,)
    if not isinstance(taus, Sequence) and not hasattr(taus, "__iter__"):
        raise TypeError(f"{fn}: taus must be a number or a sequence of numbers; got {type(taus).__name__}")
    try:
        out = tuple(float(t) for t in taus)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"{fn}: taus must be concrete numbers (they are static hyperparameters); got {taus!r}") from e
    if not out:
        raise ValueError(f"{fn}: taus is empty; give at least one temperature")
    bad = [t for t in out if not (t > 0 and math.isfinite(t))]
    if bad:
        raise ValueError(f"{fn}: every temperature must be positive and finite; got taus={out}")
    return out


def check_options(fn: str, *, kernel: str, reduction: str | None, affinity_floor: float,
                  attraction: float, repulsion: float) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"{fn}: kernel must be one of {KERNELS}; got {kernel!r}")
    if reduction is not None and reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if not (0 <= affinity_floor < 1):
        raise ValueError(f"{fn}: affinity_floor must be in [0, 1); got {affinity_floor}")
    for name, v in (("attraction", attraction), ("repulsion", repulsion)):
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{fn}: {name} must be a finite non-negative number; got {v}")
