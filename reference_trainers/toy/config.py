"""The toy trainers' configuration: one dataclass holds every default; the CLI is generated from it.

    cfg = parse_config(["--target", "bimodal", "--steps", "500"])

Every field becomes ``--field-name``; tuples take several values, booleans get ``--x/--no-x``.
When resuming (``--resume PATH``) the checkpoint's config is the base and only the flags given on the
command line override it (so ``--resume ckpt.pt --steps 3000`` continues the same run further).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from reference_trainers.common.config_cli import dataclass_parser
from reference_trainers.common.config_cli import parse_config as parse_dataclass
from reference_trainers.common.schedules import warmup_cosine


@dataclass
class ToyConfig:
    # what to learn and from where (toy_data.TARGETS, toy_data.INITS; "all" runs every one in turn)
    target: str = "8gaussians"
    init: str = "collapsed"
    # generator: noise [N, noise_dim] -> 3 hidden SiLU layers of width `hidden` -> [N, 2]
    noise_dim: int = 32
    hidden: int = 256
    # optimization
    steps: int = 3000
    n_gen: int = 256           # generated samples per step (also the negatives)
    n_pos: int = 256           # real samples per step
    lr: float = 1e-2            # Adam; measured on 8 Gaussians: 1e-2 beats 3e-4, 1e-3, 3e-3 and 2e-2
    lr_schedule: str = "cosine"  # "cosine" (to 0 at `steps`) or "constant"; a pure function of the step
    ema_decay: float = 0.99
    seed: int = 0
    # drifting loss (driftloss.drifting_loss keyword options)
    taus: tuple[float, ...] = (0.02, 0.05, 0.2)
    normalize: bool = True
    kernel: str = "both"
    attraction: float = 1.0
    repulsion: float = 1.0
    # evaluation and output
    eval_samples: int = 2000
    snapshots: int = 6         # scatter plots over training (including step 0 and the last step)
    log_every: int = 50
    checkpoint_every: int = 0  # 0: only at the end
    out: str = "runs/toy2d"
    resume: str = ""
    stop_at: int = 0           # stop (and checkpoint) after this step, as if interrupted; 0: run to `steps`
    plots: bool = True
    progress: bool = True
    threads: int = 1           # torch intra-op threads; 1 is fastest for this small MLP on a busy machine

    def loss_options(self) -> dict:
        """Keyword options for driftloss.drifting_loss."""
        return {"normalize": self.normalize, "kernel": self.kernel, "attraction": self.attraction,
                "repulsion": self.repulsion}


def learning_rate(cfg: ToyConfig, step: int) -> float:
    """Learning rate of optimizer step ``step`` (1-based): cosine decay from cfg.lr to 0 over cfg.steps.

    The late small steps let the generator settle on the target instead of jittering around it at the
    noise floor of a fixed-size step (the normalized drift never shrinks, so the gradient never does).
    """
    if cfg.lr_schedule == "constant":
        return cfg.lr
    return warmup_cosine(cfg.lr, step, cfg.steps)


def build_parser(description: str) -> argparse.ArgumentParser:
    """argparse parser with one flag per ToyConfig field; unset flags are absent from the result."""
    return dataclass_parser(ToyConfig, description)


def parse_config(argv: list[str] | None, description: str = "") -> ToyConfig:
    """Defaults <- CLI flags (without --resume handling; the trainers handle the checkpoint base)."""
    return parse_dataclass(ToyConfig, argv, description)
