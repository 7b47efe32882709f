"""The networks of the digits trainers: generator, feature encoder, evaluation classifier, discriminator.

Generator        (noise [n, 32], class [n], alpha [n]) -> image [n, 1, 8, 8]; the same for every method.
FeatureEncoder   small CNN classifier pre-trained here; its stage maps are the drifting feature space.
EvalClassifier   a different CNN (5x5 conv + max pooling, ReLU), trained on a different split with a
                 different seed, used only for evaluation; its 64-d penultimate layer is FD's space.
Discriminator    MLP on pixels with a projection head for the class (GAN baseline).
"""

from __future__ import annotations

import torch
from torch import nn

from reference_trainers.digits.config import DigitsConfig
from reference_trainers.digits.data import NUM_CLASSES

ENCODER_TAPS = ("stage1", "stage2", "stage3")  # maps 8x8x16, 4x4x32, 2x2x64


class Generator(nn.Module):
    """x = MLP([z, embed(class), embed(log alpha)]), 3 hidden SiLU layers, linear output (no tanh)."""

    def __init__(self, cfg: DigitsConfig):
        super().__init__()
        self.noise_dim = cfg.noise_dim
        self.class_embed = nn.Embedding(NUM_CLASSES, cfg.class_dim)
        self.alpha_embed = nn.Sequential(nn.Linear(1, cfg.alpha_dim), nn.SiLU(),
                                         nn.Linear(cfg.alpha_dim, cfg.alpha_dim))
        h = cfg.hidden
        self.mlp = nn.Sequential(
            nn.Linear(cfg.noise_dim + cfg.class_dim + cfg.alpha_dim, h), nn.SiLU(),
            nn.Linear(h, h), nn.SiLU(),
            nn.Linear(h, h), nn.SiLU(),
            nn.Linear(h, 64),
        )

    @torch.no_grad()
    def spread_outputs(self, std: float, seed: int) -> None:
        """Rescale the output layer so that the pixels vary with the noise with about this std.

        torch's default initialization makes the outputs nearly independent of z (std ~0.01 through three
        SiLU layers): every method would start from a collapsed generator (data pixels have std ~0.6).
        """
        gen = torch.Generator().manual_seed(seed)
        n = 512
        z = torch.randn(n, self.noise_dim, generator=gen)
        out = self(z, torch.randint(0, NUM_CLASSES, (n,), generator=gen), torch.ones(n))  # [n, 1, 8, 8]
        self.mlp[-1].weight.mul_(std / out.flatten(1).std(dim=0).mean())

    def forward(self, z: torch.Tensor, labels: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """z [n, noise_dim], labels [n] int64, alpha [n] >= 1 -> images [n, 1, 8, 8]."""
        a = self.alpha_embed(torch.log(alpha)[:, None])  # log: alpha = 1 (no guidance) maps to 0
        h = torch.cat([z, self.class_embed(labels), a], dim=1)
        return self.mlp(h).view(-1, 1, 8, 8)


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.SiLU())


class FeatureEncoder(nn.Module):
    """Three conv stages (8x8x16 -> 4x4x32 -> 2x2x64), mean pool, linear class head.

    The tapped maps are the outputs of ``stage1``, ``stage2``, ``stage3`` (ENCODER_TAPS).
    """

    def __init__(self):
        super().__init__()
        self.stem = _conv(1, 16)
        self.stage1 = nn.Sequential(_conv(16, 16), _conv(16, 16))
        self.stage2 = nn.Sequential(_conv(16, 32, stride=2), _conv(32, 32))
        self.stage3 = nn.Sequential(_conv(32, 64, stride=2), _conv(64, 64))
        self.head = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """images [n, 1, 8, 8] -> logits [n, 10]."""
        h = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.head(h.mean(dim=(2, 3)))


class EvalClassifier(nn.Module):
    """conv5x5(32) ReLU maxpool -> conv3x3(64) ReLU maxpool -> fc 64 ReLU (features) -> fc 10."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),    # 4x4x32
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 2x2x64
            nn.Flatten(), nn.Linear(256, 64), nn.ReLU(),
        )
        self.head = nn.Linear(64, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """images [n, 1, 8, 8] -> penultimate features [n, 64]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Discriminator(nn.Module):
    """D(x, c) = psi(phi(x)) + <embed(c), phi(x)> (projection discriminator), phi a LeakyReLU MLP."""

    def __init__(self, cfg: DigitsConfig):
        super().__init__()
        h = cfg.disc_hidden
        self.phi = nn.Sequential(nn.Flatten(), nn.Linear(64, h), nn.LeakyReLU(0.2),
                                 nn.Linear(h, h), nn.LeakyReLU(0.2))
        self.psi = nn.Linear(h, 1)
        self.embed = nn.Embedding(NUM_CLASSES, h)
        self.embed.init_std = 0.0  # the projection starts at 0: D starts unconditional

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """images [n, 1, 8, 8], labels [n] -> logits [n]."""
        f = self.phi(x)
        return self.psi(f)[:, 0] + (self.embed(labels) * f).sum(dim=1)


@torch.no_grad()
def initialize_weights(model: nn.Module, seed: int) -> None:
    """torch's default initialization of every layer, drawn from ``seed`` (reproducible per model);
    embeddings N(0, init_std^2), init_std an attribute of the embedding (default 1)."""
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.reset_parameters()
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=getattr(module, "init_std", 1.0))
