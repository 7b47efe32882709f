"""JAX adapter: ``drifting_loss`` with jax.numpy bound, lax.stop_gradient and exact matmuls.

Works under ``jax.jit``, ``jax.grad``, ``jax.vmap`` (each vmapped slice is its own call, with
its own S and lambda) and in jitted optax steps. Distance and drift products run at
``Precision.HIGHEST``: JAX's default GPU precision is TF32-like and loses ~12% on small
squared distances (DESIGN §7).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from driftloss._backends import Backend
from driftloss._loss import DEFAULT_TAUS
from driftloss._loss import drift_field as _drift_field
from driftloss._loss import drifting_loss as _drifting_loss


def _is_concrete(a: Any) -> bool:
    return not isinstance(a, jax.core.Tracer)


BACKEND = Backend(
    stop_gradient=jax.lax.stop_gradient,
    matmul=functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST),
    is_concrete=_is_concrete,
)


def drifting_loss(x: jax.Array, pos: jax.Array, neg: jax.Array | None = None,
                  taus: float | Sequence[float] = DEFAULT_TAUS, **options: Any) -> Any:
    """``driftloss.drifting_loss`` for JAX arrays (namespace passed explicitly)."""
    return _drifting_loss(x, pos, neg, taus, xp=jnp, **options)


def drift_field(x: jax.Array, pos: jax.Array, neg: jax.Array | None = None,
                tau: float | Sequence[float] = 0.05, **options: Any) -> Any:
    """``driftloss.drift_field`` for JAX arrays (namespace passed explicitly)."""
    return _drift_field(x, pos, neg, tau, xp=jnp, **options)
