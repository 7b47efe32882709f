"""What the torch and JAX toy trainers share: the run record, the (target, init) loop, and the outputs.

A trainer provides ``train(cfg) -> ToyRun`` for one target and init; ``run_all`` expands "all",
calls it for each combination, and writes (per combination, to ``out`` or ``out/<target>-<init>``):
  samples.png      generated samples (EMA generator) at several steps, target in grey
  drift.png        attraction / repulsion / total drift at generated points early in training
  curves.png       loss, energy distance of each step's batch (stats["energy_distance"]: the curve that
                   shows progress) and unnormalized drift RMS per tau
  metrics.json     energy distance, MMD, modes covered (+ the same for two target samples), throughput
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from reference_trainers.common.sample_metrics import sample_metrics
from reference_trainers.toy import plots as toy_plots
from reference_trainers.toy.config import ToyConfig
from reference_trainers.toy.data import INITS, TARGETS, eval_batch, make_target


@dataclass
class ToyRun:
    """Everything one training run produced (NumPy; what the outputs are made of).

    loss [steps], energy_distance [steps] (stats["energy_distance"] of each step's batch; shorter than
    loss when resumed from a checkpoint made before it was recorded: it covers the last steps),
    drift_rms [steps, T], neighbours [steps, T]; snapshots: (step, samples [n, 2]);
    quiver: (step, x [n, 2], V+ [n, 2], V- [n, 2], pos [m, 2]) or None; metrics: see sample_metrics.
    """

    loss: list = field(default_factory=list)
    energy_distance: list = field(default_factory=list)
    drift_rms: list = field(default_factory=list)
    neighbours: list = field(default_factory=list)
    snapshots: list = field(default_factory=list)
    quiver: tuple | None = None
    metrics: dict = field(default_factory=dict)
    samples_per_s: float = 0.0


def snapshot_steps(cfg: ToyConfig) -> list[int]:
    """Steps at which the EMA generator's samples are kept for samples.png (first and last included)."""
    return sorted({int(round(s)) for s in np.linspace(0, cfg.steps, max(cfg.snapshots, 2))})


def quiver_step(cfg: ToyConfig) -> int:
    """The step whose drift drift.png shows: the first snapshot after step 0 (things are moving)."""
    return snapshot_steps(cfg)[1]


def evaluate(cfg: ToyConfig, generate: Callable[[np.ndarray], np.ndarray]) -> dict:
    """Metrics of ``generate(noise [n, noise_dim]) -> samples [n, 2]`` against held-out target samples."""
    target = make_target(cfg.target)
    noise, held_out, reference = eval_batch(target, cfg.seed, cfg.eval_samples, cfg.noise_dim)
    return sample_metrics(generate(noise), held_out, reference, target)


def log_line(step: int, loss: float, energy_distance: float | None, drift_rms: list, neighbours: list,
             samples_per_s: float) -> str:
    """One diagnostics line: loss, energy distance (None: not recorded), per-tau unnormalized drift RMS
    and effective neighbours, throughput."""
    ed = "" if energy_distance is None else f" energy_distance {energy_distance:.4g}"
    rms = " ".join(f"{v:.3g}" for v in drift_rms)
    nb = " ".join(f"{v:.3g}" for v in neighbours)
    return (f"step {step} loss {loss:.4f}{ed} drift_rms [{rms}] neighbours [{nb}] "
            f"samples/s {samples_per_s:.0f}")


class ProgressLog:
    """The step loop of one run: ``for step in log`` shows a progress bar, and ``log.after_step(run,
    step)`` writes a ``log_line`` to out/log.txt every cfg.log_every steps and at the last, with the
    throughput of the steps trained since ``start`` (time between log lines, logging excluded)."""

    def __init__(self, cfg: ToyConfig, start: int, last: int, desc: str):
        os.makedirs(cfg.out, exist_ok=True)
        self.path = os.path.join(cfg.out, "log.txt")
        self.cfg, self.start, self.last = cfg, start, last
        self.bar = tqdm(range(start + 1, last + 1), disable=not cfg.progress, desc=desc)
        self.t0, self.train_time = time.perf_counter(), 0.0

    def __iter__(self):
        return iter(self.bar)

    def after_step(self, run: ToyRun, step: int) -> None:
        if step % self.cfg.log_every and step != self.last:
            return
        self.train_time += time.perf_counter() - self.t0
        run.samples_per_s = (step - self.start) * self.cfg.n_gen / self.train_time
        ed = run.energy_distance[-1] if run.energy_distance else None
        line = log_line(step, run.loss[-1], ed, run.drift_rms[-1], run.neighbours[-1], run.samples_per_s)
        self.bar.set_postfix_str(line.split(" ", 2)[2][:60])
        with open(self.path, "a") as f:
            f.write(line + "\n")
        self.t0 = time.perf_counter()


def final_metrics(cfg: ToyConfig, generate_ema: Callable[[np.ndarray], np.ndarray],
                  generate_model: Callable[[np.ndarray], np.ndarray]) -> dict:
    """``evaluate`` of the EMA generator, with the raw model's distances and modes under "raw_model"."""
    metrics = evaluate(cfg, generate_ema)
    metrics["raw_model"] = {k: v for k, v in evaluate(cfg, generate_model).items()
                            if k in ("energy_distance", "mmd", "modes_covered")}
    return metrics


def write_outputs(cfg: ToyConfig, run: ToyRun, out: str, framework: str) -> None:
    """metrics.json and (if cfg.plots) the three figures for one run."""
    os.makedirs(out, exist_ok=True)
    record = {**run.metrics, "samples_per_s": run.samples_per_s, "framework": framework,
              "config": dataclasses.asdict(cfg)}
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(record, f, indent=2)
    if not cfg.plots:
        return
    target_pts = make_target(cfg.target).sample(np.random.default_rng([cfg.seed, 2**61]), 2000)
    title = f"{cfg.target}, {cfg.init} init ({framework})"
    toy_plots.plot_snapshots(run.snapshots, target_pts, os.path.join(out, "samples.png"), title)
    toy_plots.plot_curves(np.asarray(run.loss), np.asarray(run.drift_rms), cfg.taus,
                          os.path.join(out, "curves.png"), title, np.asarray(run.energy_distance))
    if run.quiver is not None:
        step, x, v_plus, v_minus, pos = run.quiver
        toy_plots.plot_drift_quiver(x, v_plus, v_minus, pos, os.path.join(out, "drift.png"),
                                    f"{title}: drift at step {step} (unnormalized, summed over taus)")


def run_all(cfg: ToyConfig, train: Callable[[ToyConfig], ToyRun], framework: str) -> dict:
    """Train every requested (target, init); write outputs; return {"target/init": metrics}."""
    targets = TARGETS if cfg.target == "all" else (cfg.target,)
    inits = INITS if cfg.init == "all" else (cfg.init,)
    single = len(targets) * len(inits) == 1
    summary = {}
    for target in targets:
        for init in inits:
            out = cfg.out if single else os.path.join(cfg.out, f"{target}-{init}")
            one = dataclasses.replace(cfg, target=target, init=init, out=out)
            run = train(one)
            write_outputs(one, run, out, framework)
            summary[f"{target}/{init}"] = run.metrics
            print(f"{target}/{init}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in run.metrics.items()))
    if not single:
        with open(os.path.join(cfg.out, "metrics.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary
