"""Framework hooks the Array API standard lacks: stop-gradient, exact matmul, eager checks.

The core never imports torch or jax. When it is handed torch or JAX arrays it asks the
matching adapter (``driftloss.adapters.torch`` / ``driftloss.adapters.jax``) for these
hooks; the adapter module is imported only then, when the framework is already loaded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np
from array_api_compat import is_jax_namespace, is_numpy_namespace, is_torch_namespace


def _identity(a: Any) -> Any:
    return a


def asarray_constant(xp: Any, values: Any, dtype: Any, device: Any) -> Any:
    """The Python numbers ``values`` (nested lists) as an array of ``dtype`` (None: default) on ``device``."""
    return xp.asarray(values, dtype=dtype, device=device)


@dataclass(frozen=True)
class Backend:
    """What the core needs from a framework beyond the Array API.

    stop_gradient(a)      -> a with no gradient path (identity where there is no autodiff)
    field_context(a)      -> context in which the drift of a's call is computed (torch: autocast off)
    matmul(a, b)          -> matmul at full float32 precision (JAX: Precision.HIGHEST)
    is_concrete(a)        -> True when a holds values Python may inspect (not a tracer or fake tensor)
    device(a)             -> the device of a (None where a traced array has none)
    as_array(a)           -> a as an array (NumPy reductions return scalars)
    default_replica_sum() -> the cross_replica_sum to use when the caller gives none (torch: an
                             all-reduce when torch.distributed is initialized), or None
    compute_drift         -> a faster drift with ``_drift.compute_drift``'s arguments and results, or
                             None (the reference); it may return None to decline a call it does not
                             support, which then runs the reference
    fused_loss            -> fused_loss(calls, opts, reduction): the summed loss of several validated
                             drifting_loss calls, each (x, pos, neg, (x_w, neg_w, pos_w)) with raw
                             weights, as one differentiable array (torch on CUDA); or None to decline
    after(a, dep)         -> a, made to wait for the arrays ``dep`` (no gradient flows to them), or
                             None where operations run in the order they are called (eager
                             libraries); JAX: XLA would otherwise run independent work side by side,
                             holding the temporaries of all of it at once
    regression_loss(xq, v, s) -> the per-problem loss [...] of docs/design.md §2 step 5 (value mean(V^2),
                             gradient -2 V / (s N D) with respect to xq [..., N, D]) in fewer passes
                             over x-sized arrays than the array form, or None (the array form)
    constant(xp, values, dtype, device) -> an array of Python numbers (nested lists) on device;
                             torch caches those on accelerators, where making one is a host-to-device
                             copy that waits for the queued work and that a CUDA graph cannot capture
    share_groups(a)       -> True where drifting_loss_groups should stack the groups of one shape
                             into one compute_drift (segments) for arrays like a: worth it where
                             each array operation has a fixed cost (GPU launches, XLA), not for
                             eager CPU libraries, whose blocks are cache-sized either way
    stack_elements        -> the most entries of points (x, pos and neg) that drifting_loss_groups
                             copies into one stacked evaluation: a bucket of groups is stacked in runs
                             up to it, a group above it evaluated on its own; None: no limit
    """

    stop_gradient: Callable[[Any], Any] = _identity
    field_context: Callable[[Any], ContextManager] = lambda a: contextlib.nullcontext()
    matmul: Callable[[Any, Any], Any] | None = None
    is_concrete: Callable[[Any], bool] = lambda a: True
    device: Callable[[Any], Any] = array_api_compat.device
    as_array: Callable[[Any], Any] = _identity
    default_replica_sum: Callable[[], Any] = lambda: None
    compute_drift: Callable[..., Any] | None = None
    fused_loss: Callable[..., Any] | None = None
    share_groups: Callable[[Any], bool] = lambda a: False
    stack_elements: int | None = None
    constant: Callable[[Any, Any, Any, Any], Any] = asarray_constant
    after: Callable[[Any, Any], Any] | None = None
    regression_loss: Callable[[Any, Any, Any], Any] | None = None


def _numpy_compute_drift(*args: Any, **kwargs: Any) -> Any:
    # Imported late: _fast_drift imports _drift, which imports this module.
    from driftloss._fast_drift import cpu_compute_drift

    return cpu_compute_drift(*args, **kwargs)


_GENERIC = Backend()
# NumPy reductions return scalars, not 0-d arrays; the blocked fast drift is 3x the core on the CPU.
_NUMPY = Backend(as_array=np.asarray, compute_drift=_numpy_compute_drift)


def backend_for(xp: Any) -> Backend:
    """The hooks for namespace ``xp``: the adapters' for torch and JAX, NumPy's own, generic ones else."""
    if is_torch_namespace(xp):
        from driftloss.adapters import torch as torch_adapter

        return torch_adapter.BACKEND
    if is_jax_namespace(xp):
        from driftloss.adapters import jax as jax_adapter

        return jax_adapter.BACKEND
    if is_numpy_namespace(xp):
        return _NUMPY
    return _GENERIC
