"""Train a one-step drifting generator on ImageNet latents or pixels (a Table 8 row), one process or many.

    python -m reference_trainers.imagenet.train --preset latent-tiny --data LATENTS --out runs/tiny
    torchrun --nproc_per_node=8 -m reference_trainers.imagenet.train --preset latent-b2 \\
        --data LATENTS --encoder runs/mae-b2/encoder.pt --out runs/latent-b2
    python -m reference_trainers.imagenet.train --resume runs/latent-b2/checkpoint.pt

Each step, on each process, for its N_c / world classes: draw alpha per class, generate N_neg samples from
noise + class + style + alpha (one evaluation each), encode them (with gradient) and the class's N_pos
positives and N_unc unconditional samples (without), and minimize the sum over feature groups of the guided
drifting loss (objective.py). AdamW, linear warmup then constant, gradient clipping, EMAs of the weights.
The drifting statistics S and lambda are global across processes (driftloss all-reduces them).
Outputs in --out: checkpoint.pt (exact resume), TensorBoard events, grids/step-XXXXXXX.png, log.txt.
See docs/imagenet_recipe.md for the recipe and README for each Table 8 row's commands.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from tqdm import tqdm

from reference_trainers.common.checkpoints import load_checkpoint, save_checkpoint
from reference_trainers.common.config_cli import config_with_resume, dataclass_parser, option
from reference_trainers.common.distributed import (
    Distributed,
    setup_distributed,
    split_evenly,
    teardown_distributed,
)
from reference_trainers.common.ema import update_ema
from reference_trainers.common.guidance import sample_alpha
from reference_trainers.common.schedules import warmup_constant
from reference_trainers.imagenet.objective import FeatureObjective
from reference_trainers.imagenet.presets import PRESETS, Preset, get_preset, preset_with_overrides
from reference_trainers.imagenet.run_log import RunLog, progress
from reference_trainers.imagenet.sampling import (
    generate,
    generator_inputs,
    save_grid,
    step_generator,
    to_uint8,
)


@dataclass
class TrainConfig:
    preset: str = option("latent-tiny", "a Table 8 column or a tiny preset (docs/imagenet_recipe.md)",
                         choices=tuple(PRESETS), section="what to train")
    data: str = option("", "latents folder (latent presets; made by reference_trainers.imagenet.latents) or "
                       "image folder root/<class>/<image> (pixel presets)")
    out: str = option("runs/imagenet", "output folder: checkpoint.pt, log.txt, grids/, tensorboard/")
    encoder: str = option("", "encoder.pt written by reference_trainers.imagenet.pretrain_encoder; empty: a "
                          "random frozen encoder (smoke tests only)")
    convnext: str = option("", "local ConvNeXt-V2 weights file (pixel presets); empty: random weights")
    vae: str = option("", "local diffusers AutoencoderKL folder, to decode latent sample grids; empty: a "
                      "preview of latent channels 0-2")
    set: tuple[str, ...] = option((), "preset overrides FIELD=VALUE, e.g. --set steps=1000 n_classes=64")
    source: str = option("queue", '"queue": the sample queue of A.8; "direct": class-balanced draws',
                         choices=("queue", "direct"), section="how")
    seed: int = option(0, "seed of the weights, the data stream and each step's noise", ge=0)
    device: str = option("auto", "auto: CUDA when available (one GPU per process), else CPU",
                         choices=("auto", "cpu", "cuda"))
    precision: str = option("auto", 'networks under "bf16" autocast or in "fp32"; "auto": bf16 on CUDA, fp32 '
                            "on CPUs; the drifting loss is float32 always", choices=("auto", "bf16", "fp32"))
    fsdp: bool = option(False, "shard the generator and its EMAs with FSDP over the processes (default DDP)")
    chunks: int = option(1, "run each process's classes in K chunks, accumulating gradients: K-fold less "
                         "feature memory; S and lambda become per-chunk statistics", ge=1)
    threads: int = option(0, "torch CPU threads per process; 0: torch's default (1 is fastest on a busy "
                          "CPU)", ge=0)
    log_every: int = option(10, "steps between log lines, TensorBoard scalars and step-time splits", ge=1,
                            section="outputs")
    grid_every: int = option(1000, "steps between sample grids of the EMA generator (and at the end); 0: "
                             "never", ge=0)
    checkpoint_every: int = option(1000, "steps between checkpoints (and at the end); 0: only at the end",
                                   ge=0)
    stop_at: int = option(0, "stop (and checkpoint) after this step, as if interrupted; 0: run to the end",
                          ge=0)
    resume: str = option("", "checkpoint to resume from: its config is the base, the flags given now "
                         "override it")
    progress: bool = option(True, "progress bar (rank 0)")
    tensorboard: bool = option(True, "TensorBoard events in <out>/tensorboard")


ARCH_FIELDS = ("space", "channels", "size", "num_classes", "patch_size", "hidden", "depth", "heads",
               "mlp_ratio", "register_tokens", "style_tokens", "style_codebook", "encoder_width",
               "encoder_blocks", "encoder_block", "encoder_patch", "convnext")


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether the networks run under bf16 autocast ("auto": on CUDA only)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


class NonFiniteLoss(FloatingPointError):
    """The drifting loss became NaN or infinite; the message names the step and the groups."""


def check_finite(loss: torch.Tensor, stats: dict, step: int) -> None:
    """Stop with the step and the offending groups when the loss is not finite (one host read per step)."""
    if bool(torch.isfinite(loss)):
        return
    bad = [name for name, s in stats.items() if not bool(torch.isfinite(s["loss"]))]
    raise NonFiniteLoss(
        f"step {step}: the drifting loss is {float(loss)} (non-finite) in feature group(s) {bad or ['?']}; "
        "lower the learning rate, check the data for NaN/inf, or resume from an earlier checkpoint")


@dataclass
class StepInputs:
    """What the generator is given in one step for G classes of N samples each."""
    labels: torch.Tensor     # long [G*N], each class repeated N times
    alpha: torch.Tensor      # float [G], one guidance scale per class problem
    noise: torch.Tensor      # [G*N, C, S, S]
    style: torch.Tensor      # long [G*N, style_tokens]


def draw_inputs(preset: Preset, classes: torch.Tensor, gen: torch.Generator) -> StepInputs:
    """alpha per class from p(alpha) ∝ alpha^-k on [1, alpha_max] (a share at exactly 1), noise and
    style indices per sample, all from ``gen``; classes long [G]."""
    G, N = classes.shape[0], preset.n_neg
    u = torch.rand(2, G, generator=gen, device=classes.device)
    alpha = sample_alpha(u[0], u[1], preset.alpha_power, preset.alpha_max, preset.alpha_one_fraction)
    labels = classes.repeat_interleave(N)                                        # [G*N]
    noise, style = generator_inputs(preset, labels, gen)
    return StepInputs(labels, alpha, noise, style)


def drifting_step(model: nn.Module, objective: FeatureObjective, inputs: StepInputs, pos: torch.Tensor,
                  uncond: torch.Tensor, autocast: bool, timer: StepTimer | None = None
                  ) -> tuple[torch.Tensor, dict]:
    """Loss and per-group stats of one step: pos [G, P, C, S, S], uncond [G, M, C, S, S] real samples.

    The networks run under bf16 autocast (if ``autocast``); the drifting loss in float32.
    """
    G = inputs.alpha.shape[0]
    N = inputs.labels.shape[0] // G
    with torch.autocast(pos.device.type, dtype=torch.bfloat16, enabled=autocast):
        fake = model(inputs.noise, inputs.labels, inputs.alpha.repeat_interleave(N), inputs.style)
        fake = fake.float().view(G, N, *fake.shape[1:])                          # [G, N, C, S, S]
        _mark(timer, "generator")
        gen_g = objective.groups(fake)
        with torch.no_grad():
            pos_g, neg_g = objective.groups(pos), objective.groups(uncond)
        _mark(timer, "encoder")
    loss, stats = objective.loss(gen_g, pos_g, neg_g, inputs.alpha, N)
    _mark(timer, "loss")
    return loss, stats


class StepResult(NamedTuple):
    loss: torch.Tensor        # 0-d, the summed drifting loss of this process's classes
    stats: dict               # per feature group: {loss, drift_rms [T], energy_distance, ...}
    alpha: torch.Tensor       # [G] guidance scales of the step's classes
    lr: float
    grad_norm: torch.Tensor   # before clipping


def train_step(net: nn.Module, model: nn.Module, emas: list[nn.Module], opt: torch.optim.Optimizer,
               objective: FeatureObjective, preset: Preset, step: int, classes: torch.Tensor,
               pos: torch.Tensor, uncond: torch.Tensor, gen: torch.Generator, autocast: bool,
               timer: StepTimer | None = None, chunks: int = 1) -> StepResult:
    """One optimizer step on this process's classes [G] (pos [G, P, ...], uncond [G, M, ...] on the
    device): draw the inputs from ``gen``, the guided drifting loss, backward (DDP/FSDP reduce the
    gradients), warmup LR, clipping, AdamW, the EMAs. ``net`` is ``model`` or its DDP/FSDP wrapper.

    ``chunks`` > 1 runs the classes in that many groups one after another, accumulating the gradient of
    the mean loss: the feature groups' memory falls K-fold, and the drifting statistics S and lambda become
    those of each chunk (still global across processes). A non-finite loss stops with NonFiniteLoss naming
    the step and the feature groups."""
    inputs = draw_inputs(preset, classes, gen)
    G = classes.shape[0]
    if not 1 <= chunks <= G or G % chunks:
        raise ValueError(f"chunks={chunks} must divide this process's {G} classes")
    opt.zero_grad(set_to_none=True)
    size, N = G // chunks, preset.n_neg
    total, stats = torch.zeros((), device=classes.device), {}
    for i in range(chunks):
        lo, hi = i * size, (i + 1) * size
        part = StepInputs(inputs.labels[lo * N:hi * N], inputs.alpha[lo:hi], inputs.noise[lo * N:hi * N],
                          inputs.style[lo * N:hi * N])
        with _gradient_sync(net, enabled=i == chunks - 1):
            try:
                loss, stats = drifting_step(net, objective, part, pos[lo:hi], uncond[lo:hi], autocast, timer)
            except ValueError as e:  # driftloss refuses non-finite features: name the step
                if "finite" not in str(e):
                    raise
                raise NonFiniteLoss(f"step {step}: {e}") from e
            check_finite(loss, stats, step)
            (loss / chunks).backward()
        total += loss.detach() / chunks
        _mark(timer, "backward")
    lr = warmup_constant(preset.lr, step, preset.warmup_steps, preset.warmup_start)
    for group in opt.param_groups:
        group["lr"] = lr
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), preset.grad_clip)
    opt.step()
    for ema, decay in zip(emas, preset.ema_decays):
        update_ema(ema, model, decay)
    _mark(timer, "optimizer")
    return StepResult(total if chunks > 1 else loss.detach(), stats, inputs.alpha, lr, grad_norm)


def _gradient_sync(net: nn.Module, enabled: bool):
    """Hold back DDP's/FSDP's gradient reduction for all but the last chunk of a step."""
    if enabled:
        return contextlib.nullcontext()
    if isinstance(net, nn.parallel.DistributedDataParallel):
        return net.no_sync()
    if hasattr(net, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(net)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(net: nn.Module):
    net.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        net.set_requires_gradient_sync(True)


class StepTimer:
    """Seconds spent in each part of a step (data, generator, encoder, loss, backward, optimizer)."""

    def __init__(self, device: torch.device):
        self.device, self.parts, self.t = device, {}, 0.0

    def start(self) -> None:
        self._sync()
        self.parts, self.t = {}, time.perf_counter()

    def mark(self, name: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.parts[name] = self.parts.get(name, 0.0) + now - self.t
        self.t = now

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _mark(timer: StepTimer | None, name: str) -> None:
    if timer is not None:
        timer.mark(name)


def rng_state() -> dict:
    """torch's global generators (the step's own draws come from step_generator, seeded per step)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_architecture(saved: dict, preset: Preset) -> None:
    """A checkpoint resumes only into the same architecture: a clear error naming the fields that differ."""
    now = dataclasses.asdict(preset)
    diff = {k: (saved.get(k), now[k]) for k in ARCH_FIELDS if _plain(saved.get(k)) != _plain(now[k])}
    if diff:
        raise ValueError("the checkpoint was trained with another architecture; differing preset fields "
                         + ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items()))


def _plain(v):
    return list(v) if isinstance(v, (tuple, list)) else v


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns a summary {step, loss, img_per_s}."""
    # imports that need the optional ImageNet dependencies stay here, so --help works without them
    from reference_trainers.imagenet.batches import make_source
    from reference_trainers.imagenet.data import open_dataset
    from reference_trainers.imagenet.generator import Generator
    from reference_trainers.imagenet.networks import (
        load_feature_encoders,
        load_optimizer_state,
        wrap_generator,
    )

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist_info: Distributed = setup_distributed(cfg.device)
    device = dist_info.device
    try:
        ckpt = load_checkpoint(cfg.resume) if cfg.resume else None
        preset = preset_with_overrides(get_preset(cfg.preset), cfg.set)
        if ckpt is not None:
            check_architecture(ckpt["preset"], preset)
        per_rank = split_evenly(preset.n_classes, dist_info.world_size, "n_classes")
        torch.manual_seed(cfg.seed)
        model = Generator(preset).to(device)
        emas = [copy.deepcopy(model).requires_grad_(False).eval() for _ in preset.ema_decays]
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            for ema, state in zip(emas, ckpt["emas"]):
                ema.load_state_dict(state)
        sharded = cfg.fsdp and dist_info.world_size > 1
        net = wrap_generator(model, emas, dist_info, fsdp=cfg.fsdp)
        opt = torch.optim.AdamW(model.parameters(), lr=preset.lr, betas=tuple(preset.betas),
                                weight_decay=preset.weight_decay)
        dataset = open_dataset(cfg.data, preset)
        source = make_source(cfg.source, dataset, preset, seed=cfg.seed, rank=dist_info.rank,
                             world_size=dist_info.world_size, classes_per_step=per_rank)
        start = 0
        if ckpt is not None:
            load_optimizer_state(model, opt, ckpt["opt"], sharded)
            if len(ckpt["source"]) == dist_info.world_size:
                source.load_state_dict(ckpt["source"][dist_info.rank])
            else:  # the queues belong to the ranks that wrote them: start this run's afresh
                warnings.warn(f"the checkpoint was written by {len(ckpt['source'])} processes, this run has "
                              f"{dist_info.world_size}: the sample queues restart (the weights, optimizer "
                              "and step resume exactly)", stacklevel=2)
            set_rng_state(ckpt["rng"])
            start = ckpt["step"]
        dtype = torch.bfloat16 if use_bf16(cfg.precision, device) else torch.float32
        objective = FeatureObjective(load_feature_encoders(preset, cfg.encoder, cfg.convnext, device, dtype),
                                     preset.taus)
        return _loop(cfg, preset, dist_info, net, model, emas, opt, source, objective, start)
    finally:
        teardown_distributed()


def _loop(cfg, preset, dist_info, net, model, emas, opt, source, objective, start) -> dict:
    device, main = dist_info.device, dist_info.is_main
    last = min(cfg.stop_at or preset.steps, preset.steps)
    log = RunLog(cfg.out, preset.taus, cfg.tensorboard) if main else None
    os.makedirs(cfg.out, exist_ok=True)
    timer = StepTimer(device)
    bar = tqdm(range(start + 1, last + 1), disable=not (cfg.progress and main), desc=preset.name,
               initial=start, total=last)
    images_per_step = preset.n_classes * preset.n_neg
    t_log, steps_since, summary = time.perf_counter(), 0, {"step": start}
    autocast = use_bf16(cfg.precision, device)
    for step in bar:
        timed = step % cfg.log_every == 0 or step == last
        timer.start()
        classes, pos, uncond = (t.to(device, non_blocking=True) for t in source.next_batch(step))
        _mark(timer, "data")
        gen = step_generator(device, cfg.seed, dist_info.rank, step)
        result = train_step(net, model, emas, opt, objective, preset, step, classes, pos, uncond, gen,
                            autocast, timer if timed else None, cfg.chunks)
        steps_since += 1
        if timed:
            now = time.perf_counter()
            img_s = steps_since * images_per_step / (now - t_log)
            t_log, steps_since = now, 0
            summary = {"step": step, "loss": result.loss.item(), "img_per_s": img_s, "lr": result.lr,
                       "grad_norm": float(result.grad_norm), "time": dict(timer.parts),
                       **progress(result.stats)}
            if main:
                bar.set_postfix(loss=f"{summary['loss']:.4g}", img_s=f"{img_s:.0f}")
                log.step(summary, result.stats, result.alpha)
        if cfg.grid_every and (step % cfg.grid_every == 0 or step == last):
            _grid(cfg, preset, emas[0], device, step, log)
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == last:
            _checkpoint(cfg, preset, dist_info, model, emas, opt, source, step)
    if log is not None:
        log.close()
    return summary


def _grid(cfg, preset, ema, device, step, log: RunLog | None) -> None:
    """Sample grid of the first EMA generator: 8 classes x 8 samples at the preset's evaluation alpha.
    Every rank generates (a sharded EMA needs them all); rank 0 writes."""
    classes = torch.arange(min(8, preset.num_classes), device=device).repeat_interleave(8)
    samples = generate(ema, preset, classes, alpha=preset.eval_alpha, seed=cfg.seed,
                       autocast=use_bf16(cfg.precision, device))
    if log is None:  # not rank 0
        return
    vae = _vae(cfg.vae, device) if cfg.vae else None
    images = to_uint8(samples, preset, vae)
    path = os.path.join(cfg.out, "grids", f"step-{step:07d}.png")
    save_grid(images, path, columns=8)
    log.grid(images, step)


@functools.lru_cache(maxsize=1)
def _vae(path: str, device: torch.device):
    from reference_trainers.imagenet.latents import load_vae

    return load_vae(path, device)


def _checkpoint(cfg, preset, dist_info, model, emas, opt, source, step) -> None:
    """Rank 0 writes {model, emas, opt (whole, even under FSDP), source (every rank's), step, config,
    preset, rng}; every rank takes part in gathering them."""
    from reference_trainers.imagenet.networks import full_state_dicts

    states = [source.state_dict()]
    if dist_info.world_size > 1:
        import torch.distributed as dist

        states = [None] * dist_info.world_size
        dist.all_gather_object(states, source.state_dict())
    nets = full_state_dicts(model, emas, opt, sharded=cfg.fsdp and dist_info.world_size > 1)
    if not dist_info.is_main:
        return
    save_checkpoint(os.path.join(cfg.out, "checkpoint.pt"), {
        **nets, "source": states, "step": step, "config": dataclasses.asdict(cfg),
        "preset": dataclasses.asdict(preset), "rng": rng_state()})


def build_parser():
    return dataclass_parser(TrainConfig, __doc__)


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    cfg = config_with_resume(TrainConfig, vars(parser.parse_args(argv)),
                             lambda path: load_checkpoint(path)["config"])
    if not cfg.data:
        parser.error("--data is required (a latents folder or an image folder)")
    if not os.path.isdir(cfg.data):
        parser.error(f"--data {cfg.data!r} is not a folder (make one with the module "
                     "reference_trainers.imagenet.latents, or .synthetic_data for a smoke run)")
    try:
        preset_with_overrides(get_preset(cfg.preset), cfg.set)
    except ValueError as e:
        parser.error(f"--set: {e}")
    return train(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
