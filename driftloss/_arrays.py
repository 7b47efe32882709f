"""Namespace, device and dtype resolution at the entry points, with clear errors."""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace


def _describe(a: Any) -> str:
    t = type(a)
    return f"{t.__module__}.{t.__qualname__}"


def resolve_namespace(fn: str, arrays: dict[str, Any], xp: Any = None) -> Any:
    """The one Array API namespace of ``arrays`` (name -> array or None); ``xp`` if given.

    Raises TypeError when the arrays come from different libraries.
    """
    present = {k: v for k, v in arrays.items() if v is not None}
    if xp is None:
        try:
            xp = array_namespace(*present.values())
        except TypeError as e:
            kinds = ", ".join(f"{k}: {_describe(v)}" for k, v in present.items())
            raise TypeError(
                f"{fn}: all arrays must come from one array library; got {kinds}"
            ) from e
    return xp


def check_same_device(fn: str, arrays: dict[str, Any], device: Any) -> None:
    """ValueError when the arrays (name -> array or None) sit on different devices."""
    devices = {k: device(v) for k, v in arrays.items() if v is not None}
    # Traced arrays (jax.grad, jit) report no device; compare only the ones that do.
    devices = {k: dev for k, dev in devices.items() if dev is not None}
    if not devices:
        return
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(
                f"{fn}: all arrays must be on one device; {first_name} is on {first} but {name} is on {dev}"
            )


def check_real_floating(fn: str, xp: Any, arrays: dict[str, Any]) -> None:
    for name, a in arrays.items():
        if a is not None and not xp.isdtype(a.dtype, "real floating"):
            raise TypeError(
                f"{fn}: {name} must have a real floating dtype (float16/bfloat16/float32/float64); "
                f"got {a.dtype}"
            )


def compute_dtype(xp: Any, arrays: list[Any]) -> Any:
    """float64 if any input is float64, else float32 (half precision is upcast)."""
    if any(a is not None and a.dtype == xp.float64 for a in arrays):
        return xp.float64
    return xp.float32
