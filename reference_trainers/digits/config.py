"""The digits trainers' configuration: one dataclass holds every default; the CLI is generated from it.

    cfg = parse_config(["--method", "gan", "--steps", "500"])

Every field becomes ``--field-name`` with its help text, choices and bounds from ``option()`` (checked on
the command line and for configs built in code); tuples take several values, booleans get ``--x/--no-x``.
When resuming (``--resume PATH``) the checkpoint's config is the base and only the flags given on the
command line override it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from reference_trainers.common.config_cli import check_fields, dataclass_parser, option
from reference_trainers.common.config_cli import parse_config as parse_dataclass
from reference_trainers.common.schedules import warmup_constant, warmup_cosine

METHODS = ("drifting", "mmd", "gan")


@dataclass
class DigitsConfig:
    method: str = option("drifting", '"drifting" (driftloss), "mmd" (App. C.2 baseline) or "gan" '
                         "(non-saturating)", choices=METHODS)
    split_seed: int = option(0, "seed of the one stratified split of scikit-learn's bundled 8x8 digits "
                             "(digits/data.py)", ge=0, section="data")
    noise_dim: int = option(32, "generator noise dimension", ge=1,
                            section="generator: [noise, class embedding, alpha embedding] -> MLP "
                                    "(3 hidden SiLU layers) -> 8x8 image")
    hidden: int = option(256, "width of the hidden layers", ge=1)
    class_dim: int = option(32, "class embedding dimension", ge=1)
    alpha_dim: int = option(16, "guidance-scale embedding dimension", ge=1)
    init_spread: float = option(0.5, "initial std of the pixels over the noise (Generator.spread_outputs)",
                                gt=0)
    steps: int = option(1000, "optimizer steps", ge=1,
                        section="optimization (the same for every method: steps and batch are the "
                                "comparison's budget)")
    classes_per_step: int = option(10, "kernel problems per step (one per class); < 10 draws a random subset",
                                   ge=1, le=10)
    n_gen: int = option(32, "generated samples per class per step (also the negatives)", ge=2)
    n_pos: int = option(32, "real samples of the class per step", ge=1)
    n_uncond: int = option(16, "unconditional real samples (any class) per class per step (guidance)", ge=1)
    lr: float = option(1e-3, "Adam learning rate of the generator", gt=0)
    lr_schedule: str = option("cosine", '"cosine" (to 0 at --steps, after --warmup) or "constant"',
                              choices=("cosine", "constant"))
    warmup: int = option(50, "linear warmup steps", ge=0)
    ema_decay: float = option(0.995, "decay of the EMA of the generator's weights (the EMA is evaluated)",
                              ge=0, lt=1)
    seed: int = option(0, "seed of the weights, the batches and the evaluation noise", ge=0)
    alpha_power: float = option(3.0, "k of p(alpha) ∝ alpha^-k", ge=0,
                                section="guidance (A.7): alpha ~ p(alpha) ∝ alpha^-k on [1, alpha_max], "
                                        "a fraction at exactly 1")
    alpha_max: float = option(4.0, "largest guidance scale trained", ge=1)
    alpha_one_fraction: float = option(0.0, "fraction of classes per step trained at alpha = 1", ge=0, le=1)
    taus: tuple[float, ...] = option((0.02, 0.05, 0.2), "temperatures, relative to each group's mean "
                                     "distance", gt=0, section="drifting loss")
    patch_sizes: tuple[int, ...] = option((2,), "patch mean/std groups of each encoder map (A.5 uses 2 "
                                          "and 4)", ge=1)
    stage1_loc: bool = option(False, "also drift stage1's 64 per-location vectors (digits/features.py; "
                              "slower)")
    mmd_kernel: str = option("gaussian", '"gaussian" exp(-d^2 / (2 h^2)) or "laplace" exp(-d / h), summed '
                             "over the bandwidths h", choices=("gaussian", "laplace"),
                             section="MMD baseline: kernel on features divided by the group's mean distance")
    mmd_bandwidths: tuple[float, ...] = option((0.2, 0.5, 1.0, 2.0), "bandwidths h, in units of the mean "
                                               "distance", gt=0)
    gan_lr: float = option(2e-4, "Adam learning rate of both players", gt=0,
                           section="GAN baseline: projection discriminator (MLP on pixels); DCGAN's Adam "
                                   "settings for both players")
    gan_beta1: float = option(0.5, "Adam beta1 of both players", ge=0, lt=1)
    disc_hidden: int = option(256, "width of the discriminator's hidden layers", ge=1)
    encoder_path: str = option("runs/digits_cache/encoder.pt", "feature encoder (pre-trained on first use)",
                               section="pre-trained networks, cached on local disk (trained here from the "
                                       "digits, never downloaded)")
    classifier_path: str = option("runs/digits_cache/eval_classifier.pt", "evaluation classifier "
                                  "(trained on first use)")
    encoder_steps: int = option(600, "pre-training steps of the encoder", ge=1)
    classifier_steps: int = option(800, "training steps of the evaluation classifier", ge=1)
    eval_per_class: int = option(200, "generated digits per class for FD-digits and accuracy", ge=2,
                                 section="evaluation and output")
    eval_alphas: tuple[float, ...] = option((1.0, 1.5, 2.0, 3.0, 4.0), "guidance scales evaluated (the "
                                            "FD-vs-alpha curve)", ge=1)
    grid_columns: int = option(12, "samples per class in the sample grids", ge=1, le="eval_per_class")
    log_every: int = option(50, "steps between log lines", ge=1)
    checkpoint_every: int = option(0, "steps between checkpoints; 0: only at the end", ge=0)
    out: str = option("runs/digits", "output folder")
    resume: str = option("", "checkpoint to resume from: its config is the base, the flags given now "
                         "override it")
    stop_at: int = option(0, "stop (and checkpoint) after this step, as if interrupted; 0: run to --steps",
                          ge=0, le="steps")
    evaluate: bool = option(True, "score the EMA generator at the end (FD-digits, accuracy per alpha)")
    plots: bool = option(True, "write fd_vs_alpha.png, the sample grids and curves.png")
    progress: bool = option(True, "show a progress bar")
    threads: int = option(2, "torch intra-op threads; use 1 where the cores are already busy (2 threads "
                          "contending with other jobs ran the encoder pre-training 20x slower)", ge=1)

    def __post_init__(self):
        check_fields(self)


def learning_rate(base: float, cfg: DigitsConfig, step: int) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warmup, then cosine to 0 (or constant)."""
    if cfg.lr_schedule == "constant":
        return warmup_constant(base, step, cfg.warmup)
    return warmup_cosine(base, step, cfg.steps, cfg.warmup)


def build_parser(description: str, prog: str | None = None, skip: tuple[str, ...] = ()
                 ) -> argparse.ArgumentParser:
    """argparse parser with one flag per DigitsConfig field but ``skip`` (help, choices and bounds from
    the field's option()); unset flags are absent from the result; a bad value is a usage error naming
    the flag."""
    return dataclass_parser(DigitsConfig, description, prog, skip)


def parse_config(argv: list[str] | None, description: str = "") -> DigitsConfig:
    """Defaults <- CLI flags (the trainer handles --resume's checkpoint base)."""
    return parse_dataclass(DigitsConfig, argv, description)
