"""The baselines of the digits comparison: an MMD generator (App. C.2) and a non-saturating GAN.

Both train the same Generator with the same steps and batch as drifting, without guidance (alpha = 1).

MMD: per feature group of the same frozen encoder as drifting (digits_features.FeatureSpace, the raw
pixels included), with the G classes x L locations as independent problems, the unbiased MMD^2 between
the N generated and P real vectors,
    MMD^2 = mean_{i!=j} k(x_i, x_j) + mean_{i!=j} k(y_i, y_j) - 2 mean_{i,j} k(x_i, y_j),
with k(x, y) = sum_h exp(-d^2 / (2 h^2)) ("gaussian", default) or sum_h exp(-d / h) ("laplace"),
d = |x - y| / S, S the group's mean generated-to-real distance (no gradient; as drifting's scale, so
one set of bandwidths fits every group), h in cfg.mmd_bandwidths (default 0.2, 0.5, 1, 2). The loss
is the sum over groups of the mean over problems.

GAN: non-saturating loss (D: softplus(-D(real)) + softplus(D(fake)); G: softplus(-D(fake))), one
discriminator step per generator step on the same fake batch, projection discriminator on pixels.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.functional import softplus

from reference_trainers.digits.config import DigitsConfig
from reference_trainers.digits.data import StepBatch
from reference_trainers.digits.features import FeatureSpace
from reference_trainers.digits.models import Discriminator, initialize_weights

DISC_SEED_OFFSET = 1000  # the discriminator's init seed is cfg.seed + this


def _sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a_i - b_j|^2 [..., n, m] by the broadcast difference (exact, smooth at 0)."""
    return ((a[..., :, None, :] - b[..., None, :, :]) ** 2).sum(-1)


def _kernel(d2: torch.Tensor, kind: str, bandwidths: tuple[float, ...]) -> torch.Tensor:
    if kind == "gaussian":
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)
    if kind == "laplace":
        d = torch.sqrt(d2 + 1e-12)  # the offset keeps the gradient finite at d = 0
        return sum(torch.exp(-d / h) for h in bandwidths)
    raise ValueError(f"mmd kernel must be 'gaussian' or 'laplace'; got {kind!r}")


def _off_diagonal_mean(k: torch.Tensor) -> torch.Tensor:
    """mean over i != j of k [..., n, n] -> [...]."""
    n = k.shape[-1]
    return (k.sum((-2, -1)) - k.diagonal(dim1=-2, dim2=-1).sum(-1)) / (n * (n - 1))


def mmd2(x: torch.Tensor, y: torch.Tensor, kind: str = "gaussian",
         bandwidths: tuple[float, ...] = (0.2, 0.5, 1.0, 2.0)) -> torch.Tensor:
    """Unbiased MMD^2 per problem: x [..., N, C] (gradient), y [..., P, C] -> [...] (see module docstring)."""
    dxy2 = _sq_distances(x, y)
    scale2 = dxy2.detach().clamp_min(0).sqrt().mean().clamp_min(1e-6) ** 2
    kxx = _kernel(_sq_distances(x, x) / scale2, kind, bandwidths)
    kyy = _kernel(_sq_distances(y, y) / scale2, kind, bandwidths)
    kxy = _kernel(dxy2 / scale2, kind, bandwidths)
    return _off_diagonal_mean(kxx) + _off_diagonal_mean(kyy) - 2 * kxy.mean((-2, -1))


class MMDObjective:
    """Sum over feature groups of the mean MMD^2 over the classes x locations."""

    def __init__(self, cfg: DigitsConfig, encoder: nn.Module):
        self.cfg = cfg
        self.features = FeatureSpace(encoder, cfg.patch_sizes, cfg.stage1_loc)

    def generator_loss(self, fake: torch.Tensor, batch: StepBatch, alpha: torch.Tensor,
                       lr_scale: float) -> tuple[torch.Tensor, dict]:
        """fake [G, N, 1, 8, 8] (with grad), batch.pos [G, P, 1, 8, 8] -> loss, {"mmd2_global": ...}."""
        gen_g = self.features(fake)
        with torch.no_grad():
            pos_g = self.features(batch.pos)
        total, logs = 0.0, {}
        for name, g in gen_g.items():
            # [G, n, L, C] -> [G, L, n, C]: each location is its own problem
            value = mmd2(g.transpose(1, 2), pos_g[name].transpose(1, 2), self.cfg.mmd_kernel,
                         self.cfg.mmd_bandwidths).mean()
            total = total + value
            if name == "global":
                logs["mmd2_global"] = value.item()
        return total, logs

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class GANObjective:
    """Non-saturating conditional GAN; holds the discriminator and its optimizer (saved in checkpoints)."""

    def __init__(self, cfg: DigitsConfig):
        self.cfg = cfg
        self.disc = Discriminator(cfg)
        initialize_weights(self.disc, cfg.seed + DISC_SEED_OFFSET)
        self.opt = torch.optim.Adam(self.disc.parameters(), lr=cfg.gan_lr, betas=(cfg.gan_beta1, 0.999))

    def generator_loss(self, fake: torch.Tensor, batch: StepBatch, alpha: torch.Tensor,
                       lr_scale: float) -> tuple[torch.Tensor, dict]:
        """One discriminator step on (batch.pos, fake.detach()), then the generator's loss on fake.

        fake [G, N, 1, 8, 8], batch.pos [G, P, 1, 8, 8], batch.classes [G]; lr_scale: the schedule's factor.
        """
        g, n = fake.shape[:2]
        fake_labels = batch.classes.repeat_interleave(n)
        real_labels = batch.classes.repeat_interleave(batch.pos.shape[1])
        real, flat = batch.pos.flatten(0, 1), fake.flatten(0, 1)
        for group in self.opt.param_groups:
            group["lr"] = self.cfg.gan_lr * lr_scale
        d_loss = (softplus(-self.disc(real, real_labels)).mean()
                  + softplus(self.disc(flat.detach(), fake_labels)).mean())
        self.opt.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt.step()
        self.disc.requires_grad_(False)  # the generator's backward needs no discriminator gradients
        g_loss = softplus(-self.disc(flat, fake_labels)).mean()
        self.disc.requires_grad_(True)
        return g_loss, {"d_loss": d_loss.item()}

    def state_dict(self) -> dict:
        return {"disc": self.disc.state_dict(), "disc_opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.disc.load_state_dict(state["disc"])
        self.opt.load_state_dict(state["disc_opt"])
