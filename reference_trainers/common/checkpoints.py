"""Self-describing torch checkpoints: one file holding {model, ema, opt, step, config, ...}.

Writes go to a temporary file that replaces the old checkpoint only once complete, so an interrupted save
never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch


def training_state(model: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer, step: int,
                   config: Any, **extra: Any) -> dict:
    """{model, ema, opt, step, config} as state dicts (a dataclass config as a dict) plus ``extra``."""
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
            "config": cfg, **extra}


def save_checkpoint(path: str, state: dict) -> None:
    """torch.save ``state`` to ``path`` atomically (parent folders are created)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    """The dict save_checkpoint wrote (on the CPU); a clear error if the file is missing."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r} (give the path of a checkpoint.pt a run wrote)")
    return torch.load(path, map_location="cpu", weights_only=False)
