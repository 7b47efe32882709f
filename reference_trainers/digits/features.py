"""The drifting objective of the digits trainer: feature-space drifting with guidance (§3.4, §3.5, A.5, A.7).

Feature groups (driftloss.adapters.torch_features.encoder_groups on the frozen FeatureEncoder), with
the default patch_sizes (2,):
  stage1 (8x8x16): mean, std, mean_2, std_2 (16 2x2 patches)
  stage2 (4x4x32): loc (16 locations), mean, std, mean_2, std_2 (4 patches)
  stage3 (2x2x64): loc (4 locations), mean, std
  global (the 64 raw pixels)
Left out: patch groups that cover the whole map (copies of mean/std), the "input" group (the RMS of a
single grey channel says little) and stage1.loc (64 locations: the largest cost on 2 CPU cores, while its
2x2 patches keep most of the resolution; --stage1-loc adds it). Each group is one drifting loss.
Each group is [G, n, L, C]: the G classes x L locations are the independent kernel problems.
"""

from __future__ import annotations

import torch
from driftloss.adapters.torch_features import FeatureTaps, encoder_groups
from torch import nn

import driftloss
from reference_trainers.digits.config import DigitsConfig
from reference_trainers.digits.data import StepBatch
from reference_trainers.digits.models import ENCODER_TAPS

Groups = dict[str, torch.Tensor]


def _whole_map_patch(name: str, group: torch.Tensor, maps: dict[str, int]) -> bool:
    """True for "<map>.mean_p"/".std_p" groups whose single patch is the whole map."""
    stem, _, kind = name.rpartition(".")
    return stem in maps and "_" in kind and int(kind.split("_")[1]) == maps[stem]


class FeatureSpace:
    """images [..., n, 1, 8, 8] -> feature groups name -> [..., n, L, C] (gradients reach the images)."""

    def __init__(self, encoder: nn.Module, patch_sizes: tuple[int, ...] = (2,), stage1_loc: bool = False):
        self.taps = FeatureTaps(encoder, ENCODER_TAPS)
        self.sizes = {"stage1": 8, "stage2": 4, "stage3": 2}
        self.patch_sizes, self.stage1_loc = tuple(patch_sizes), stage1_loc

    def __call__(self, images: torch.Tensor) -> Groups:
        groups = encoder_groups(self.taps, images, patch_sizes=self.patch_sizes, with_input=False)
        return {k: v for k, v in groups.items()
                if not _whole_map_patch(k, v, self.sizes) and (self.stage1_loc or k != "stage1.loc")}


def guidance_weight(alpha: torch.Tensor, n_gen: int, n_uncond: int) -> torch.Tensor:
    """alpha [G] -> weight of each unconditional negative [G, M]: (alpha - 1)(N - 1)/M (A.7)."""
    return driftloss.cfg_weight(alpha, n_gen, n_uncond)[:, None].expand(-1, n_uncond)


class DriftingObjective:
    """loss = sum over feature groups of driftloss.drifting_loss(gen, pos, uncond; neg_weight=w(alpha))."""

    def __init__(self, cfg: DigitsConfig, encoder: nn.Module):
        self.cfg = cfg
        self.features = FeatureSpace(encoder, cfg.patch_sizes, cfg.stage1_loc)

    def generator_loss(self, fake: torch.Tensor, batch: StepBatch, alpha: torch.Tensor,
                       lr_scale: float) -> tuple[torch.Tensor, dict]:
        """fake [G, N, 1, 8, 8] (with grad); batch.pos [G, P, 1, 8, 8], batch.uncond [G, M, 1, 8, 8];
        alpha [G] (the guidance scale of each class's problem).

        Returns the loss and diagnostics: energy_distance (stats["energy_distance"], the progress
        curve) averaged over groups and of the raw-pixel group (energy_distance_global), drift_rms [T]
        averaged over groups, drift_rms_global [T] (the raw-pixel group), and the loss of the global group.
        """
        gen_g = self.features(fake)
        with torch.no_grad():
            pos_g, neg_g = self.features(batch.pos), self.features(batch.uncond)
        w = guidance_weight(alpha, fake.shape[1], batch.uncond.shape[1])
        loss, stats = driftloss.drifting_loss_groups(gen_g, pos_g, neg_g, taus=self.cfg.taus, neg_weight=w,
                                                     return_stats=True)
        rms = torch.stack([s["drift_rms"] for s in stats.values()])  # [groups, T]
        energy = torch.stack([s["energy_distance"] for s in stats.values()])  # [groups]
        return loss, {"energy_distance": energy.mean().item(),
                      "energy_distance_global": stats["global"]["energy_distance"].item(),
                      "drift_rms": rms.mean(0).tolist(),
                      "drift_rms_global": stats["global"]["drift_rms"].tolist(),
                      "loss_global": stats["global"]["loss"].item()}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
