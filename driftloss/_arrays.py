"""Namespace, device and dtype resolution at the entry points, with clear errors."""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace


def _describe(a: Any) -> str:
    t = type(a)
    return f"{t.__module__}.{t.__qualname__}"


PYTHON_VALUES = (list, tuple, int, float, bool)


def is_python_value(a: Any) -> bool:
    """A Python list, tuple or number (not an array): converted at the entry points."""
    return isinstance(a, PYTHON_VALUES)


def resolve_namespace(fn: str, arrays: dict[str, Any], xp: Any = None) -> Any:
    """The one Array API namespace of ``arrays`` (name -> array, Python value or None); ``xp`` if
    given. Python lists and numbers take the namespace of the arrays, NumPy's when there are none.

    Raises TypeError when the arrays come from different libraries.
    """
    present = {k: v for k, v in arrays.items() if v is not None and not is_python_value(v)}
    if xp is None:
        if not present:
            import array_api_compat.numpy as xp_numpy

            return xp_numpy
        try:
            xp = array_namespace(*present.values())
        except TypeError as e:
            kinds = ", ".join(f"{k}: {_describe(v)}" for k, v in present.items())
            raise TypeError(
                f"{fn}: all arrays must come from one array library; got {kinds}"
            ) from e
    return xp


def from_python(arrays: dict[str, Any], points: tuple[str, ...], xp: Any, device: Any) -> dict[str, Any]:
    """``arrays`` with the Python lists, tuples and numbers among them as arrays of ``xp``.

    They go on the device of the first array of ``points`` that is not one (NumPy: the CPU), in its
    dtype where it is real floating, else in the namespace's default floating dtype; a weight (not
    in ``points``) made of bools stays a boolean mask.
    """
    if not any(is_python_value(v) for v in arrays.values()):
        return arrays
    like = next((arrays[k] for k in points if arrays.get(k) is not None and not is_python_value(arrays[k])),
                None)
    dev = None if like is None else device(like)
    if like is not None and xp.isdtype(like.dtype, "real floating"):
        dtype = like.dtype
    else:
        dtype = xp.asarray(0.0, device=dev).dtype  # the namespace's default
    out = {}
    for name, v in arrays.items():
        if is_python_value(v):
            a = xp.asarray(v, device=dev)
            mask = name not in points and xp.isdtype(a.dtype, "bool")
            # Converted again, not cast: a list of floats read at torch's default float32 and then
            # cast to float64 would have lost its digits.
            v = a if mask or a.dtype == dtype else xp.asarray(v, dtype=dtype, device=dev)
        out[name] = v
    return out


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
