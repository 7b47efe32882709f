"""The backend under test, chosen by the DRIFTLOSS_BACKEND environment variable.

numpy (default) | strict (array-api-strict) | torch | jax. Tests convert NumPy inputs with
``B.asarray`` and results back with ``B.to_numpy``; ``B.grad`` and ``B.compile`` exist where the
backend has autodiff / a compiler.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

NAME = os.environ.get("DRIFTLOSS_BACKEND", "numpy")
if NAME not in ("numpy", "strict", "torch", "jax"):
    raise RuntimeError(f"DRIFTLOSS_BACKEND must be numpy, strict, torch or jax; got {NAME!r}")


@dataclass(frozen=True)
class Backend:
    name: str
    xp: Any                                   # the Array API namespace
    asarray: Callable[..., Any]               # (np.ndarray, dtype=None) -> backend array
    to_numpy: Callable[[Any], np.ndarray]
    grad: Callable[[Callable, Any], Any] | None = None   # grad(f, x) of scalar f at x, as backend array
    compile: Callable[[Callable], Callable] | None = None
    has_autodiff: bool = False
    # run(f, *arrays, **kw) = f(*arrays, **kw); JAX jits f per set of non-array options, since
    # eager JAX compiles every op anew for each new shape (seconds per call in property tests).
    run: Callable[..., Any] = lambda f, *args, **kw: f(*args, **kw)
    # grad_of(f, x, *args, **kw): d f(x, *args, **kw) / dx, jitted and cached like ``run`` on JAX.
    grad_of: Callable[..., Any] | None = None


def _numpy() -> Backend:
    import array_api_compat.numpy as xp

    def asarray(a, dtype=None):
        return np.asarray(a, dtype=dtype)

    return Backend("numpy", xp, asarray, lambda a: np.asarray(a))


def _strict() -> Backend:
    import array_api_strict as xp

    def asarray(a, dtype=None):
        a = np.asarray(a, dtype=dtype)
        return xp.asarray(a, dtype=getattr(xp, a.dtype.name))

    return Backend("strict", xp, asarray, lambda a: np.asarray(a))


def _torch() -> Backend:
    import array_api_compat.torch as xp
    import torch

    torch.set_default_dtype(torch.float32)

    def asarray(a, dtype=None):
        return torch.from_numpy(np.array(a, dtype=dtype, copy=True))

    def to_numpy(a):
        return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)

    def grad(f, x):
        x = x.detach().clone().requires_grad_(True)
        f(x).backward()
        return x.grad

    def grad_of(f, x, *args, **kw):
        return grad(lambda xx: f(xx, *args, **kw), x)

    def compile_(f):
        return torch.compile(f, fullgraph=True, dynamic=False)

    return Backend("torch", xp, asarray, to_numpy, grad, compile_, True, grad_of=grad_of)


def _jax() -> Backend:
    # Two host devices: mixed-device errors and sharded (multi-replica) runs are testable on CPU.
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    def asarray(a, dtype=None):
        return jnp.asarray(np.asarray(a, dtype=dtype))

    jitted: dict = {}

    def cached(f, wrap, args, kw):
        arrays = {k: v for k, v in kw.items() if isinstance(v, (jax.Array, np.ndarray))}
        static = tuple(sorted((k, v) for k, v in kw.items() if k not in arrays))
        key = (f, wrap, static, tuple(sorted(arrays)))
        if key not in jitted:
            jitted[key] = jax.jit(wrap(lambda a, kw_arrays: f(*a, **kw_arrays, **dict(static))))
        return jitted[key](args, arrays)

    def as_is(g):
        return g

    def wrt_first(g):
        return lambda a, kw_arrays: jax.grad(lambda x: g((x, *a[1:]), kw_arrays))(a[0])

    def run(f, *args, **kw):
        return cached(f, as_is, args, kw)

    def grad_of(f, x, *args, **kw):
        return cached(f, wrt_first, (x, *args), kw)

    def grad(f, x):
        return jax.jit(jax.grad(f))(x)

    return Backend("jax", jnp, asarray, lambda a: np.asarray(a), grad, jax.jit, True, run, grad_of)


B: Backend = {"numpy": _numpy, "strict": _strict, "torch": _torch, "jax": _jax}[NAME]()

# Where the driftloss hooks (driftloss._backends.Backend) of the backend under test live:
# (module, attribute); strict runs the generic hooks, which have no fast path.
HOOKS_AT = {"torch": ("driftloss.adapters.torch", "BACKEND"), "jax": ("driftloss.adapters.jax", "BACKEND"),
            "numpy": ("driftloss._backends", "_NUMPY")}.get(NAME)


def driftloss_hooks() -> Any:
    """The driftloss hooks the backend under test uses (needs HOOKS_AT)."""
    module, attr = HOOKS_AT
    return getattr(importlib.import_module(module), attr)


def swap_hooks(mp: Any, **changes: Any) -> None:
    """Replace some of those hooks (e.g. compute_drift=spy) while the pytest MonkeyPatch ``mp`` lasts."""
    module, attr = HOOKS_AT
    mp.setattr(importlib.import_module(module), attr, dataclasses.replace(driftloss_hooks(), **changes))
