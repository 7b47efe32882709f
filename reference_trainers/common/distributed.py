"""One launch path for one process or many: ``python -m ...`` and ``torchrun --nproc_per_node=K -m ...``.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them the run is rank 0 of 1 and nothing is
initialized. CUDA runs use NCCL with one device per local rank; CPU runs use gloo (the tests).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, writes checkpoints and sample grids."""
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Distributed:
    """Initialize the process group when launched by torchrun (WORLD_SIZE > 1) and pick the device.

    device: "auto" (CUDA when available, else CPU), "cpu" or "cuda".
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda'; got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return Distributed(rank=rank, world_size=world, local_rank=local, device=dev)


def teardown_distributed() -> None:
    """Destroy the process group if this process initialized one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def split_evenly(total: int, world_size: int, what: str) -> int:
    """total / world_size, or a clear error when it does not divide (e.g. classes per step over ranks)."""
    if total % world_size:
        raise ValueError(f"{what}={total} does not divide over {world_size} processes; choose a multiple")
    return total // world_size
