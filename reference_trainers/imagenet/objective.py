"""The drifting objective of the ImageNet trainers: feature-space drifting with guidance (§3.4-3.5, A.5-A.7).

For each class problem g (N generated, P positives, M unconditional real samples):
  groups = every tapped map of each frozen feature encoder -> per-location, mean/std, 2x2 and 4x4 patch
           mean/std groups; plus the encoder input's per-channel RMS ("input") and the raw sample ("global")
  loss   = sum over groups of driftloss.drifting_loss(gen, pos, uncond; neg_weight = w(alpha_g))
with w(alpha) = (alpha - 1)(N - 1)/M (driftloss.cfg_weight). Positives and unconditional samples are encoded
without gradient; the generated samples carry it through the encoders into the generator.
See docs/imagenet_recipe.md.
"""

from __future__ import annotations

import torch
from driftloss.adapters.torch_features import FeatureTaps, encoder_groups
from torch import nn

import driftloss

Groups = dict[str, torch.Tensor]
PATCH_SIZES = (2, 4)


class FeatureObjective:
    """loss(fake [G, N, C, S, S], pos [G, P, C, S, S], uncond [G, M, C, S, S], alpha [G]) -> (loss, stats).

    ``encoders``: name -> frozen nn.Module (e.g. {"resnet": MAE encoder, "convnext": ConvNeXt-V2});
    each is tapped by FeatureTaps' defaults (every second block and each stage end). The first encoder
    also gives the "input" and "global" groups. stats: {group: {loss, drift_rms [T], energy_distance,
    ...}} as returned by driftloss.drifting_loss_groups.
    """

    def __init__(self, encoders: dict[str, nn.Module], taus: tuple[float, ...]):
        if not encoders:
            raise ValueError("FeatureObjective: give at least one feature encoder")
        for enc in encoders.values():
            enc.eval().requires_grad_(False)
        self.taps = {name: FeatureTaps(enc) for name, enc in encoders.items()}
        self.taus = tuple(taus)

    def groups(self, images: torch.Tensor) -> Groups:
        """images [..., n, C, S, S] -> name -> [..., n, L, C'] (float32 or wider)."""
        out: Groups = {}
        for i, (name, taps) in enumerate(self.taps.items()):
            groups = encoder_groups(taps, images, patch_sizes=PATCH_SIZES, with_input=i == 0,
                                    with_global=i == 0)
            out.update({k if k in ("input", "global") else f"{name}.{k}": v for k, v in groups.items()})
        return out

    def loss(self, gen_g: Groups, pos_g: Groups, neg_g: Groups, alpha: torch.Tensor, n_gen: int
             ) -> tuple[torch.Tensor, dict]:
        """The summed drifting loss of the groups: gen/pos/neg name -> [G, n, L, C]; alpha [G]."""
        G, M = alpha.shape[0], next(iter(neg_g.values())).shape[1]
        weight = driftloss.cfg_weight(alpha.float(), n_gen, M)[:, None].expand(G, M)   # [G, M]
        return driftloss.drifting_loss_groups(gen_g, pos_g, neg_g, taus=self.taus, neg_weight=weight,
                                              return_stats=True)

    def __call__(self, fake: torch.Tensor, pos: torch.Tensor, uncond: torch.Tensor,
                 alpha: torch.Tensor) -> tuple[torch.Tensor, dict]:
        G = fake.shape[0]
        if pos.shape[0] != G or uncond.shape[0] != G or alpha.shape != (G,):
            raise ValueError(
                f"FeatureObjective: fake {tuple(fake.shape)}, pos {tuple(pos.shape)}, uncond "
                f"{tuple(uncond.shape)} and alpha {tuple(alpha.shape)} must share the class dim G={G}")
        gen_g = self.groups(fake)
        with torch.no_grad():
            pos_g, neg_g = self.groups(pos), self.groups(uncond)
        return self.loss(gen_g, pos_g, neg_g, alpha, fake.shape[1])
