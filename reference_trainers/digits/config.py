"""The digits trainers' configuration: one dataclass holds every default; the CLI is generated from it.

    cfg = parse_config(["--method", "gan", "--steps", "500"])

Every field becomes ``--field-name``; tuples take several values, booleans get ``--x/--no-x``.
When resuming (``--resume PATH``) the checkpoint's config is the base and only the flags given on the
command line override it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from reference_trainers.common.config_cli import dataclass_parser
from reference_trainers.common.config_cli import parse_config as parse_dataclass
from reference_trainers.common.schedules import warmup_constant, warmup_cosine

METHODS = ("drifting", "mmd", "gan")


@dataclass
class DigitsConfig:
    method: str = "drifting"     # "drifting" (driftloss), "mmd" (App. C.2 baseline) or "gan" (non-saturating)
    # data: scikit-learn's bundled 8x8 digits, split once (stratified) by split_seed (digits_data.py)
    split_seed: int = 0
    # generator: [noise, class embedding, alpha embedding] -> MLP (3 hidden SiLU layers) -> 8x8 image
    noise_dim: int = 32
    hidden: int = 256
    class_dim: int = 32
    alpha_dim: int = 16
    init_spread: float = 0.5     # initial std of the pixels over the noise (Generator.spread_outputs)
    # optimization (the same for every method: steps and batch are the comparison's budget)
    steps: int = 1000
    classes_per_step: int = 10   # kernel problems per step (one per class); <10 draws a random subset
    n_gen: int = 32              # generated samples per class per step (also the negatives)
    n_pos: int = 32              # real samples of the class per step
    n_uncond: int = 16           # unconditional real samples (any class) per class per step (guidance)
    lr: float = 1e-3
    lr_schedule: str = "cosine"  # "cosine" (to 0 at `steps`, after `warmup`) or "constant"
    warmup: int = 50
    ema_decay: float = 0.995
    seed: int = 0
    # guidance (A.7): alpha ~ p(alpha) ∝ alpha^-alpha_power on [1, alpha_max], a fraction at exactly 1
    alpha_power: float = 3.0
    alpha_max: float = 4.0
    alpha_one_fraction: float = 0.0
    # drifting loss
    taus: tuple[float, ...] = (0.02, 0.05, 0.2)
    patch_sizes: tuple[int, ...] = (2,)  # patch mean/std groups of each encoder map (A.5 uses 2 and 4)
    stage1_loc: bool = False     # also drift stage1's 64 per-location vectors (digits_features.py; slower)
    # MMD baseline: kernel on features divided by the group's mean distance; bandwidths in those units
    mmd_kernel: str = "gaussian"  # "gaussian" exp(-d^2 / (2 h^2)) or "laplace" exp(-d / h), summed over h
    mmd_bandwidths: tuple[float, ...] = (0.2, 0.5, 1.0, 2.0)
    # GAN baseline: projection discriminator (MLP on pixels); DCGAN's Adam settings for both players
    gan_lr: float = 2e-4
    gan_beta1: float = 0.5
    disc_hidden: int = 256
    # pre-trained networks, cached on local disk (trained here from the digits, never downloaded)
    encoder_path: str = "runs/digits_cache/encoder.pt"
    classifier_path: str = "runs/digits_cache/eval_classifier.pt"
    encoder_steps: int = 600
    classifier_steps: int = 800
    # evaluation and output
    eval_per_class: int = 200
    eval_alphas: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0)
    grid_columns: int = 12
    log_every: int = 50
    checkpoint_every: int = 0    # 0: only at the end
    out: str = "runs/digits"
    resume: str = ""
    stop_at: int = 0             # stop (and checkpoint) after this step, as if interrupted; 0: run to `steps`
    evaluate: bool = True
    plots: bool = True
    progress: bool = True
    threads: int = 2             # torch intra-op threads; use 1 where the cores are already busy (2 threads
                                 # contending with other jobs ran the encoder pre-training 20x slower)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {self.method!r}")
        if not 1 <= self.classes_per_step <= 10:
            raise ValueError(f"classes_per_step must be in 1..10; got {self.classes_per_step}")


def learning_rate(base: float, cfg: DigitsConfig, step: int) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warmup, then cosine to 0 (or constant)."""
    if cfg.lr_schedule == "constant":
        return warmup_constant(base, step, cfg.warmup)
    return warmup_cosine(base, step, cfg.steps, cfg.warmup)


def build_parser(description: str) -> argparse.ArgumentParser:
    """argparse parser with one flag per DigitsConfig field; unset flags are absent from the result."""
    return dataclass_parser(DigitsConfig, description)


def parse_config(argv: list[str] | None, description: str = "") -> DigitsConfig:
    """Defaults <- CLI flags (the trainer handles --resume's checkpoint base)."""
    return parse_dataclass(DigitsConfig, argv, description)
