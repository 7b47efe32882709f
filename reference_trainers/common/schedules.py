"""Learning-rate schedules as pure functions of the (1-based) optimizer step, so a resumed run uses the same
rates as a straight one."""

from __future__ import annotations

import math


def warmup_cosine(base: float, step: int, total: int, warmup: int = 0) -> float:
    """Linear warmup over ``warmup`` steps to ``base``, then cosine decay to 0 at step ``total``."""
    if step <= warmup:
        return base * step / max(warmup, 1)
    progress = (step - max(warmup, 1)) / max(total - warmup, 1)  # 0 at the first step after the warmup
    return base * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def warmup_constant(base: float, step: int, warmup: int, start: float = 0.0) -> float:
    """Linear warmup from ``start`` (at step 0) to ``base`` over ``warmup`` steps, then constant."""
    if step >= warmup:
        return base
    return start + (base - start) * step / max(warmup, 1)
