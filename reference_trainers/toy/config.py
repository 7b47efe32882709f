"""The toy trainers' configuration: one dataclass holds every default; the CLI is generated from it.

    cfg = parse_config(["--target", "bimodal", "--steps", "500"])

Every field becomes ``--field-name`` with its help text, choices and bounds from ``option()`` (checked on
the command line and for configs built in code); tuples take several values, booleans get ``--x/--no-x``.
When resuming (``--resume PATH``) the checkpoint's config is the base and only the flags given on the
command line override it (so ``--resume ckpt.pt --steps 3000`` continues the same run further).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from reference_trainers.common.config_cli import check_fields, dataclass_parser, option
from reference_trainers.common.config_cli import parse_config as parse_dataclass
from reference_trainers.common.schedules import warmup_cosine
from reference_trainers.toy.data import INITS, TARGETS


@dataclass
class ToyConfig:
    target: str = option("8gaussians", 'what to learn; "all": every target in turn',
                         choices=(*TARGETS, "all"), section="what to learn and from where")
    init: str = option("collapsed", 'where the generated samples start (Fig. 3): "between" the modes, '
                       '"far" from them, "collapsed" on one mode; "all": every init in turn',
                       choices=(*INITS, "all"))
    noise_dim: int = option(32, "generator input: noise [N, noise_dim]", ge=1,
                            section="generator: noise -> 3 hidden SiLU layers of width `hidden` -> [N, 2]")
    hidden: int = option(256, "width of the 3 hidden SiLU layers", ge=1)
    steps: int = option(3000, "optimizer steps", ge=1, section="optimization")
    n_gen: int = option(256, "generated samples per step (also the negatives)", ge=2)
    n_pos: int = option(256, "real samples per step", ge=1)
    lr: float = option(1e-2, "Adam learning rate; measured on 8 Gaussians: 1e-2 beats 3e-4, 1e-3, 3e-3 "
                       "and 2e-2", gt=0)
    lr_schedule: str = option("cosine", '"cosine" (to 0 at --steps) or "constant"; a pure function of the '
                              "step", choices=("cosine", "constant"))
    ema_decay: float = option(0.99, "decay of the EMA of the weights (the EMA is evaluated and plotted)",
                              ge=0, lt=1)
    seed: int = option(0, "seed of the weights, the data stream and the evaluation noise", ge=0)
    taus: tuple[float, ...] = option((0.02, 0.05, 0.2), "temperatures, relative to the mean distance when "
                                     "normalized; one drift per tau", gt=0,
                                     section="drifting loss (driftloss.drifting_loss keyword options)")
    normalize: bool = option(True, "scale features and drifts (A.6); --no-normalize: raw Alg. 2 with the "
                             "given taus on raw coordinates")
    kernel: str = option("both", 'kernel normalization (Table 11): softmax over y and x ("both"), over y '
                         'only ("y"), or a plain kernel ("none")', choices=("both", "y", "none"))
    attraction: float = option(1.0, "V = attraction * V+ - repulsion * V- (Table 1: unequal breaks "
                               "anti-symmetry)", ge=0)
    repulsion: float = option(1.0, "see --attraction", ge=0)
    eval_samples: int = option(2000, "generated and held-out target samples for the final metrics", ge=2,
                               section="evaluation and output")
    snapshots: int = option(6, "scatter plots over training in samples.png (including step 0 and the last "
                            "step)", ge=2)
    log_every: int = option(50, "steps between log lines", ge=1)
    checkpoint_every: int = option(0, "steps between checkpoints; 0: only at the end", ge=0)
    out: str = option("runs/toy2d", "output folder (with --target/--init all: one subfolder per run)")
    resume: str = option("", "checkpoint to resume from: its config is the base, the flags given now "
                         "override it")
    stop_at: int = option(0, "stop (and checkpoint) after this step, as if interrupted; 0: run to --steps",
                          ge=0, le="steps")
    plots: bool = option(True, "write samples.png, drift.png and curves.png")
    progress: bool = option(True, "show a progress bar")
    threads: int = option(1, "torch intra-op threads; 1 is fastest for this small MLP on a busy machine",
                          ge=1)

    def __post_init__(self):
        check_fields(self)

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


def build_parser(description: str, prog: str | None = None) -> argparse.ArgumentParser:
    """argparse parser with one flag per ToyConfig field (help, choices and bounds from the field's
    option()); unset flags are absent from the result; a bad value is a usage error naming the flag."""
    return dataclass_parser(ToyConfig, description, prog)


def parse_config(argv: list[str] | None, description: str = "") -> ToyConfig:
    """Defaults <- CLI flags (without --resume handling; the trainers handle the checkpoint base)."""
    return parse_dataclass(ToyConfig, argv, description)
