"""MAE pretraining (with the final classification fine-tune) of the ImageNet recipes' feature encoder (A.3).

    python -m reference_trainers.imagenet.pretrain_encoder --preset latent-tiny --data LATENTS --out runs/tiny
    torchrun --nproc_per_node=8 -m reference_trainers.imagenet.pretrain_encoder --preset latent-b2 \\
        --data LATENTS --out runs/mae-b2 --micro-batch 128 --workers 8
    python -m reference_trainers.imagenet.pretrain_encoder --resume runs/mae-b2/checkpoint.pt
    ... --set mae_lr=1e-3 cls_finetune_steps=0 encoder_width=128    # any preset field (presets.py)

Each step: a batch of ``batch`` items (epoch-wise shuffled: each item once per epoch), each randomly
resized-cropped (scale 0.2-1) and flipped (images: the image is cropped and flipped; latents: the cached
latent of the flipped image with probability 0.5, then a crop of the latent grid resized back to 32x32,
see data.py); 2x2 patches of the 32x32 grid zeroed with probability mae_mask_ratio; loss
(1 - lambda) * masked L2 + lambda * CE of the linear class head, lambda = 0 until the last
cls_finetune_steps steps, then ramped linearly to cls_weight over cls_ramp_steps (mae.cls_weight_at).
AdamW (betas 0.9/0.95, weight decay 0.01 on all parameters), lr linearly warmed up from 0 over mae_warmup
steps then constant (mae_lr), gradients clipped to global norm 2.0, EMA of the encoder (mae_ema) after
each step. See docs/imagenet_recipe.md.

A batch can be split into micro-batches (gradient accumulation) and over processes (torchrun: each rank
takes a contiguous share, gradients are summed with one all-reduce per step). Every share's loss is
normalized by the whole batch (its masked-element count, its size), so the update is the one-batch update
up to floating-point summation order. All randomness of step s (items, crops, flips, masks) is drawn from
generators seeded by (seed, s): a resumed run repeats a straight one bit for bit on the CPU, and nothing
depends on the number of loader workers, micro-batches or processes.

Outputs in --out (rank 0): checkpoint.pt {model (encoder + decoder + class head), ema (the EMA encoder), opt,
step, config, preset, rng} every --checkpoint-every steps and at the end; encoder.pt {format, preset, set,
encoder (the EMA encoder's state dict), step} at the end (encoder.load_encoder reads it); log.txt.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as torch_dist
from tqdm import tqdm

from reference_trainers.common.checkpoints import load_checkpoint, save_checkpoint, training_state
from reference_trainers.common.config_cli import config_with_resume, dataclass_parser, option
from reference_trainers.common.distributed import setup_distributed, split_evenly, teardown_distributed
from reference_trainers.common.ema import update_ema
from reference_trainers.common.schedules import warmup_constant
from reference_trainers.imagenet.data import open_dataset
from reference_trainers.imagenet.encoder import save_encoder
from reference_trainers.imagenet.mae import MAE, cls_weight_at, combine_terms, random_mask
from reference_trainers.imagenet.presets import PRESETS, Preset, get_preset, preset_with_overrides

CHECKPOINT_KIND = "mae-pretrain"
# independent random streams of a run: (seed, stream, ...) seeds a torch.Generator
_EPOCH, _MASK, _AUGMENT = 0, 1, 2


@dataclass
class PretrainConfig:
    preset: str = option("", f"preset, one of {', '.join(PRESETS)} (required unless resuming): the "
                         "encoder architecture, the data space and the MAE recipe (mae_* and cls_* fields)")
    data: str = option("", "latents folder with manifest.json (latent presets) or image folder "
                       "root/<class>/<image> (pixel presets); required")
    out: str = option("runs/encoder", "output folder: checkpoint.pt, encoder.pt, log.txt")
    set: tuple[str, ...] = option((), "preset overrides FIELD=VALUE, e.g. --set mae_lr=1e-3 "
                                  "cls_finetune_steps=0 (the encoder.pt records them)")
    steps: int = option(0, "optimizer steps; 0: the preset's mae_steps (the classification fine-tune is "
                        "the last cls_finetune_steps of them)", ge=0)
    batch: int = option(0, "items per step over all processes; 0: the preset's mae_batch", ge=0)
    micro_batch: int = option(0, "items per forward/backward pass (gradient accumulation); 0: the whole "
                              "batch of a process at once", ge=0)
    weight_decay: float = option(0.01, "AdamW weight decay (all parameters)", ge=0)
    betas: tuple[float, ...] = option((0.9, 0.95), "AdamW betas", ge=0, lt=1)
    grad_clip: float = option(2.0, "clip gradients to this global norm; 0: no clipping", ge=0)
    seed: int = option(0, "seed of the initialization and of all data and mask randomness", ge=0)
    device: str = option("auto", "auto (cuda if available), cpu or cuda", choices=("auto", "cpu", "cuda"))
    precision: str = option("auto", "bf16 (autocast), fp32, or auto: bf16 on cuda, fp32 on cpu",
                            choices=("auto", "bf16", "fp32"))
    workers: int = option(0, "DataLoader worker processes per process (results do not depend on it)", ge=0)
    threads: int = option(0, "torch intra-op CPU threads; 0: torch's default (use 1 on busy cores)", ge=0)
    checkpoint_every: int = option(1000, "steps between checkpoints; 0: only at the end", ge=0)
    log_every: int = option(20, "steps between lines of log.txt", ge=1)
    resume: str = option("", "checkpoint.pt to continue: its config is the base, the flags given now "
                         "override it")
    stop_at: int = option(0, "stop (and checkpoint) after this step, as if interrupted; 0: run to --steps",
                          ge=0)
    progress: bool = option(True, "show a progress bar (img/s)")


def resolve_preset(cfg: PretrainConfig) -> tuple[PretrainConfig, Preset]:
    """(cfg with steps / batch taken from the preset where 0, the preset with cfg.set applied)."""
    if not cfg.preset:
        raise ValueError("give --preset (e.g. latent-b2, pixel-b16, latent-tiny)")
    preset = preset_with_overrides(get_preset(cfg.preset), cfg.set)
    cfg = dataclasses.replace(cfg, steps=cfg.steps or preset.mae_steps, batch=cfg.batch or preset.mae_batch)
    if not cfg.data:
        raise ValueError("give --data: a latents folder (manifest.json) or an image folder "
                         "root/<class>/<image>")
    if cfg.stop_at > cfg.steps:
        raise ValueError(f"stop_at ({cfg.stop_at}) is beyond steps ({cfg.steps})")
    if not 0.0 <= preset.mae_mask_ratio <= 1.0:
        raise ValueError(f"mae_mask_ratio must be in [0, 1]; got {preset.mae_mask_ratio}")
    return cfg, preset


def stream(seed: int, *keys: int) -> torch.Generator:
    """A CPU torch.Generator seeded from (seed, *keys) through NumPy's SeedSequence (independent streams)."""
    words = np.random.SeedSequence([seed, *keys]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed((int(words[0]) << 31) ^ int(words[1]))


class StepChunks(torch.utils.data.Dataset):
    """Item k: one chunk of ``chunk`` items of a step's batch -> (step, c, x, labels).

    Step s = first + k // per_step takes global chunk c = offset + k % per_step (a process's contiguous
    share: chunks offset .. offset + per_step - 1). The batch of step s holds positions (s-1)*batch ...
    s*batch-1 of the stream of epoch permutations (epoch e: randperm(N) seeded by (seed, EPOCH, e)); the
    item at position j of the batch draws its augmentation from a generator seeded by the j-th of ``batch``
    seeds drawn from (seed, AUGMENT, s), so no result depends on the chunking or the loader workers.
    """

    def __init__(self, data, seed: int, batch: int, chunk: int, first: int, last: int, offset: int = 0,
                 per_step: int | None = None):
        self.data, self.seed, self.batch, self.chunk = data, seed, batch, chunk
        self.offset = offset
        self.per_step = batch // chunk if per_step is None else per_step
        self.first, self.last = first, last
        self._perms: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return max(self.last - self.first + 1, 0) * self.per_step

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = torch.randperm(len(self.data), generator=stream(self.seed, _EPOCH, epoch))
        return self._perms[epoch]

    def indices(self, step: int, c: int) -> list[int]:
        """Dataset indices of global chunk ``c`` of step ``step``."""
        n = len(self.data)
        start = (step - 1) * self.batch + c * self.chunk
        return [int(self._perm(p // n)[p % n]) for p in range(start, start + self.chunk)]

    def __getitem__(self, k: int):
        step, c = self.first + k // self.per_step, self.offset + k % self.per_step
        seeds = torch.randint(2**62, (self.batch,), generator=stream(self.seed, _AUGMENT, step))
        seeds = seeds[c * self.chunk:(c + 1) * self.chunk].tolist()
        items = [self.data.item(i, torch.Generator().manual_seed(s))
                 for i, s in zip(self.indices(step, c), seeds)]
        x = torch.stack([x for x, _ in items])
        labels = torch.tensor([y for _, y in items], dtype=torch.int64)
        return step, c, x, labels


def rng_state(cfg: PretrainConfig, step: int) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),  # noqa: NPY002
             "python": random.getstate(),
             # the data and mask generators are functions of (seed, step): this is their whole state
             "data": {"seed": cfg.seed, "next_step": step + 1}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _all_reduce_grads(model: torch.nn.Module) -> None:
    """Sum the gradients over the processes (each process's loss is already normalized by the whole batch).
    Parameters without a gradient (the class head while lambda = 0) have none on every process."""
    handles = [torch_dist.all_reduce(p.grad, async_op=True) for p in model.parameters() if p.grad is not None]
    for h in handles:
        h.wait()


def pretrain(cfg: PretrainConfig) -> dict:
    """Run (or resume) MAE pretraining; returns {"mae", "ema", "step", "config", "preset", "log"} (log: the
    logged lines as dicts, rank 0)."""
    cfg, preset = resolve_preset(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = setup_distributed(cfg.device)
    try:
        return _pretrain(cfg, preset, dist)
    finally:
        teardown_distributed()


def _pretrain(cfg: PretrainConfig, preset: Preset, dist) -> dict:
    device, world = dist.device, dist.world_size
    local_batch = split_evenly(cfg.batch, world, "batch")
    chunk = cfg.micro_batch or local_batch
    if local_batch % chunk:
        raise ValueError(f"micro_batch {chunk} must divide the batch of each process ({local_batch})")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    data = open_dataset(cfg.data, preset, latent_crop=True)
    mae = MAE(preset, seed=cfg.seed).to(device)
    ema = copy.deepcopy(mae.encoder).requires_grad_(False)
    opt = torch.optim.AdamW(mae.parameters(), lr=preset.mae_lr, betas=tuple(cfg.betas),
                            weight_decay=cfg.weight_decay)
    start = 0
    if cfg.resume:
        ckpt = load_checkpoint(cfg.resume)
        if ckpt.get("kind") != CHECKPOINT_KIND:
            raise ValueError(f"{cfg.resume!r} is not a checkpoint of pretrain_encoder.py")
        if ckpt["preset"] != preset.name:
            raise ValueError(f"{cfg.resume!r} was trained with preset {ckpt['preset']!r}, not "
                             f"{preset.name!r}")
        mae.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        set_rng_state(ckpt["rng"])
        start = ckpt["step"]
        if start >= (cfg.stop_at or cfg.steps):
            raise ValueError(f"{cfg.resume!r} is already at step {start}; give --steps (or --stop-at) "
                             "beyond it to continue")

    last = cfg.stop_at or cfg.steps
    per_step = local_batch // chunk
    chunks = StepChunks(data, cfg.seed, cfg.batch, chunk, start + 1, last, offset=dist.rank * per_step,
                        per_step=per_step)
    loader = torch.utils.data.DataLoader(chunks, batch_size=None, shuffle=False, num_workers=cfg.workers,
                                         pin_memory=device.type == "cuda",
                                         prefetch_factor=4 if cfg.workers else None)
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    log_path = os.path.join(cfg.out, "log.txt")
    if dist.is_main:
        os.makedirs(cfg.out, exist_ok=True)
    cells = preset.encoder_patch**2 * preset.channels   # input elements per masked grid cell

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def save(step: int) -> None:
        if dist.is_main:
            save_checkpoint(ckpt_path, training_state(mae, ema, opt, step, cfg, preset=preset.name,
                                                      kind=CHECKPOINT_KIND, rng=rng_state(cfg, step)))

    log: list[dict] = []
    bar = tqdm(total=(last - start) * cfg.batch, unit="img", unit_scale=True, dynamic_ncols=True,
               disable=not (cfg.progress and dist.is_main), desc=f"MAE {preset.name}")
    batches = iter(loader)
    mae.train()
    t0, logged = time.perf_counter(), start
    for step in range(start + 1, last + 1):
        lam = cls_weight_at(step, cfg.steps, preset.cls_finetune_steps, preset.cls_weight,
                            preset.cls_ramp_steps)
        lr = warmup_constant(preset.mae_lr, step, preset.mae_warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        mask = random_mask(cfg.batch, mae.grid, preset.mae_mask_ratio, stream(cfg.seed, _MASK, step))
        count = float(mask.sum()) * cells                   # masked input elements of the whole batch
        opt.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        for _ in range(per_step):
            s, c, x, labels = next(batches)
            assert s == step, "data loader out of order"
            x = x.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            m = mask[c * chunk:(c + 1) * chunk].to(device, non_blocking=True)
            with autocast():
                terms = mae.loss_terms(x, m, labels if lam > 0 else None)
            loss, parts = combine_terms(terms, lam, count, cfg.batch)
            loss.backward()
            for k, v in {"loss": loss.detach(), **parts}.items():
                sums[k] = sums[k] + v if k in sums else v
        if world > 1:
            _all_reduce_grads(mae)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(mae.parameters(), max_norm)
        opt.step()
        update_ema(ema, mae.encoder, preset.mae_ema)
        bar.update(cfg.batch)

        if step % cfg.log_every == 0 or step == last:
            values = torch.stack([v.float() for v in sums.values()])
            if world > 1:
                torch_dist.all_reduce(values)
            elapsed = time.perf_counter() - t0
            entry = {"step": step, **dict(zip(sums, values.tolist())), "lambda": lam, "lr": lr,
                     "grad_norm": float(grad_norm),
                     "img_per_s": (step - logged) * cfg.batch / max(elapsed, 1e-9)}
            if dist.is_main:
                log.append(entry)
                bar.set_postfix_str(f"step {step} loss {entry['loss']:.4f} lambda {lam:.3g}")
                with open(log_path, "a") as f:
                    f.write(" ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in entry.items()) + "\n")
            t0, logged = time.perf_counter(), step
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step != last:
            save(step)
    bar.close()
    save(last)
    if dist.is_main:
        save_encoder(os.path.join(cfg.out, "encoder.pt"), ema, set=list(cfg.set), step=last, steps=cfg.steps,
                     config=dataclasses.asdict(cfg))
    return {"mae": mae, "ema": ema, "step": last, "config": cfg, "preset": preset, "log": log}


def build_parser():
    """argparse parser with one flag per PretrainConfig field (help, choices and bounds from option())."""
    return dataclass_parser(PretrainConfig, __doc__.split("\n")[0])


def config_from_cli(argv: list[str] | None) -> PretrainConfig:
    """Defaults <- flags; with --resume the checkpoint's config is the base and the flags override it."""
    given = vars(build_parser().parse_args(argv))
    return config_with_resume(PretrainConfig, given, lambda path: load_checkpoint(path)["config"])


def main(argv: list[str] | None = None) -> dict:
    return pretrain(config_from_cli(argv))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"pretrain_encoder: error: {e}")
