"""Toy 2-D drifting (paper Fig. 3/4) with PyTorch: an MLP generator trained by driftloss alone.

    python -m reference_trainers.toy.toy2d                          # 8 Gaussians from a collapsed start
    python -m reference_trainers.toy.toy2d --target all --init all --steps 1000 --out runs/toy2d-grid
    python -m reference_trainers.toy.toy2d --resume runs/toy2d/checkpoint.pt --steps 3000

Each step draws noise z [N, 32] and real samples [P, 2], computes x = G(z) [N, 2], and minimizes
driftloss.drifting_loss(x, real): x regresses onto stop_gradient(x + V), V the kernel mean-shift field
pulling x toward the real samples and pushing it from the other generated samples. An explicit EMA of
the weights is what is evaluated and plotted. Outputs: see reference_trainers/toy_run.py.
"""

from __future__ import annotations

import copy
import os
import sys

import numpy as np
import torch
from driftloss.adapters.torch import drift_field, drifting_loss

from reference_trainers.common.checkpoints import load_checkpoint, save_checkpoint, training_state
from reference_trainers.common.config_cli import config_with_resume
from reference_trainers.common.ema import update_ema
from reference_trainers.toy.config import ToyConfig, build_parser, learning_rate
from reference_trainers.toy.data import initial_output, make_target, step_batch
from reference_trainers.toy.run import (
    ProgressLog,
    ToyRun,
    final_metrics,
    quiver_step,
    run_all,
    snapshot_steps,
)


def make_generator(cfg: ToyConfig) -> torch.nn.Sequential:
    """noise [N, noise_dim] -> 3 hidden SiLU layers of width cfg.hidden -> samples [N, 2]."""
    h = cfg.hidden
    return torch.nn.Sequential(
        torch.nn.Linear(cfg.noise_dim, h), torch.nn.SiLU(),
        torch.nn.Linear(h, h), torch.nn.SiLU(),
        torch.nn.Linear(h, h), torch.nn.SiLU(),
        torch.nn.Linear(h, 2),
    )


@torch.no_grad()
def initialize_weights(model: torch.nn.Sequential, cfg: ToyConfig) -> None:
    """Default torch init (seeded), then place the initial outputs per cfg.init (toy_data.initial_output).

    The last layer's weights are rescaled so that the outputs on a probe batch have std ``spread``,
    and its bias is set so that their mean is exactly the init's centre (no pre-fit).
    """
    torch.manual_seed(cfg.seed)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            layer.reset_parameters()
    centre, spread = initial_output(make_target(cfg.target), cfg.init)
    probe = torch.from_numpy(np.random.default_rng([cfg.seed, 2**60]).standard_normal(
        (4096, cfg.noise_dim)).astype(np.float32))
    last = model[-1]
    features = model[:-1](probe)                                   # [4096, hidden]
    out = features @ last.weight.T                                 # [4096, 2], without bias
    last.weight.mul_(spread / out.std(dim=0).mean())
    last.bias.copy_(torch.as_tensor(centre, dtype=torch.float32) - (features @ last.weight.T).mean(dim=0))


@torch.no_grad()
def generate(model: torch.nn.Module, noise: np.ndarray) -> np.ndarray:
    """samples [n, 2] from noise [n, noise_dim]."""
    return model(torch.from_numpy(noise)).numpy()


@torch.no_grad()
def drift_parts(x: torch.Tensor, pos: torch.Tensor, cfg: ToyConfig, scale: float):
    """(V+, V-) [N, 2] at x, unnormalized and summed over taus, with the loss's kernel widths.

    The loss measures distances in units of the scale S, so its kernel exp(-d / (S tau)) is the raw
    kernel with temperature S * tau. V+ is the field with repulsion 0; V- with attraction 0 (negated).
    """
    taus = tuple(scale * t for t in cfg.taus)
    common = {"normalize": False, "kernel": cfg.kernel}
    v_plus = drift_field(x, pos, tau=taus, repulsion=0.0, **common)
    v_minus = -drift_field(x, pos, tau=taus, attraction=0.0, **common)
    return v_plus.numpy(), v_minus.numpy()


def train(cfg: ToyConfig) -> tuple[ToyRun, torch.nn.Module, torch.nn.Module]:
    """Train one (target, init); resume from cfg.resume if set. Returns (run record, model, ema)."""
    torch.set_num_threads(cfg.threads)
    target = make_target(cfg.target)
    model = make_generator(cfg)
    initialize_weights(model, cfg)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    run, start = ToyRun(), 0
    if cfg.resume:
        ckpt = load_checkpoint(cfg.resume)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        run, start = ToyRun(**ckpt["history"]), ckpt["step"]

    keep = set(snapshot_steps(cfg))
    eval_noise = np.random.default_rng([cfg.seed, 2**59]).standard_normal((1000, cfg.noise_dim))
    eval_noise = eval_noise.astype(np.float32)                        # [1000, noise_dim], for the snapshots
    if start == 0:
        run.snapshots.append((0, generate(ema, eval_noise)))
    last = cfg.stop_at or cfg.steps
    log = ProgressLog(cfg, start, last, f"{cfg.target}/{cfg.init}")
    for step in log:
        noise, real = step_batch(target, cfg.seed, step, cfg.n_gen, cfg.n_pos, cfg.noise_dim)
        pos = torch.from_numpy(real)                                   # [P, 2]
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step)
        x = model(torch.from_numpy(noise))                             # [N, 2]
        loss, stats = drifting_loss(x, pos, taus=cfg.taus, return_stats=True, **cfg.loss_options())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_ema(ema, model, cfg.ema_decay)

        run.loss.append(loss.item())
        run.energy_distance.append(stats["energy_distance"].item())
        run.drift_rms.append(stats["drift_rms"].tolist())
        run.neighbours.append(stats["neighbours"].tolist())
        if step == quiver_step(cfg):
            run.quiver = (step, x.detach().numpy(), *drift_parts(x.detach(), pos, cfg, float(stats["scale"])),
                          real)
        if step in keep:
            run.snapshots.append((step, generate(ema, eval_noise)))
        log.after_step(run, step)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            save_checkpoint(os.path.join(cfg.out, "checkpoint.pt"),
                            training_state(model, ema, opt, step, cfg, history=run.__dict__.copy()))
    save_checkpoint(os.path.join(cfg.out, "checkpoint.pt"),
                    training_state(model, ema, opt, last, cfg, history=run.__dict__.copy()))

    run.metrics = final_metrics(cfg, lambda z: generate(ema, z), lambda z: generate(model, z))
    return run, model, ema


def main(argv: list[str] | None = None) -> dict:
    given = vars(build_parser(__doc__.split("\n")[0]).parse_args(argv))
    cfg = config_with_resume(ToyConfig, given, lambda path: load_checkpoint(path)["config"])
    return run_all(cfg, lambda c: train(c)[0], framework="torch")


if __name__ == "__main__":
    main(sys.argv[1:])
