"""One-step sampling: noise + class + alpha + style -> one generator evaluation -> images.

    samples = generate(model, preset, labels, alpha=1.0, seed=0)          # [n, C, S, S] latents or pixels
    images = to_uint8(samples, preset, vae)                              # [n, H, W, 3] uint8
    save_grid(images, "grid.png", columns=8)

Evaluation sampling (sample.py) draws every sample's inputs from its own generator, seeded by (seed, sample
index), so a sample does not depend on the batch size, the number of ranks or the device:

    samples = generate_indexed(model, preset, labels, indices, alpha=1.0, seed=0)
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from reference_trainers.imagenet.presets import Preset

LATENT_SCALE = 0.18215  # SD-VAE latents are stored multiplied by this (docs/imagenet_recipe.md)
EVAL_STREAM = 2**32 + 1  # seeds the per-sample generators of evaluation sampling apart from training's


def step_generator(device: torch.device, *seed: int) -> torch.Generator:
    """A torch.Generator on ``device`` seeded from the integers ``seed`` (e.g. run seed, rank, step)."""
    state = np.random.SeedSequence(list(seed)).generate_state(2, dtype=np.uint64)
    return torch.Generator(device=device).manual_seed(int(state[0] >> np.uint64(1)))


def generator_inputs(preset: Preset, labels: torch.Tensor, gen: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise [n, C, S, S], style indices [n, style_tokens]) for labels [n], drawn from ``gen``."""
    n, device = labels.shape[0], labels.device
    noise = torch.randn(n, preset.channels, preset.size, preset.size, generator=gen, device=device)
    style = torch.randint(0, preset.style_codebook, (n, preset.style_tokens), generator=gen, device=device)
    return noise, style


@torch.no_grad()
def generate(model: nn.Module, preset: Preset, labels: torch.Tensor, alpha: float | torch.Tensor = 1.0,
             seed: int = 0, autocast: bool = True) -> torch.Tensor:
    """Samples [n, C, S, S] (float32) of classes ``labels`` [n] at guidance scale ``alpha``: one network
    evaluation each, deterministic under ``seed``."""
    device = labels.device
    alpha = torch.as_tensor(alpha, dtype=torch.float32, device=device).expand(labels.shape[0])
    noise, style = generator_inputs(preset, labels, step_generator(device, seed, 2**31))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        return model(noise, labels, alpha, style).float()


def indexed_inputs(preset: Preset, indices: torch.Tensor, seed: int, device: torch.device | str = "cpu"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise [n, C, S, S], style [n, style_tokens]) of the samples with the given global ``indices`` [n]:
    sample i's are drawn on the CPU from its own generator ``step_generator(cpu, seed, EVAL_STREAM, i)``
    (as ``generator_inputs`` draws one sample), then moved to ``device``. The values depend only on
    (seed, i): not on the batch size, the rank that draws them or the device the model runs on."""
    cpu = torch.device("cpu")
    one = torch.zeros(1, dtype=torch.long)
    noise, style = [], []
    for i in indices.tolist():
        n, s = generator_inputs(preset, one, step_generator(cpu, seed, EVAL_STREAM, int(i)))
        noise.append(n)
        style.append(s)
    if not noise:
        return (torch.empty(0, preset.channels, preset.size, preset.size, device=device),
                torch.empty(0, preset.style_tokens, dtype=torch.long, device=device))
    return torch.cat(noise).to(device), torch.cat(style).to(device)


@torch.no_grad()
def generate_indexed(model: nn.Module, preset: Preset, labels: torch.Tensor, indices: torch.Tensor,
                     alpha: float = 1.0, seed: int = 0, autocast: bool = True) -> torch.Tensor:
    """Samples [n, C, S, S] (float32) of classes ``labels`` [n] at guidance scale ``alpha``, with the inputs
    of the global sample ``indices`` [n] (``indexed_inputs``): one network evaluation each."""
    device = labels.device
    noise, style = indexed_inputs(preset, indices, seed, device)
    alpha_t = torch.full((labels.shape[0],), float(alpha), dtype=torch.float32, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        return model(noise, labels, alpha_t, style).float()


@torch.no_grad()
def to_uint8(samples: torch.Tensor, preset: Preset, vae: nn.Module | None = None) -> np.ndarray:
    """samples [n, C, S, S] -> images [n, H, W, 3] uint8.

    Pixel presets: [-1, 1] -> [0, 255]. Latent presets: decoded by ``vae`` (a diffusers AutoencoderKL,
    latents / 0.18215); without a VAE, latent channels 0-2 are shown, each scaled to its own range (a
    preview, not an image).
    """
    if preset.space == "latent":
        if vae is not None:
            param = next(vae.parameters())
            samples = vae.decode(samples.to(param.device, param.dtype) / LATENT_SCALE).sample.float()
        else:
            x = samples[:, :3]
            lo = x.amin(dim=(0, 2, 3), keepdim=True)
            hi = x.amax(dim=(0, 2, 3), keepdim=True)
            samples = (x - lo) / (hi - lo).clamp_min(1e-6) * 2 - 1
    x = ((samples.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def grid(images: np.ndarray, columns: int) -> np.ndarray:
    """images [n, H, W, 3] -> one [rows*H, columns*W, 3] array (missing cells black)."""
    n, h, w, c = images.shape
    rows = -(-n // columns)
    out = np.zeros((rows * h, columns * w, c), dtype=images.dtype)
    for i in range(n):
        r, k = divmod(i, columns)
        out[r * h:(r + 1) * h, k * w:(k + 1) * w] = images[i]
    return out


def save_grid(images: np.ndarray, path: str, columns: int) -> None:
    """Write images [n, H, W, 3] uint8 as one PNG grid."""
    from PIL import Image

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(grid(images, columns)).save(path)
