"""Entry-point checks for the drifting loss: shapes, weights, temperatures, options, values."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import array_api_compat

KERNELS = ("both", "y", "none")
REDUCTIONS = ("mean", "sum", "none")
# x, pos and neg with more dims need ``problem_dims``: [N, D] samples, or [G, N, D] for G problems.
IMPLICIT_MAX_NDIM = 3


def check_points(fn: str, x: Any, pos: Any, neg: Any, *, x_as_negatives: bool,
                 problem_dims: int | None = None) -> None:
    """x [..., N, D], pos [..., P, D], neg [..., M, D] or None: same D; the leading dims of pos and
    neg broadcast to x's. Without ``problem_dims`` at most one leading dim (a batch of images
    [N, C, H, W] is refused, not read as N*C problems); with it, x has exactly that many."""
    named = {"x": x, "pos": pos, "neg": neg}
    for name, a in named.items():
        if a is not None and a.ndim < 2:
            raise ValueError(f"{fn}: {name} must have shape [..., n, D]; got shape {tuple(a.shape)}")
    if problem_dims is None:
        for name, a in named.items():
            if a is not None and a.ndim > IMPLICIT_MAX_NDIM:
                raise ValueError(_too_many_dims(fn, name, a))
    else:
        if isinstance(problem_dims, bool) or not isinstance(problem_dims, int) or problem_dims < 0:
            raise TypeError(f"{fn}: problem_dims must be a non-negative int (the number of leading "
                            f"problem dims of x) or None; got {problem_dims!r}")
        if x.ndim != problem_dims + 2:
            raise ValueError(
                f"{fn}: problem_dims={problem_dims} says x is [{problem_dims} problem dim(s), N, D] "
                f"({problem_dims + 2} dims); got x.shape={tuple(x.shape)} ({x.ndim} dims)")
    D, lead = x.shape[-1], tuple(x.shape[:-2])
    for name, a in named.items():
        if a is None or name == "x":
            continue
        if a.shape[-1] != D:
            raise ValueError(
                f"{fn}: {name} has D={a.shape[-1]} features but x has D={D} "
                f"(x.shape={tuple(x.shape)}, {name}.shape={tuple(a.shape)})"
            )
        if not broadcasts(tuple(a.shape[:-2]), lead):
            raise ValueError(
                f"{fn}: {name} has leading dims {tuple(a.shape[:-2])} but x has {lead} "
                f"(x.shape={tuple(x.shape)}, {name}.shape={tuple(a.shape)}); leading dims index "
                f"independent problems: {name}'s must equal x's or broadcast to them ({name} [n, D] is "
                "shared by every problem). If these are samples that were not flattened (images "
                f"[N, H, W] or [N, C, H, W]), flatten each to a D-vector: x [N, D], {name} [n, D]"
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


def _too_many_dims(fn: str, name: str, a: Any) -> str:
    shape = list(a.shape)
    return (
        f"{fn}: {name} has {a.ndim} dims {shape}: samples are [N, D] vectors (or [G, N, D] for G "
        f"independent problems). If {name} is a batch of images [N, C, H, W], flatten each sample to a "
        f"vector ({name}.reshape({shape[0]}, -1); torch: {name}.flatten(1)); if its leading dims index "
        f"independent kernel problems ([..., N, D], e.g. [G, L, N, C] feature groups), pass them "
        f"explicitly: problem_dims={a.ndim - 2}"
    )


def broadcasts(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether ``shape`` broadcasts to ``target`` (without changing ``target``)."""
    return len(shape) <= len(target) and all(s == t or s == 1 for s, t in zip(shape[::-1], target[::-1]))


def check_weight(fn: str, name: str, w: Any, points: Any, points_name: str, xp: Any) -> Any:
    """A column weight: shape [..., n] broadcastable to points.shape[:-1], real floating or bool.

    Returns the weight, a boolean mask cast to 0/1 in the points' dtype. Its values (signs) are
    checked by ``ValueChecks``.
    """
    if w is None:
        return None
    if points is None:
        raise ValueError(f"{fn}: {name} is given but {points_name} is None")
    target = tuple(points.shape[:-1])
    shape = tuple(w.shape)
    if not (1 <= len(shape) and broadcasts(shape, target) and shape[-1] == target[-1]):
        raise ValueError(
            f"{fn}: {name} must have shape {target} (one weight per {points_name} column, leading dims "
            f"broadcastable); got {shape} for {points_name}.shape={tuple(points.shape)}"
        )
    if xp.isdtype(w.dtype, "bool"):
        return xp.astype(w, points.dtype)
    if not xp.isdtype(w.dtype, "real floating"):
        raise TypeError(f"{fn}: {name} must have a real floating dtype (or be a bool mask); got {w.dtype}")
    return w


class ValueChecks:
    """Checks on the values of arrays (finiteness, weight signs), read from the device at once.

    Each check adds a 0-d boolean "bad" flag, computed only for arrays whose values can be read
    (``is_concrete``, of the array and of its flag: not under jit, compile, vmap or CUDA-graph
    capture). ``raise_if_failed`` reads
    all flags in one host synchronization (on a GPU, a wait for the device) and raises for the first
    failed check; only then are details (counts, minima) read. Finiteness never causes that wait by
    itself: on an accelerator its flags are read only along with the weights' (which must be read).
    """

    def __init__(self, xp: Any, is_concrete: Callable[[Any], bool]) -> None:
        self.xp, self.is_concrete = xp, is_concrete
        self.label = ""  # prepended to the messages of the checks added from now on
        self._checks: list[tuple[Any, str, Callable[[], str]]] = []
        self._must_read = False  # a check that needs the device's values (weights), or host arrays

    def _add(self, flag: Any, message: Callable[[], str], must_read: bool = True) -> None:
        if self.is_concrete(flag):  # under jit even constants' results are traced: not read
            self._checks.append((flag, self.label, message))
            self._must_read = self._must_read or must_read

    def finite(self, fn: str, name: str, a: Any) -> None:
        """``a`` holds no NaN or inf."""
        if a is None or not self.is_concrete(a):
            return
        xp = self.xp

        def message() -> str:
            n_nan, n_inf = _count(xp.isnan(a), xp), _count(xp.isinf(a), xp)
            return (f"{fn}: {name} holds {n_nan + n_inf} non-finite value(s) ({n_nan} NaN, {n_inf} inf) "
                    f"among its {math.prod(a.shape)} entries ({name}.shape={tuple(a.shape)}); the loss "
                    "and every gradient entry would be NaN. Check the data and the network output "
                    "(a diverged step, a division by zero, a log of 0)")

        self._add(xp.logical_not(xp.all(xp.isfinite(a))), message, must_read=_on_host(a))

    def non_negative(self, fn: str, name: str, w: Any) -> None:
        """Weights ``w`` are finite and >= 0."""
        if w is None or not self.is_concrete(w):
            return
        xp = self.xp

        def message() -> str:
            bad = _count(xp.logical_not(xp.isfinite(w)), xp)
            if bad:
                return f"{fn}: {name} must be finite and non-negative; it holds {bad} NaN or inf value(s)"
            return f"{fn}: {name} must be non-negative; got a minimum of {float(xp.min(w))}"

        self._add(xp.logical_not(xp.all(xp.logical_and(w >= 0, xp.isfinite(w)))), message)

    def some_positive(self, fn: str, name: str, w: Any, points_name: str) -> None:
        """Weights ``w`` [..., n] are not all zero along the last axis in any problem."""
        if w is None or not self.is_concrete(w):
            return
        xp = self.xp
        zero = xp.all(w == 0, axis=-1)

        def message() -> str:
            where = "in every problem" if zero.ndim == 0 else (
                f"in {_count(zero, xp)} of {math.prod(zero.shape)} problem(s) "
                f"(leading dims {tuple(zero.shape)})")
            return (f"{fn}: {name} is zero for every {points_name} column {where}: the attraction, the "
                    "drift and the loss there would be identically zero (zero gradient). Give at least "
                    f"one {points_name} sample a positive weight in each problem")

        self._add(xp.any(zero), message)

    def raise_if_failed(self) -> None:
        """One read of all flags; ValueError naming the first failed check."""
        if not (self._checks and self._must_read):
            return
        xp = self.xp
        if not bool(xp.any(xp.stack([flag for flag, _, _ in self._checks]))):
            return
        for flag, label, message in self._checks:
            if bool(flag):
                raise ValueError(label + message())


def _on_host(a: Any) -> bool:
    """Whether ``a`` lives in host memory (reading it waits for no accelerator)."""
    dev = array_api_compat.device(a)
    kind = getattr(dev, "type", None) or getattr(dev, "platform", None) or str(dev)
    return "cpu" in str(kind).lower()


def _count(mask: Any, xp: Any) -> int:
    return int(xp.sum(xp.astype(mask, xp.int32)))


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
