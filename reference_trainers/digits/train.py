"""Class-conditional drifting on scikit-learn's 8x8 digits, with guidance (paper §3.4, §3.5, A.5, A.7).

    python -m reference_trainers.digits.train --out runs/digits   # drifting; ~9 min measured on 2 busy cores
    python -m reference_trainers.digits.train --method gan --out runs/digits-gan  # a baseline, same budget
    python -m reference_trainers.digits.train --resume runs/digits/checkpoint.pt --steps 3000

Each step takes G classes; for each, N generated digits x = Gen(z, c, alpha), P real digits of class c
and M unconditional real digits (any class). alpha ~ p(alpha) ∝ alpha^-k on [1, alpha_max] per class
(inverse CDF of a uniform draw, here in the trainer) is fed to the generator, and the unconditional digits
are negatives of weight cfg_weight(alpha, N, M). The loss is driftloss.drifting_loss_groups over the
feature groups of a frozen encoder pre-trained here on the digits, plus the raw pixels (digits_features).
Outputs in --out: checkpoint.pt {model, ema, opt, step, config, objective, history}, log.txt,
metrics.json (FD-digits / accuracy / energy distance per alpha, digits_eval), fd_vs_alpha.png,
samples_alpha<a>.png (10 classes x N columns), curves.png.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
from tqdm import tqdm

from reference_trainers.common.checkpoints import load_checkpoint, save_checkpoint, training_state
from reference_trainers.common.config_cli import config_with_resume
from reference_trainers.common.ema import update_ema
from reference_trainers.common.guidance import sample_alpha
from reference_trainers.digits.baselines import GANObjective, MMDObjective
from reference_trainers.digits.config import DigitsConfig, build_parser, learning_rate
from reference_trainers.digits.data import load_digit_splits, step_batch
from reference_trainers.digits.evaluate import evaluate, plot_fd_vs_alpha, plot_sample_grid
from reference_trainers.digits.features import DriftingObjective
from reference_trainers.digits.models import Generator, initialize_weights
from reference_trainers.digits.pretrain import load_or_pretrain_encoder, load_or_train_eval_classifier


def make_objective(cfg: DigitsConfig, data):
    """The method's loss: DriftingObjective / MMDObjective (with the pre-trained encoder) / GANObjective."""
    if cfg.method == "gan":
        return GANObjective(cfg)
    encoder = load_or_pretrain_encoder(cfg, data)
    return (DriftingObjective if cfg.method == "drifting" else MMDObjective)(cfg, encoder)


def make_optimizer(cfg: DigitsConfig, model: torch.nn.Module) -> tuple[torch.optim.Optimizer, float]:
    """(generator optimizer, its base learning rate): DCGAN's Adam for the GAN, cfg.lr otherwise."""
    if cfg.method == "gan":
        return torch.optim.Adam(model.parameters(), lr=cfg.gan_lr, betas=(cfg.gan_beta1, 0.999)), cfg.gan_lr
    return torch.optim.Adam(model.parameters(), lr=cfg.lr), cfg.lr


def log_line(step: int, loss: float, logs: dict, samples_per_s: float) -> str:
    """Loss, the method's diagnostics (drift_rms per tau for drifting), throughput."""
    parts = [f"step {step}", f"loss {loss:.4f}"]
    for k, v in logs.items():
        parts.append(f"{k} [{' '.join(f'{x:.3g}' for x in v)}]" if isinstance(v, list) else f"{k} {v:.4g}")
    return " ".join(parts + [f"samples/s {samples_per_s:.0f}"])


def train(cfg: DigitsConfig) -> tuple[dict, torch.nn.Module, torch.nn.Module]:
    """Train one generator (resuming from cfg.resume if set). Returns (history, model, ema)."""
    torch.set_num_threads(cfg.threads)
    data = load_digit_splits(cfg.split_seed)
    model = Generator(cfg)
    initialize_weights(model, cfg.seed)
    model.spread_outputs(cfg.init_spread, cfg.seed)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt, base_lr = make_optimizer(cfg, model)
    objective = make_objective(cfg, data)
    history, start = {"step": [], "loss": [], "logs": [], "samples_per_s": 0.0, "train_seconds": 0.0,
                      "train_cpu_seconds": 0.0}, 0
    if cfg.resume:
        ckpt = load_checkpoint(cfg.resume)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        objective.load_state_dict(ckpt["objective"])
        history, start = ckpt["history"], ckpt["step"]

    os.makedirs(cfg.out, exist_ok=True)
    log_path = os.path.join(cfg.out, "log.txt")
    last = cfg.stop_at or cfg.steps
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    G, N = cfg.classes_per_step, cfg.n_gen
    bar = tqdm(range(start + 1, last + 1), disable=not cfg.progress, desc=cfg.method)
    t0, c0 = time.perf_counter(), time.process_time()  # wall and CPU (all threads): the machine is shared
    for step in bar:
        batch = step_batch(data.train, cfg.seed, step, G, N, cfg.n_pos, cfg.n_uncond, cfg.noise_dim)
        if cfg.method == "drifting":
            alpha = sample_alpha(batch.u_alpha, batch.u_one, cfg.alpha_power, cfg.alpha_max,
                                 cfg.alpha_one_fraction)
        else:  # the baselines have no guidance
            alpha = torch.ones(G)
        lr_scale = learning_rate(1.0, cfg, step)
        for group in opt.param_groups:
            group["lr"] = base_lr * lr_scale
        fake = model(batch.noise.flatten(0, 1), batch.classes.repeat_interleave(N),
                     alpha.repeat_interleave(N)).view(G, N, 1, 8, 8)
        loss, logs = objective.generator_loss(fake, batch, alpha, lr_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_ema(ema, model, cfg.ema_decay)

        if step % cfg.log_every == 0 or step == last:
            elapsed = time.perf_counter() - t0
            history["train_seconds"] += elapsed
            history["train_cpu_seconds"] += time.process_time() - c0
            done = step - (history["step"][-1] if history["step"] else start)
            history["samples_per_s"] = done * G * N / max(elapsed, 1e-9)
            history["step"].append(step)
            history["loss"].append(loss.item())
            history["logs"].append(logs)
            line = log_line(step, loss.item(), logs, history["samples_per_s"])
            bar.set_postfix_str(line.split(" ", 2)[2][:70])
            with open(log_path, "a") as f:
                f.write(line + "\n")
            t0, c0 = time.perf_counter(), time.process_time()
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            save_checkpoint(ckpt_path, training_state(model, ema, opt, step, cfg, history=history,
                                                      objective=objective.state_dict()))
    save_checkpoint(ckpt_path, training_state(model, ema, opt, last, cfg, history=history,
                                              objective=objective.state_dict()))
    return history, model, ema


def plot_curves(cfg: DigitsConfig, history: dict, path: str) -> None:
    """The training loss and (drifting) the energy distance (stats["energy_distance"], the progress curve)
    and the drift RMS per tau before normalization, averaged over groups."""
    logs = history["logs"]
    with_ed = bool(logs) and "energy_distance" in logs[-1]
    fig, axes = plt.subplots(1, 3 if with_ed else 2, figsize=(13.5 if with_ed else 9, 3.2))
    axes[0].plot(history["step"], history["loss"])
    axes[0].set(xlabel="step", ylabel="loss", title=f"{cfg.method} loss")
    if with_ed:  # entries logged before it was recorded (an older checkpoint's) are skipped
        steps = [s for s, entry in zip(history["step"], logs) if "energy_distance" in entry]
        for key, label in (("energy_distance", "mean over groups"), ("energy_distance_global", "raw pixels")):
            axes[1].plot(steps, [entry[key] for entry in logs if "energy_distance" in entry], label=label)
        axes[1].set(xlabel="step", ylabel="ED / S", yscale="log",
                    title="energy distance (stats['energy_distance'])")
        axes[1].legend(fontsize=8)
    if logs and "drift_rms" in logs[0]:
        rms = np.asarray([entry["drift_rms"] for entry in logs])
        for t, tau in enumerate(cfg.taus):
            axes[-1].plot(history["step"], rms[:, t], label=f"τ = {tau:g}")
        axes[-1].set(xlabel="step", ylabel="drift RMS", title="drift RMS (mean over groups)")
        axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: DigitsConfig) -> dict:
    """Train, then evaluate the EMA generator and write metrics.json and the figures; returns the metrics."""
    history, _, ema = train(cfg)
    if not cfg.evaluate:
        return {}
    data = load_digit_splits(cfg.split_seed)
    classifier = load_or_train_eval_classifier(cfg, data)
    metrics = evaluate(ema, classifier, data, cfg)
    metrics.update(method=cfg.method, steps=cfg.stop_at or cfg.steps, samples_per_s=history["samples_per_s"],
                   train_seconds=history["train_seconds"], train_cpu_seconds=history["train_cpu_seconds"],
                   config=dataclasses.asdict(cfg))
    with open(os.path.join(cfg.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    if cfg.plots:
        plot_fd_vs_alpha({cfg.method: metrics["alphas"]}, os.path.join(cfg.out, "fd_vs_alpha.png"),
                         metrics["real_train"]["fd"])
        for alpha in sorted({1.0, metrics["best_alpha"]}):
            plot_sample_grid(ema, cfg, alpha, os.path.join(cfg.out, f"samples_alpha{alpha:g}.png"))
        plot_curves(cfg, history, os.path.join(cfg.out, "curves.png"))
    per_alpha = " ".join(f"α={a:g}: FD {m['fd']:.3f} acc {m['accuracy']:.3f}"
                         for a, m in metrics["alphas"].items())
    print(f"{cfg.method}: {per_alpha} | real train FD {metrics['real_train']['fd']:.3f}")
    return metrics


def config_from_cli(argv: list[str] | None, description: str) -> DigitsConfig:
    """Defaults <- flags; with --resume the checkpoint's config is the base and the flags override it."""
    given = vars(build_parser(description).parse_args(argv))
    return config_with_resume(DigitsConfig, given, lambda path: load_checkpoint(path)["config"])


def main(argv: list[str] | None = None) -> dict:
    return run(config_from_cli(argv, __doc__.split("\n")[0]))


if __name__ == "__main__":
    main(sys.argv[1:])
