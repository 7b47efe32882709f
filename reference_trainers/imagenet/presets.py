"""The ImageNet 256x256 recipes of the paper's Table 8 as one dataclass, plus two tiny presets for the CPU.

    preset = get_preset("latent-b2")
    preset = dataclasses.replace(get_preset("latent-tiny"), steps=10)    # any field can be overridden

Sources: Table 8 and appendices A.2-A.8 of "Generative Modeling via Drifting" (arXiv 2602.04770), see
docs/imagenet_recipe.md. Where the paper and the authors' released configs disagree the paper's value is the
default and the field can take the other one (each such field says so in its comment):
  - encoder block type: Table 8 says "bottleneck", A.3 and Table 3 (and the release) basic blocks -> "basic";
  - N_pos of latent-b2: Table 8 gives 128, the release 64;
  - EMA: the paper lists four decays for the system presets, the release keeps one (0.999);
  - warmup: linear from 0 here; the release starts from 1e-6 (``warmup_start``).
Columns: ablation (B/2, 100 epochs) | latent-b2 | latent-l2 | pixel-b16 | pixel-l16.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_TAUS = (0.02, 0.05, 0.2)


@dataclass(frozen=True)
class Preset:
    name: str
    # --- data: what the generator produces and the encoder reads ---------------------------------------
    space: str                      # "latent": SD-VAE latents [4, 32, 32] x 0.18215; "pixel": images
    image_size: int = 256           # the images' side (the VAE's input for latent presets)
    channels: int = 4               # generator output channels: 4 (latent) or 3 (pixel)
    size: int = 32                  # generator output side: 32 (latent) or image_size (pixel)
    num_classes: int = 1000
    # --- generator (A.2): DiT-style transformer, SwiGLU, RoPE, RMSNorm, QK-norm, adaLN-zero --------------
    patch_size: int = 2
    hidden: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 8 / 3       # SwiGLU hidden = mlp_ratio * hidden rounded up to a multiple of 32
    register_tokens: int = 16       # in-context tokens: projected condition + learned embeddings
    style_tokens: int = 32          # random style indices, each into its own table ...
    style_codebook: int = 64        # ... of 64 learned vectors, summed into the condition
    # --- feature encoder (A.3): ResNet, GroupNorm, [3, 4, 6, 3] blocks, MAE-pretrained -------------------
    encoder_width: int = 640        # base width C: stages C, 2C, 4C, 8C
    encoder_blocks: tuple[int, ...] = (3, 4, 6, 3)
    encoder_block: str = "basic"    # A.3 / Table 3; Table 8 says "bottleneck"
    encoder_patch: int = 1          # 1: stride-1 stem on latents; 8: 8x8 patchify of pixels (32x32x192)
    mae_mask_ratio: float = 0.5     # 2x2 patches of the 32x32 grid zeroed at this rate
    mae_lr: float = 4e-3
    mae_batch: int = 8192
    mae_ema: float = 0.9995
    mae_warmup: int = 4000
    mae_steps: int = 200_000        # 1280 epochs (the ablation's encoder: 192 epochs, 30k steps)
    cls_finetune_steps: int = 3000  # the last steps of pretraining add classification (0: none)
    cls_weight: float = 0.1         # lambda of lambda*CE + (1-lambda)*recon, ramped from 0 ...
    cls_ramp_steps: int = 1000      # ... over these steps
    convnext: str = ""              # pixel presets also drift in ConvNeXt-V2 features (timm model name)
    augment: bool = True            # pixel presets: random resized crop (0.2-1) + flip of the images
    # --- optimizer and schedule ---------------------------------------------------------------------------
    lr: float = 4e-4
    betas: tuple[float, ...] = (0.9, 0.95)
    weight_decay: float = 0.01
    warmup_steps: int = 10_000      # linear warmup, then constant
    warmup_start: float = 0.0       # the release warms up from 1e-6
    grad_clip: float = 2.0          # global norm
    steps: int = 200_000
    ema_decays: tuple[float, ...] = (0.999, 0.9995, 0.9998, 0.9999)   # the release: (0.999,)
    # --- batch (A.7, A.8) --------------------------------------------------------------------------------
    n_classes: int = 128            # N_c classes per step
    n_pos: int = 128                # N_pos real samples per class
    n_neg: int = 64                 # N_neg generated samples per class (also the negatives)
    n_unc: int = 32                 # N_unc unconditional real samples per class (guidance negatives)
    queue_per_class: int = 128      # A.8 sample queue
    queue_uncond: int = 1000
    queue_push: int = 128           # newest real samples pushed per step
    # --- drifting loss and guidance -----------------------------------------------------------------------
    taus: tuple[float, ...] = DEFAULT_TAUS
    alpha_min: float = 1.0
    alpha_max: float = 4.0
    alpha_power: float = 5.0        # p(alpha) ∝ alpha^-k on [alpha_min, alpha_max]
    alpha_one_fraction: float = 0.0  # share of classes trained at alpha = 1 exactly
    eval_alpha: float = 1.0         # the best alpha of the paper's sweep
    eval_alphas: tuple[float, ...] = (1.0, 1.1, 1.2, 1.4, 1.6, 1.8, 2.0, 2.5, 3.0, 3.5)

    @property
    def tokens(self) -> int:
        """Patch tokens of the generator: (size / patch_size)^2."""
        return (self.size // self.patch_size) ** 2

    @property
    def batch_size(self) -> int:
        """Generated samples per step, N_c * N_neg."""
        return self.n_classes * self.n_neg


_LATENT = dict(space="latent", channels=4, size=32, patch_size=2, encoder_patch=1)
_PIXEL = dict(space="pixel", channels=3, size=256, patch_size=16, encoder_patch=8,
              convnext="convnextv2_base")

PRESETS: dict[str, Preset] = {
    p.name: p for p in [
        Preset("ablation", **_LATENT, encoder_width=256, mae_steps=30_000, cls_finetune_steps=0,
               lr=2e-4, warmup_steps=5000, steps=30_000, ema_decays=(0.999,), n_classes=64, n_pos=64,
               n_unc=16, queue_push=64, alpha_power=3.0, eval_alpha=2.0,
               eval_alphas=(1.0, 1.5, 2.0, 2.5, 3.0, 3.5)),
        Preset("latent-b2", **_LATENT, weight_decay=0.0, n_pos=128,  # the release: n_pos=64
               queue_push=64, eval_alpha=1.1),
        Preset("latent-l2", **_LATENT, hidden=1024, depth=24, heads=16, n_pos=64, queue_push=64,
               alpha_power=3.0, alpha_one_fraction=0.5, eval_alpha=1.0),
        Preset("pixel-b16", **_PIXEL, lr=2e-4, steps=100_000),
        Preset("pixel-l16", **_PIXEL, hidden=1024, depth=24, heads=16, steps=100_000),
        # Tiny presets: the same code paths, sized for a step in seconds on 2 CPU cores (tests, smoke runs).
        Preset("latent-tiny", **_LATENT, num_classes=10, hidden=64, depth=2, heads=2, register_tokens=4,
               style_tokens=4, style_codebook=8, encoder_width=8, encoder_blocks=(2, 2, 2, 2),
               mae_batch=16, mae_warmup=2, mae_steps=20,
               cls_finetune_steps=4, cls_ramp_steps=2, lr=1e-3, warmup_steps=2, steps=20,
               ema_decays=(0.9, 0.99), n_classes=2, n_pos=8, n_neg=8, n_unc=4, queue_per_class=16,
               queue_uncond=32, queue_push=8, alpha_power=3.0, eval_alphas=(1.0, 2.0)),
        Preset("pixel-tiny", space="pixel", image_size=64, channels=3, size=64, patch_size=4, encoder_patch=2,
               convnext="convnextv2_atto", num_classes=10, hidden=64, depth=2, heads=2, register_tokens=4,
               style_tokens=4, style_codebook=8, encoder_width=8, encoder_blocks=(2, 2, 2, 2),
               mae_batch=16, mae_warmup=2, mae_steps=20,
               cls_finetune_steps=4, cls_ramp_steps=2, lr=1e-3, warmup_steps=2, steps=20,
               ema_decays=(0.9, 0.99), n_classes=2, n_pos=8, n_neg=8, n_unc=4, queue_per_class=16,
               queue_uncond=32, queue_push=8, alpha_power=3.0, eval_alphas=(1.0, 2.0)),
        # scikit-learn's 8x8 digits as 16x16 RGB images (digits_pipeline.py): the pixel path, 16 tokens of 4x4
        # pixels, the encoder on its smallest grid (16x16, encoder_patch 1), no ConvNeXt; sized for ~15 min
        # end to end on one busy CPU core (the 16x16 per-location drifting groups dominate a step; N_c = 5
        # classes per step buys twice the steps of N_c = 10 in the same time).
        Preset("digits-pixel", space="pixel", image_size=16, channels=3, size=16, patch_size=4,
               encoder_patch=1, convnext="", augment=False, num_classes=10, hidden=96, depth=3, heads=4,
               register_tokens=4, style_tokens=8, style_codebook=16, encoder_width=8,
               encoder_blocks=(1, 1, 1, 1), mae_lr=2e-3, mae_batch=128, mae_ema=0.99, mae_warmup=30,
               mae_steps=200, cls_finetune_steps=70, cls_ramp_steps=30, lr=1e-3, warmup_steps=50,
               steps=1200, ema_decays=(0.995,), n_classes=5, n_pos=24, n_neg=24, n_unc=12,
               queue_per_class=64, queue_uncond=256, queue_push=64, alpha_power=3.0, eval_alpha=3.0,
               eval_alphas=(1.0, 1.5, 2.0, 3.0, 4.0)),
    ]
}
SYSTEM_PRESETS = ("latent-b2", "latent-l2", "pixel-b16", "pixel-l16")


def get_preset(name: str, **overrides) -> Preset:
    """The named preset, with any fields in ``overrides`` replaced; a clear error for unknown names."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def preset_with_overrides(preset: Preset, assignments: Sequence[str]) -> Preset:
    """``preset`` with "FIELD=VALUE" assignments applied (values parsed by the field's type; tuples
    comma-separated, e.g. "ema_decays=0.999,0.9999"); clear errors for unknown fields or bad values."""
    hints = typing.get_type_hints(Preset)
    changes = {}
    for item in assignments:
        field, sep, text = item.partition("=")
        if not sep or field not in hints or field == "name":
            known = ", ".join(f.name for f in dataclasses.fields(Preset) if f.name != "name")
            raise ValueError(f"preset override {item!r}: expected FIELD=VALUE with FIELD one of {known}")
        kind = hints[field]
        try:
            if typing.get_origin(kind) is tuple:
                item_type = typing.get_args(kind)[0]
                changes[field] = tuple(item_type(v) for v in text.split(",") if v)
            else:
                changes[field] = kind(text)
        except ValueError as e:
            raise ValueError(f"preset override {item!r}: {text!r} is not a valid {kind}") from e
    return dataclasses.replace(preset, **changes)
