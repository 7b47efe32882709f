"""The backend under test, chosen by the DRIFTLOSS_BACKEND environment variable.

numpy (default) | strict (array-api-strict) | torch | jax. Tests convert NumPy inputs with
``B.asarray`` and results back with ``B.to_numpy``; ``B.grad`` and ``B.compile`` exist where the
backend has autodiff / a compiler.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

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

    def compile_(f):
        return torch.compile(f, fullgraph=True, dynamic=False)

    return Backend("torch", xp, asarray, to_numpy, grad, compile_, True)


def _jax() -> Backend:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    def asarray(a, dtype=None):
        return jnp.asarray(np.asarray(a, dtype=dtype))

    return Backend("jax", jnp, asarray, lambda a: np.asarray(a), lambda f, x: jax.grad(f)(x), jax.jit, True)


B: Backend = {"numpy": _numpy, "strict": _strict, "torch": _torch, "jax": _jax}[NAME]()
