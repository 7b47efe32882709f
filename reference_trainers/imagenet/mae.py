"""MAE pretraining of the feature encoder (A.3): masked 2x2 patches, a U-Net decoder, and a class head.

    mae = MAE(preset)                                        # encoder + decoder + linear class head
    mask = random_mask(n, mae.grid, preset.mae_mask_ratio, generator)   # [n, 1, 32, 32], 1 = masked
    loss, logs = mae.loss(x, mask, labels, cls_weight=lam)   # (1 - lam) * masked L2 + lam * CE

Masking: the encoder's 32x32 grid (latents; pixels after the 8x8 patchify, i.e. 8x8-pixel cells) is cut
into 2x2 patches and each patch is zeroed independently with probability ``mae_mask_ratio`` (0.5). The
reconstruction loss is the squared error averaged over the masked elements only (all channels of the
masked cells). The class head (fine-tuning, the last ``cls_finetune_steps`` steps of pretraining) is a
linear layer on the globally averaged last map of the *masked* input: masking is kept while fine-tuning.

Decoder (U-Net, shapes for C = encoder_width on a 32x32 grid):

    mid   3x3 conv + GN + ReLU on f4                                    [n, 8C, 4, 4]
    up1   bilinear x2 -> concat f3 -> GN -> 2 x [3x3 conv, GN, ReLU]     [n, 4C, 8, 8]
    up2   bilinear x2 -> concat f2 -> ...                                [n, 2C, 16, 16]
    up3   bilinear x2 -> concat f1 -> ...                                [n, C, 32, 32]
    up4   (same size) -> concat the stem output -> ...                   [n, C, 32, 32]
    head  1x1 conv to the encoder's input channels (4, or 192 = 3*8*8 unpatchified to [n, 3, 256, 256])

Each up block's width is that of its skip. See docs/imagenet_recipe.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reference_trainers.imagenet.encoder import ResNetEncoder, conv3x3, group_norm, initialize_weights
from reference_trainers.imagenet.presets import Preset

MASK_PATCH = 2  # the masked unit: 2x2 cells of the encoder's grid


def random_mask(n: int, grid: int, ratio: float, generator: torch.Generator | None = None,
                patch: int = MASK_PATCH) -> torch.Tensor:
    """[n, 1, grid, grid] float mask on the generator's device: each ``patch`` x ``patch`` block is 1
    (masked) with probability ``ratio``, independently, else 0."""
    if grid % patch:
        raise ValueError(f"random_mask: grid {grid} is not a multiple of the mask patch {patch}")
    device = generator.device if generator is not None else "cpu"
    cells = torch.rand(n, 1, grid // patch, grid // patch, generator=generator, device=device) < ratio
    return expand_mask(cells.float(), patch)


def expand_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Each cell of mask [n, 1, h, w] repeated to a factor x factor block: [n, 1, h*factor, w*factor]."""
    if factor == 1:
        return mask
    return mask.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


def masked_l2(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of squared errors over masked elements, number of masked elements) for pred, target
    [n, C, H, W] and mask [n, 1, H, W] (1 = masked); the masked mean is their ratio."""
    mask = mask.float()  # float32 sums, also under bf16 autocast
    err = (pred.float() - target.float()).square() * mask
    return err.sum(), mask.sum() * pred.shape[1]


def cls_weight_at(step: int, total_steps: int, cls_steps: int, cls_weight: float, ramp_steps: int) -> float:
    """lambda of optimizer step ``step`` (1-based) of ``total_steps``: 0 before the last ``cls_steps``
    steps; then cls_weight * min(1, k / ramp_steps) at the k-th fine-tuning step (k = 1, 2, ...)."""
    start = total_steps - cls_steps  # the last step without classification
    if cls_steps <= 0 or step <= start:
        return 0.0
    return cls_weight * min(1.0, (step - start) / max(ramp_steps, 1))


class ConvGNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(conv3x3(cin, cout), group_norm(cout), nn.ReLU(inplace=True))


class UpBlock(nn.Module):
    """Bilinear upsampling to the skip's size, concat the skip, GN, 2 x [3x3 conv, GN, ReLU]."""

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.norm = group_norm(cin + cskip)
        self.convs = nn.Sequential(ConvGNReLU(cin + cskip, cout), ConvGNReLU(cout, cout))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != skip.shape[-2:]:
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.convs(self.norm(torch.cat([x, skip], dim=1)))


class MAEDecoder(nn.Module):
    """U-Net decoder over the encoder's [stem, f1, f2, f3, f4]: -> [n, in_channels, g, g] (see module doc)."""

    def __init__(self, encoder: ResNetEncoder):
        super().__init__()
        w1, w2, w3, w4 = encoder.widths
        self.mid = ConvGNReLU(w4, w4)
        self.up1 = UpBlock(w4, w3, w3)
        self.up2 = UpBlock(w3, w2, w2)
        self.up3 = UpBlock(w2, w1, w1)
        self.up4 = UpBlock(w1, w1, w1)   # the stem's output, at the same resolution as f1
        self.head = nn.Conv2d(w1, encoder.in_channels, 1)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        stem, f1, f2, f3, f4 = maps
        h = self.mid(f4)
        h = self.up1(h, f3)
        h = self.up2(h, f2)
        h = self.up3(h, f1)
        h = self.up4(h, stem)
        return self.head(h)


class MAE(nn.Module):
    """The ResNet encoder, its U-Net decoder and a linear class head on the pooled last map.

    ``forward(x, mask, with_logits)`` -> (reconstruction [n, channels, size, size], logits [n, K] or None),
    with x [n, channels, size, size] and mask [n, 1, grid, grid] (1 = zeroed; grid = size / encoder_patch).
    """

    def __init__(self, preset: Preset, seed: int = 0):
        super().__init__()
        self.encoder = ResNetEncoder(preset)
        self.decoder = MAEDecoder(self.encoder)
        self.head = nn.Linear(self.encoder.out_channels, preset.num_classes)
        self.unpatchify = nn.PixelShuffle(preset.encoder_patch) if preset.encoder_patch > 1 else nn.Identity()
        self.patch = preset.encoder_patch
        self.grid = self.encoder.grid
        self.mask_ratio = preset.mae_mask_ratio
        initialize_weights(self, seed)
        if not self.decoder.head.weight.is_meta:  # near-zero first reconstructions
            nn.init.normal_(self.decoder.head.weight, std=0.02,
                            generator=torch.Generator(self.decoder.head.weight.device).manual_seed(seed))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, with_logits: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        visible = x * (1.0 - expand_mask(mask, self.patch).to(x.dtype))
        maps = self.encoder.features(visible)
        recon = self.unpatchify(self.decoder(maps))
        logits = self.head(maps[-1].mean(dim=(2, 3))) if with_logits else None
        return recon, logits

    def loss_terms(self, x: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None = None
                   ) -> dict[str, torch.Tensor]:
        """Sums of one (micro-)batch, to be combined over micro-batches: recon_sum / recon_count is the
        masked L2; with labels also ce_sum (cross-entropy summed over samples) and correct."""
        recon, logits = self(x, mask, with_logits=labels is not None)
        recon_sum, recon_count = masked_l2(recon, x, expand_mask(mask, self.patch))
        terms = {"recon_sum": recon_sum, "recon_count": recon_count}
        if logits is not None:
            logits = logits.float()
            terms["ce_sum"] = F.cross_entropy(logits, labels, reduction="sum")
            terms["correct"] = (logits.argmax(1) == labels).sum()
        return terms

    def loss(self, x: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None = None,
             cls_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
        """(1 - cls_weight) * masked L2 + cls_weight * mean CE (CE only when cls_weight > 0 and labels are
        given) on one batch; returns (loss, {"recon", "ce", "acc"} as floats)."""
        use_cls = cls_weight > 0 and labels is not None
        terms = self.loss_terms(x, mask, labels if use_cls else None)
        loss, logs = combine_terms(terms, cls_weight, float(terms["recon_count"]), x.shape[0])
        return loss, {k: v.item() for k, v in logs.items()}


def combine_terms(terms: dict[str, torch.Tensor], cls_weight: float, recon_count: float, batch: int
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of loss_terms' sums normalized by the *whole* batch's masked-element count and size, so
    the losses of a batch's micro-batches add up to the batch's loss. Returns (loss, {"recon", "ce", "acc"}:
    this part's shares, detached)."""
    recon = terms["recon_sum"] / max(recon_count, 1.0)
    logs = {"recon": recon.detach()}
    if "ce_sum" not in terms:
        return recon, logs
    ce = terms["ce_sum"] / batch
    logs.update(ce=ce.detach(), acc=terms["correct"].detach() / batch)
    return (1.0 - cls_weight) * recon + cls_weight * ce, logs
