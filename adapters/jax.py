"""JAX adapter: ``drifting_loss`` with jax.numpy bound, lax.stop_gradient and exact matmuls.

Works under ``jax.jit``, ``jax.grad``, ``jax.vmap`` (each vmapped slice is its own call, with
its own S and lambda) and in jitted optax steps. Distance and drift products run at
``Precision.HIGHEST``: JAX's default GPU precision is TF32-like and loses ~12% on small
squared distances (docs/design.md §7). On GPUs, ``jax_fast.ACCELERATOR_PRODUCTS = "tf32x3"`` opts into
XLA's three-pass TF32 products (float32-faithful, faster on tensor cores).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from driftloss.adapters import jax_fast

from driftloss._arrays import PYTHON_VALUES as _PYTHON_VALUES
from driftloss._backends import Backend
from driftloss._loss import DEFAULT_TAUS
from driftloss._loss import drift_field as _drift_field
from driftloss._loss import drifting_loss as _drifting_loss

_TRACER = getattr(jax.core, "Tracer", None) or jax._src.core.Tracer  # public name may move


def _is_concrete(a: Any) -> bool:
    return not isinstance(a, _TRACER)


BACKEND = Backend(
    stop_gradient=jax.lax.stop_gradient,
    matmul=functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST),
    is_concrete=_is_concrete,
    compute_drift=jax_fast.compute_drift,
    share_groups=lambda a: True,  # fewer, larger XLA operations (b2-class on the CPU: 3.45x vs 3.19x)
    stack_elements=jax_fast.STACK_ELEMENTS,
    after=jax_fast.groups_after,
)


def drifting_loss(x: jax.Array, pos: jax.Array, neg: jax.Array | None = None,
                  taus: float | Sequence[float] = DEFAULT_TAUS, *, axis_name: Any = None,
                  **options: Any) -> Any:
    """``driftloss.drifting_loss`` for JAX arrays (namespace passed explicitly); NumPy arrays and
    Python lists are converted.

    ``axis_name``: inside shard_map/pmap, psum S and lambda over this mapped axis so the replicas
    compute the single-device loss. Under plain ``jit`` with globally sharded arrays nothing is
    needed: the arrays are global.
    """
    if axis_name is not None:
        options["cross_replica_sum"] = functools.partial(jax.lax.psum, axis_name=axis_name)
    x, pos, neg, options = _as_jax(x, pos, neg, options)
    return _drifting_loss(x, pos, neg, taus, xp=jnp, **options)


def drift_field(x: jax.Array, pos: jax.Array, neg: jax.Array | None = None,
                tau: float | Sequence[float] = 0.05, **options: Any) -> Any:
    """``driftloss.drift_field`` for JAX arrays (namespace passed explicitly)."""
    x, pos, neg, options = _as_jax(x, pos, neg, options)
    return _drift_field(x, pos, neg, tau, xp=jnp, **options)


def _as_jax(x: Any, pos: Any, neg: Any, options: dict[str, Any]) -> tuple[Any, Any, Any, dict[str, Any]]:
    """NumPy inputs (constants of a jitted step, say) as JAX arrays; tracers pass through. Python
    lists and numbers become arrays in the core (floating point), as on the other backends."""

    def array(a: Any) -> Any:
        return a if a is None or isinstance(a, _PYTHON_VALUES) else jnp.asarray(a)

    weights = {k: array(options[k]) for k in ("x_weight", "pos_weight", "neg_weight")
               if options.get(k) is not None}
    return array(x), array(pos), array(neg), {**options, **weights}
