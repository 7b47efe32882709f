"""Feature groups of an encoder's feature maps for feature-space drifting (§3.4, A.5; docs/design.md §4).

Each group is a set of C-dim vectors per sample, [n, L, C]; ``drifting_loss_groups`` runs one
drifting loss per group with its L locations as independent kernel problems.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from array_api_compat import array_namespace

LAYOUTS = ("NCHW", "NHWC")
INPUT_EPS = 1e-6  # sqrt(mean(x^2) + eps) of the encoder-input group (A.5)


def feature_groups(fmap: Any, *, layout: str = "NCHW", patch_sizes: Sequence[int] = (2, 4),
                   prefix: str = "", xp: Any = None) -> dict[str, Any]:
    """The feature groups of one feature map (A.5): name -> [n, L, C].

    fmap: [n, C, H, W] (layout="NCHW") or [n, H, W, C] (layout="NHWC").

      f"{prefix}loc"      [n, H*W, C]          the vector at each location (row-major over H, W)
      f"{prefix}mean"     [n, 1, C]            mean over all locations
      f"{prefix}std"      [n, 1, C]            standard deviation over all locations
      f"{prefix}mean_{p}" [n, (H//p)*(W//p), C] mean over each p x p patch, for p in patch_sizes
      f"{prefix}std_{p}"  [n, (H//p)*(W//p), C] standard deviation over each p x p patch

    Patches tile the map from the top-left corner; when p does not divide H (or W) the last
    H % p rows (W % p columns) are left out of the patch groups (they still count in loc, mean
    and std). A patch size larger than H or W is a ValueError.

    Standard deviations are population std (ddof=0) computed as a double ``where``:
    sqrt(var) where var > 0 and exactly 0 (with zero gradient) where var == 0, so the value is
    exact and the gradient is finite for constant maps and constant patches.

    Half-precision maps are upcast: every group is float32, or float64 for a float64 map.
    """
    fn = "feature_groups"
    xp = array_namespace(fmap) if xp is None else xp
    label = f"map {prefix!r}" if prefix else "the map"
    nhwc = _as_nhwc(fn, fmap, layout, label, xp)
    n, h, w, c = nhwc.shape
    sizes = _check_patch_sizes(fn, patch_sizes, h, w, label)

    flat = xp.reshape(nhwc, (n, h * w, c))
    mean, std = _mean_std(flat, (1,), xp)
    groups = {f"{prefix}loc": flat, f"{prefix}mean": mean, f"{prefix}std": std}
    for p in sizes:
        hp, wp = h // p, w // p
        tiles = xp.reshape(nhwc[:, : hp * p, : wp * p, :], (n, hp, p, wp, p, c))
        mean_p, std_p = _mean_std(tiles, (2, 4), xp)  # [n, hp, 1, wp, 1, c]
        groups[f"{prefix}mean_{p}"] = xp.reshape(mean_p, (n, hp * wp, c))
        groups[f"{prefix}std_{p}"] = xp.reshape(std_p, (n, hp * wp, c))
    return groups


def input_group(x: Any, *, layout: str = "NCHW", xp: Any = None) -> Any:
    """The encoder-input group (A.5): sqrt(mean over locations of x^2 + 1e-6) per channel.

    x: [n, C, H, W] (layout="NCHW") or [n, H, W, C] (layout="NHWC") -> [n, 1, C].
    The 1e-6 keeps the gradient finite for an all-zero channel.
    """
    fn = "input_group"
    xp = array_namespace(x) if xp is None else xp
    nhwc = _as_nhwc(fn, x, layout, "the input", xp)
    n, h, w, c = nhwc.shape
    flat = xp.reshape(nhwc, (n, h * w, c))
    return xp.sqrt(xp.mean(flat * flat, axis=1, keepdims=True) + INPUT_EPS)


def global_group(x: Any, *, xp: Any = None) -> Any:
    """The "global" group (A.5): each sample of the raw generator output flattened to one vector.

    x: [n, ...] (e.g. [n, C, H, W]) -> [n, 1, prod(...)]. The order of the flattened coordinates
    does not matter to the loss (distances are invariant to a permutation of coordinates).
    """
    xp = array_namespace(x) if xp is None else xp
    if x.ndim < 2:
        raise ValueError(f"global_group: x must have shape [n, ...] with ndim >= 2; got {tuple(x.shape)}")
    _check_floating("global_group", x, xp)
    x = _at_least_float32(x, xp)
    return xp.reshape(x, (x.shape[0], 1, -1))


def _as_nhwc(fn: str, fmap: Any, layout: str, label: str, xp: Any) -> Any:
    """fmap as [n, H, W, C] in float32 or wider, after checking rank, layout and dtype."""
    if layout not in LAYOUTS:
        raise ValueError(f"{fn}: layout must be one of {LAYOUTS}; got {layout!r}")
    if fmap.ndim != 4:
        raise ValueError(
            f"{fn}: {label} must have shape [n, C, H, W] (NCHW) or [n, H, W, C] (NHWC); "
            f"got shape {tuple(fmap.shape)}"
        )
    _check_floating(fn, fmap, xp)
    fmap = _at_least_float32(fmap, xp)
    return xp.permute_dims(fmap, (0, 2, 3, 1)) if layout == "NCHW" else fmap


def _check_floating(fn: str, a: Any, xp: Any) -> None:
    if not xp.isdtype(a.dtype, "real floating"):
        raise TypeError(f"{fn}: the map must have a real floating dtype; got {a.dtype}")


def _at_least_float32(a: Any, xp: Any) -> Any:
    return a if a.dtype in (xp.float32, xp.float64) else xp.astype(a, xp.float32)


def _check_patch_sizes(fn: str, patch_sizes: Sequence[int], h: int, w: int, label: str) -> tuple[int, ...]:
    if isinstance(patch_sizes, int) or not all(isinstance(p, int) and p >= 1 for p in patch_sizes):
        raise ValueError(f"{fn}: patch_sizes must be a sequence of positive ints; got {patch_sizes!r}")
    sizes = tuple(patch_sizes)
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"{fn}: patch_sizes has duplicates: {sizes}")
    for p in sizes:
        if p > h or p > w:
            raise ValueError(
                f"{fn}: {label} is {h}x{w} (HxW), smaller than the patch size {p}; "
                f"drop {p} from patch_sizes for this map"
            )
    return sizes


def _mean_std(a: Any, axes: tuple[int, ...], xp: Any) -> tuple[Any, Any]:
    """Mean and population std of ``a`` over ``axes`` (kept as size-1 dims).

    std = sqrt(var) where var > 0, else 0: the inner where keeps sqrt's derivative finite at
    var == 0 and the outer one gives that case a zero gradient (no 0 * inf = NaN).
    """
    mean = xp.mean(a, axis=axes, keepdims=True)
    dev = a - mean
    var = xp.mean(dev * dev, axis=axes, keepdims=True)
    positive = var > 0
    std = xp.where(positive, xp.sqrt(xp.where(positive, var, 1.0)), 0.0)
    return mean, std
