"""One-step sampling of a trained ImageNet generator for evaluation: one network evaluation per sample.

    python -m reference_trainers.imagenet.sample --checkpoint runs/latent-b2/checkpoint.pt --out samples/b2 \\
        --vae /models/sd-vae-ft-mse [--alpha 1.0 1.1 1.2] [--per-class 50] [--num-samples 0] [--ema 0] \\
        [--batch 250] [--seed 0] [--grid 64] [--device auto] [--precision auto]
    torchrun --nproc_per_node=8 -m reference_trainers.imagenet.sample ...      # the same samples, 8x faster

What is sampled: the EMA generator ``--ema`` (an index into the checkpoint's EMA generators, in the order of
the preset's ``ema_decays``; ``-1``: the raw model) at each guidance scale ``--alpha`` (default: the preset's
``eval_alpha``). Classes follow the ImageNet-val protocol: N = per_class x num_classes samples (50,000 for
ImageNet), each class ``per_class`` times, in class order; ``--num-samples N`` overrides the count, and then
sample i has class floor(i * num_classes / N) (still balanced and in order). Sample i's noise and style
indices are drawn from its own generator seeded by (seed, i) (sampling.indexed_inputs), so a sample does not
depend on the batch size, on the number of ranks, or on alpha (every alpha uses the same inputs).

Distributed: launched by torchrun, rank r generates the contiguous index range [r N / W, (r+1) N / W) and
writes it to ``alpha-<a>/part-<r>.npz``; rank 0 merges the parts in index order after a barrier and deletes
them. The result equals a single-process run (up to the network's floating-point dependence on the batch
composition of the device's kernels).

Latent presets are decoded by the SD-VAE (``--vae``: a local diffusers AutoencoderKL folder, never a
download; latents / 0.18215). Without ``--vae`` a latent preset is an error unless ``--latents-only``, which
saves the latents instead of images.

Output per alpha, in ``<out>/alpha-<a>/`` (``<a>`` = ``str(float(alpha))``, e.g. ``alpha-1.0``):
  samples.npz   ``arr_0`` uint8 [N, H, W, 3] (the ADM evaluator's layout), ``labels`` int64 [N],
                ``alpha`` float64 scalar;
  latents.npy   (``--latents-only`` instead of samples.npz) float32 [N, C, S, S], with labels.npy;
  grid.png      ``--grid`` samples spread over the classes (index i * N / grid), one row per sqrt(grid);
and ``<out>/sample_config.json`` (the settings, the checkpoint's step and preset).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from reference_trainers.common.checkpoints import load_checkpoint
from reference_trainers.common.config_cli import (
    ConfigError,
    check_fields,
    config_from_args,
    dataclass_parser,
    option,
)
from reference_trainers.common.distributed import Distributed, setup_distributed, teardown_distributed
from reference_trainers.imagenet.generator import Generator
from reference_trainers.imagenet.presets import Preset
from reference_trainers.imagenet.sampling import generate_indexed, save_grid, to_uint8

PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class SampleConfig:
    checkpoint: str = option("", "checkpoint.pt written by reference_trainers.imagenet.train")
    out: str = option("samples", "output folder: <out>/alpha-<a>/samples.npz and grid.png per alpha")
    # (not --num: torchrun's parser takes it for an abbreviation of its own --numa-binding)
    num_samples: int = option(0, "samples per alpha; 0: per_class x num_classes (50,000 for ImageNet); "
                              "otherwise sample i has class floor(i * num_classes / num_samples)", ge=0)
    per_class: int = option(50, "samples of each class, in class order (the ImageNet-val protocol); used "
                            "when --num-samples is 0", ge=1)
    alpha: tuple[float, ...] = option((), "guidance scales, one sample set each; none given: the preset's "
                                      "eval_alpha", gt=0)
    ema: int = option(0, "index into the checkpoint's EMA generators (in the order of the preset's "
                      "ema_decays); -1: the raw model", ge=-1)
    vae: str = option("", "local diffusers AutoencoderKL folder decoding latent presets (e.g. a download of "
                      "stabilityai/sd-vae-ft-mse made beforehand); nothing is downloaded at run time")
    latents_only: bool = option(False, "latent presets: save latents.npy instead of decoded images "
                                "(no --vae needed)")
    batch: int = option(250, "samples per generator evaluation, per rank", ge=1)
    decode_batch: int = option(50, "latents per VAE decode call (the decoder's activations are large)", ge=1)
    seed: int = option(0, "sample i's noise and style come from a generator seeded by (seed, i)", ge=0)
    grid: int = option(64, "samples in grid.png, spread over the classes (0: no grid)", ge=0)
    device: str = option("auto", "cuda, cpu, or auto: cuda when available (torchrun: one GPU per rank)",
                         choices=("auto", "cuda", "cpu"))
    precision: str = option("auto", "the generator under bf16 autocast or in fp32; auto: bf16 on CUDA, fp32 "
                            "on CPUs (as train.py)", choices=PRECISIONS)
    progress: bool = option(True, "tqdm progress bar (rank 0)")


def build_parser():
    return dataclass_parser(SampleConfig, (__doc__ or "").split("\n\n")[0])


def parse_config(argv: list[str] | None) -> SampleConfig:
    return config_from_args(SampleConfig, vars(build_parser().parse_args(argv)))


# --------------------------------------------------------------------------------------------------------
# checkpoint, labels, shards
# --------------------------------------------------------------------------------------------------------

def preset_from_checkpoint(ckpt: dict) -> Preset:
    """The Preset a checkpoint was trained with (lists back to tuples; fields unknown to this version of
    Preset are an error naming them)."""
    if "preset" not in ckpt:
        raise ValueError("the checkpoint has no 'preset' entry; give a checkpoint.pt written by "
                         "reference_trainers.imagenet.train")
    known = {f.name for f in dataclasses.fields(Preset)}
    unknown = sorted(set(ckpt["preset"]) - known)
    if unknown:
        raise ValueError(f"the checkpoint's preset has fields this code does not know: {', '.join(unknown)}")
    return Preset(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["preset"].items()})


def _strip_prefixes(state: dict) -> dict:
    """State dict keys without DDP's 'module.' or torch.compile's '_orig_mod.' prefixes."""
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_generator(path: str, ema: int, device: torch.device | str = "cpu") -> tuple[Generator, Preset, dict]:
    """(generator in eval mode on ``device``, its preset, the checkpoint) of checkpoint ``path``: the EMA
    generator ``ema`` (index into ckpt["emas"], ordered as the preset's ema_decays) or, for -1, the raw
    model."""
    ckpt = load_checkpoint(path)
    preset = preset_from_checkpoint(ckpt)
    if ema == -1:
        state = ckpt["model"]
    else:
        emas = ckpt.get("emas") or []
        if not 0 <= ema < len(emas):
            decays = ", ".join(f"{i}: {d}" for i, d in enumerate(preset.ema_decays[:len(emas)]))
            raise ValueError(f"--ema {ema}: the checkpoint holds {len(emas)} EMA generator(s) "
                             f"({decays or 'none'}); give one of these indices, or -1 for the raw model")
        state = emas[ema]
    model = Generator(preset)
    model.load_state_dict(_strip_prefixes(state))
    return model.eval().requires_grad_(False).to(device), preset, ckpt


def sample_count(cfg: SampleConfig, preset: Preset) -> int:
    """N: --num-samples, or per_class x num_classes."""
    n = cfg.num_samples or cfg.per_class * preset.num_classes
    if n <= 0:
        raise ValueError(f"nothing to sample: num_samples={cfg.num_samples}, per_class={cfg.per_class}")
    return n


def class_labels(n: int, num_classes: int) -> np.ndarray:
    """int64 [n]: sample i has class floor(i * num_classes / n); for n = k * num_classes each class k times,
    in class order (the ImageNet-val protocol)."""
    return (np.arange(n, dtype=np.int64) * num_classes) // n


def shard(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous index range [lo, hi) of ``rank`` among ``world_size`` (sizes differ by at most one)."""
    return rank * n // world_size, (rank + 1) * n // world_size


def alpha_dir(out: str, alpha: float) -> str:
    return os.path.join(out, f"alpha-{float(alpha)}")


def grid_indices(n: int, count: int) -> np.ndarray:
    """``count`` sample indices spread over [0, n) (so over the classes)."""
    count = min(count, n)
    return np.arange(count, dtype=np.int64) * n // max(count, 1)


def _load_vae(path: str, device: torch.device):
    from reference_trainers.imagenet.latents import load_vae

    return load_vae(path, device)


def check_vae(vae, preset: Preset) -> None:
    """The VAE must decode the preset's latents [C, S, S] to image_size images."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    got = (vae.config.latent_channels, preset.size * factor)
    if got != (preset.channels, preset.image_size):
        raise ValueError(f"the VAE decodes {vae.config.latent_channels}-channel latents "
                         f"{preset.size}x{preset.size} to {got[1]}x{got[1]} images; the preset needs "
                         f"{preset.channels} channels and {preset.image_size}x{preset.image_size} images "
                         "(is this the SD-VAE it was trained with?)")


# --------------------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------------------

@torch.no_grad()
def decode(samples: torch.Tensor, preset: Preset, vae: nn.Module | None, decode_batch: int) -> np.ndarray:
    """samples [n, C, S, S] -> uint8 [n, H, W, 3] (latents decoded in chunks of ``decode_batch``)."""
    if preset.space != "latent" or vae is None:
        return to_uint8(samples, preset, None)
    return np.concatenate([to_uint8(chunk, preset, vae) for chunk in samples.split(max(decode_batch, 1))])


def generate_range(model: nn.Module, preset: Preset, labels: np.ndarray, lo: int, hi: int, alpha: float,
                   cfg: SampleConfig, device: torch.device, vae=None, bar=None) -> np.ndarray:
    """Samples lo..hi-1 at ``alpha``: uint8 [hi-lo, H, W, 3], or float32 latents [hi-lo, C, S, S] when
    cfg.latents_only."""
    out = None
    for start in range(lo, hi, cfg.batch):
        stop = min(start + cfg.batch, hi)
        idx = torch.arange(start, stop)
        y = torch.from_numpy(labels[start:stop]).to(device)
        x = generate_indexed(model, preset, y, idx, alpha=alpha, seed=cfg.seed,
                             autocast=use_bf16(cfg.precision, device))
        x = x.cpu().numpy() if cfg.latents_only else decode(x, preset, vae, cfg.decode_batch)
        if out is None:
            out = np.empty((hi - lo, *x.shape[1:]), dtype=x.dtype)
        out[start - lo:stop - lo] = x
        if bar is not None:
            bar.update(stop - start)
    if out is None:  # an empty shard (more ranks than samples)
        shape = (preset.channels, preset.size, preset.size) if cfg.latents_only else (0, 0, 3)
        out = np.empty((0, *shape), np.float32 if cfg.latents_only else np.uint8)
    return out


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast for "bf16", and for "auto" on CUDA."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _part_path(folder: str, rank: int, world_size: int) -> str:
    return os.path.join(folder, f"part-{rank:05d}-of-{world_size:05d}.npz")


def merge_parts(folder: str, n: int, world_size: int) -> np.ndarray:
    """Rank 0: the parts every rank wrote to ``folder``, concatenated in index order (each checked to hold
    its range), then deleted."""
    merged = None
    paths = []
    for rank in range(world_size):
        lo, hi = shard(n, rank, world_size)
        path = _part_path(folder, rank, world_size)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"rank {rank}'s samples {path!r} are missing (did that rank fail?)")
        with np.load(path) as part:
            if (int(part["lo"]), int(part["hi"])) != (lo, hi):
                raise ValueError(f"{path!r} holds samples [{int(part['lo'])}, {int(part['hi'])}), expected "
                                 f"[{lo}, {hi}): a stale part of another run; delete it and rerun")
            x = part["x"]
        if merged is None and x.shape[0]:
            merged = np.empty((n, *x.shape[1:]), dtype=x.dtype)
        if x.shape[0]:
            merged[lo:hi] = x
        paths.append(path)
    for path in paths:
        os.remove(path)
    return merged


def _save_npz(path: str, **arrays) -> None:
    """np.savez to ``path`` atomically (a temporary file renamed when complete)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _save_npy(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def write_alpha(folder: str, x: np.ndarray, labels: np.ndarray, alpha: float, cfg: SampleConfig,
                preset: Preset) -> dict:
    """samples.npz (or latents.npy + labels.npy) and grid.png of one alpha; returns what was written."""
    os.makedirs(folder, exist_ok=True)
    written = {}
    if cfg.latents_only:
        _save_npy(os.path.join(folder, "latents.npy"), x)
        _save_npy(os.path.join(folder, "labels.npy"), labels)
        written["latents"] = os.path.join(folder, "latents.npy")
    else:
        _save_npz(os.path.join(folder, "samples.npz"), arr_0=x, labels=labels, alpha=np.float64(alpha))
        written["samples"] = os.path.join(folder, "samples.npz")
    if cfg.grid > 0:
        pick = grid_indices(len(x), cfg.grid)
        images = to_uint8(torch.from_numpy(x[pick]), preset, None) if cfg.latents_only else x[pick]
        path = os.path.join(folder, "grid.png")
        save_grid(images, path, columns=max(1, math.ceil(math.sqrt(len(pick)))))
        written["grid"] = path
    return written


def sample(cfg: SampleConfig, dist_info: Distributed | None = None) -> dict:
    """Generate every alpha's sample set (see the module docstring); returns {alpha: written paths} on rank 0
    ({} on the other ranks). ``dist_info`` defaults to setup_distributed(cfg.device) (torchrun's env)."""
    if not cfg.checkpoint:
        raise ConfigError("checkpoint", "required: the checkpoint.pt of a training run")
    check_fields(dataclasses.replace(cfg, alpha=cfg.alpha or (1.0,)))  # no alpha: the preset's eval_alpha
    own = dist_info is None
    dist_info = setup_distributed(cfg.device) if own else dist_info
    try:
        return _sample(cfg, dist_info)
    finally:
        if own:
            teardown_distributed()


def _sample(cfg: SampleConfig, dist_info: Distributed) -> dict:
    from tqdm import tqdm

    device, rank, world = dist_info.device, dist_info.rank, dist_info.world_size
    model, preset, ckpt = load_generator(cfg.checkpoint, cfg.ema, device)
    vae = None
    if preset.space == "latent":
        if cfg.vae and not cfg.latents_only:
            vae = _load_vae(cfg.vae, device)
            check_vae(vae, preset)
        elif not cfg.latents_only:
            raise ValueError(f"preset {preset.name!r} generates SD-VAE latents: give --vae <local diffusers "
                             "AutoencoderKL folder> (e.g. a download of stabilityai/sd-vae-ft-mse) to decode "
                             "them to images, or --latents-only to save the latents instead")
    elif cfg.latents_only:
        raise ValueError(f"--latents-only: preset {preset.name!r} generates pixels, not latents")
    alphas = tuple(float(a) for a in cfg.alpha) or (float(preset.eval_alpha),)
    n = sample_count(cfg, preset)
    labels = class_labels(n, preset.num_classes)
    lo, hi = shard(n, rank, world)
    if dist_info.is_main:
        os.makedirs(cfg.out, exist_ok=True)
        decays = dict(enumerate(preset.ema_decays))
        info = {"config": dataclasses.asdict(cfg), "checkpoint_step": ckpt.get("step"), "preset": preset.name,
                "num": n, "alphas": list(alphas), "world_size": world, "ema_decay": decays.get(cfg.ema)}
        with open(os.path.join(cfg.out, "sample_config.json"), "w") as f:
            json.dump(info, f, indent=2)
    bar = tqdm(total=(hi - lo) * len(alphas), disable=not (cfg.progress and dist_info.is_main),
               desc=f"sampling {preset.name}", unit="img", dynamic_ncols=True)
    results = {}
    try:
        for alpha in alphas:
            folder = alpha_dir(cfg.out, alpha)
            bar.set_postfix(alpha=alpha)
            x = generate_range(model, preset, labels, lo, hi, alpha, cfg, device, vae, bar)
            if world > 1:
                os.makedirs(folder, exist_ok=True)
                _save_npz(_part_path(folder, rank, world), x=x, lo=np.int64(lo), hi=np.int64(hi))
                _barrier()
                if not dist_info.is_main:
                    continue
                x = merge_parts(folder, n, world)
            results[alpha] = write_alpha(folder, x, labels, alpha, cfg, preset)
    finally:
        bar.close()
    return results


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(argv)
    if not cfg.checkpoint:
        build_parser().error("--checkpoint is required (the checkpoint.pt of a training run)")
    return sample(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
