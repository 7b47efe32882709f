"""The ImageNet code path end to end on real images: scikit-learn's digits as a 10-class image folder.

    python -m reference_trainers.imagenet.digits_pipeline --out runs/digits-pipeline --threads 1

Stages (each the ImageNet trainers' own entry point, called in this process with its own progress bar):
  1. data      the digits' train split (digits/data.py's load_digit_splits, 898 images) written as
               <out>/images/<class>/<i>.png: 8x8 grey upscaled (nearest) to the preset's 16x16, RGB;
  2. encoder   pretrain_encoder.main: MAE + classification fine-tune of the preset's ResNet encoder;
  3. train     train.main: guided drifting training of the preset's DiT generator in that encoder's features
               (direct class-balanced batches of the preset's N_c classes x N_pos / N_neg / N_unc);
  4. sample    sample.main: 200 samples per class (2,000) at each alpha, samples.npz + grid.png per alpha;
  5. evaluate  FD-digits exactly as the digits trainer scores (digits/evaluate.py's score, its evaluation
               classifier, the 450 held-out digits): each sample is mapped back to an 8x8 grey digit (channel
               mean, 2x2 average pooling: the exact inverse of the upscaling), then scored.
Outputs in --out: results.json, fd_table.md (FD / accuracy per alpha, with the digits trainer's figures),
fd_vs_alpha.png, samples_alpha<a>.png (10 classes x 12 samples, enlarged) at alpha 1 and at the best alpha,
and each stage's own folder (encoder/, train/, samples/).

The image-folder reader of the pixel path (data.py) draws a random resized crop (area 0.2-1) and a flip for
every read, ImageNet's augmentation. A flipped or cropped digit is another digit (or none), so the
digits-pixel preset turns both off (augment=False); everything else is the unchanged ImageNet code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from reference_trainers.common.config_cli import dataclass_parser, option, parse_config
from reference_trainers.imagenet.presets import get_preset, preset_with_overrides

PRESET = "digits-pixel"
DIGIT_SIDE = 8
# reference_trainers/RESULTS.md, section "Digits": the digits trainer (MLP generator, 1,000 steps), FD-digits
DIGITS_TRAINER = {"fd_alpha1": 10.226, "best_alpha": 3.0, "fd_best": 7.383, "real_train": 3.237,
                  "fd": {1.0: 10.226, 1.5: 8.490, 2.0: 7.735, 3.0: 7.383, 4.0: 7.665}}
GRID_COLUMNS = 12


@dataclass
class PipelineConfig:
    out: str = option("runs/digits-pipeline", "output folder (results.json, fd_table.md, figures, stages)")
    threads: int = option(1, "torch CPU threads (1 is fastest on busy cores); 0: torch's default", ge=0)
    mae_steps: int = option(0, "encoder pretraining steps; 0: the preset's mae_steps", ge=0)
    steps: int = option(0, "generator training steps; 0: the preset's steps", ge=0)
    alphas: tuple[float, ...] = option((), "guidance scales sampled and scored; none: the preset's "
                                       "eval_alphas", gt=0)
    per_class: int = option(200, "samples per class and alpha (the digits trainer scores 200)", ge=2)
    set: tuple[str, ...] = option((), "preset overrides FIELD=VALUE for every stage, e.g. --set lr=5e-4")
    seed: int = option(0, "seed of every stage", ge=0)
    classifier_path: str = option("runs/digits_cache/eval_classifier.pt", "the digits trainer's evaluation "
                                  "classifier (digits/pretrain.py; trained there on first use, then cached)")
    classifier_steps: int = option(800, "its training steps (800: the classifier of RESULTS.md)", ge=1)
    progress: bool = option(True, "progress bars")


# ------------------------------------------------------------------------------------------------------
# digits <-> images
# ------------------------------------------------------------------------------------------------------

def upscale(digits: np.ndarray, side: int) -> np.ndarray:
    """digits [n, 1, 8, 8] in [-1, 1] -> uint8 RGB [n, side, side, 3] (nearest upscaling, grey in all three
    channels)."""
    factor = side // DIGIT_SIDE
    x = np.repeat(np.repeat(digits[:, 0], factor, axis=1), factor, axis=2)              # [n, side, side]
    x = np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return np.repeat(x[..., None], 3, axis=3)


def to_digits(images: np.ndarray) -> torch.Tensor:
    """uint8 RGB [n, S, S, 3] -> [n, 1, 8, 8] float32 in [-1, 1] (the digits trainer's format): channel mean,
    then average pooling by S / 8 (the inverse of ``upscale``)."""
    x = torch.from_numpy(images).float().mean(dim=3)[:, None] / 127.5 - 1.0            # [n, 1, S, S]
    return torch.nn.functional.avg_pool2d(x, images.shape[1] // DIGIT_SIDE)


def write_image_folder(split, root: str, side: int) -> str:
    """The split's digits as root/<class>/<i>.png (RGB, side x side); returns ``root``."""
    images = upscale(split.images, side)
    for c in range(10):
        os.makedirs(os.path.join(root, str(c)), exist_ok=True)
    for i, (image, label) in enumerate(zip(images, split.labels)):
        Image.fromarray(image).save(os.path.join(root, str(int(label)), f"{i:04d}.png"))
    return root


# ------------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------------

def evaluate_samples(sample_dirs: dict[float, str], digits, classifier) -> dict:
    """{"alphas": {alpha: {fd, ed, accuracy}}, "best_alpha", "real_train", ...}: digits/evaluate.py's score
    of each alpha's samples.npz (mapped back to 8x8 digits) against the held-out split."""
    from reference_trainers.digits.evaluate import score
    from reference_trainers.imagenet.evaluate import load_images

    reference = classifier.features(torch.from_numpy(digits.held_out.images)).numpy()
    per_alpha = {}
    for alpha, folder in sample_dirs.items():
        path = os.path.join(folder, "samples.npz")
        with np.load(path) as f:
            labels = f["labels"]
        per_alpha[float(alpha)] = score(classifier, to_digits(load_images(path)), labels, reference)
    side = get_preset(PRESET).image_size
    real = score(classifier, to_digits(upscale(digits.train.images, side)), digits.train.labels, reference)
    exact = score(classifier, torch.from_numpy(digits.train.images), digits.train.labels, reference)
    best = min(per_alpha, key=lambda a: per_alpha[a]["fd"])
    return {"alphas": per_alpha, "best_alpha": best, "real_train": real, "real_train_8x8": exact,
            "n_generated": len(labels), "n_reference": len(reference)}


def fd_table(metrics: dict) -> str:
    """Markdown: FD-digits and accuracy per alpha, beside the digits trainer's FD (RESULTS.md)."""
    rows = ["| α at sampling | FD-digits | accuracy | digits trainer FD (RESULTS.md) |", "|---|---|---|---|"]
    for alpha, m in sorted(metrics["alphas"].items()):
        ref = DIGITS_TRAINER["fd"].get(alpha)
        best = "**" if alpha == metrics["best_alpha"] else ""
        rows.append(f"| {alpha:g} | {best}{m['fd']:.3f}{best} | {m['accuracy']:.3f} | "
                    f"{'–' if ref is None else f'{ref:.3f}'} |")
    for key, what in (("real_train", "real train digits via the 16x16 PNGs"),
                      ("real_train_8x8", "real train digits, 8x8 as the digits trainer scores them")):
        rows.append(f"| {what} (reference) | {metrics[key]['fd']:.3f} | {metrics[key]['accuracy']:.3f} | "
                    f"{DIGITS_TRAINER['real_train']:.3f} |")
    return "\n".join(rows) + "\n"


def sample_grid(samples_npz: str, per_class: int, alpha: float, path: str) -> None:
    """10 rows (classes 0-9) x GRID_COLUMNS samples of one alpha, enlarged, dark ink on white, labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from reference_trainers.imagenet.evaluate import load_images

    images = load_images(samples_npz).mean(axis=3)                       # [N, S, S] grey, class-major
    side, cols = images.shape[1], min(GRID_COLUMNS, per_class)
    pick = np.concatenate([np.arange(c * per_class, c * per_class + cols) for c in range(10)])
    grid = images[pick].reshape(10, cols, side, side).transpose(0, 2, 1, 3).reshape(10 * side, cols * side)
    fig, ax = plt.subplots(figsize=(max(cols * 0.45, 3.0), 10 * 0.45 + 0.6), layout="constrained")
    ax.imshow(255 - grid, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    for edge in range(side, 10 * side, side):
        ax.axhline(edge - 0.5, color="tab:blue", lw=0.6, alpha=0.6)
    for edge in range(side, cols * side, side):
        ax.axvline(edge - 0.5, color="tab:blue", lw=0.6, alpha=0.6)
    ax.set_xticks([])
    ax.set_yticks(np.arange(10) * side + side / 2 - 0.5, [str(c) for c in range(10)])
    ax.set_ylabel("class (condition)", fontsize=8)
    ax.set_xlabel(f"{cols} samples per class (EMA generator, one evaluation each)", fontsize=8)
    ax.set_title(f"ImageNet code path ({PRESET}), α = {alpha:g}", fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------
# the pipeline
# ------------------------------------------------------------------------------------------------------

class _Clock:
    """Wall and process CPU seconds of each stage."""

    def __init__(self):
        self.times: dict[str, dict] = {}

    @contextlib.contextmanager
    def stage(self, name: str, progress: bool):
        if progress:
            print(f"[digits-pipeline] {name} ...", file=sys.stderr, flush=True)
        wall, cpu = time.perf_counter(), _cpu_seconds()
        yield
        self.times[name] = {"wall_s": round(time.perf_counter() - wall, 2),
                            "cpu_s": round(_cpu_seconds() - cpu, 2)}
        if progress:
            print(f"[digits-pipeline] {name}: {self.times[name]['wall_s']:.1f} s", file=sys.stderr,
                  flush=True)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def run(cfg: PipelineConfig) -> dict:
    """Every stage (module docstring); returns the results.json dict."""
    from reference_trainers.digits.config import DigitsConfig
    from reference_trainers.digits.data import load_digit_splits
    from reference_trainers.digits.evaluate import plot_fd_vs_alpha
    from reference_trainers.digits.pretrain import load_or_train_eval_classifier
    from reference_trainers.imagenet import pretrain_encoder, sample, train

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    preset = preset_with_overrides(get_preset(PRESET), cfg.set)
    alphas = tuple(float(a) for a in (cfg.alphas or preset.eval_alphas))
    os.makedirs(cfg.out, exist_ok=True)
    paths = {k: os.path.join(cfg.out, k) for k in ("images", "encoder", "train", "samples")}
    common = ["--preset", PRESET, "--data", paths["images"], "--seed", str(cfg.seed),
              "--threads", str(cfg.threads), "--progress" if cfg.progress else "--no-progress"]
    sets = ["--set", *cfg.set] if cfg.set else []
    train_sets = [*cfg.set, *([f"steps={cfg.steps}"] if cfg.steps else [])]
    clock, load_start, t0 = _Clock(), _load_average(), time.perf_counter()

    with clock.stage("data", cfg.progress):
        digits = load_digit_splits()
        write_image_folder(digits.train, paths["images"], preset.image_size)
    with clock.stage("encoder", cfg.progress):
        pretrain_encoder.main([*common, "--out", paths["encoder"], "--steps", str(cfg.mae_steps),
                               "--checkpoint-every", "0", *sets])
    with clock.stage("train", cfg.progress):
        summary = train.main([*common, "--out", paths["train"], "--source", "direct",
                              "--encoder", os.path.join(paths["encoder"], "encoder.pt"),
                              "--grid-every", "0", "--checkpoint-every", "0", "--no-tensorboard",
                              "--log-every", "50", *(["--set", *train_sets] if train_sets else [])])
    with clock.stage("sample", cfg.progress):
        written = sample.main(["--checkpoint", os.path.join(paths["train"], "checkpoint.pt"),
                               "--out", paths["samples"], "--per-class", str(cfg.per_class),
                               "--alpha", *map(str, alphas), "--seed", str(cfg.seed), "--batch", "500",
                               "--grid", "100", "--progress" if cfg.progress else "--no-progress"])
    with clock.stage("evaluate", cfg.progress):
        classifier = load_or_train_eval_classifier(
            DigitsConfig(classifier_path=cfg.classifier_path, classifier_steps=cfg.classifier_steps), digits)
        metrics = evaluate_samples({a: os.path.dirname(w["samples"]) for a, w in written.items()}, digits,
                                   classifier)
        best = metrics["best_alpha"]
        grids = {}
        for alpha in sorted({alphas[0], best}):
            grids[alpha] = os.path.join(cfg.out, f"samples_alpha{alpha:g}.png")
            sample_grid(written[alpha]["samples"], cfg.per_class, alpha, grids[alpha])
        plot_fd_vs_alpha({f"ImageNet code path ({PRESET})": metrics["alphas"],
                          "digits trainer (RESULTS.md)": {a: {"fd": f, "accuracy": float("nan")}
                                                          for a, f in DIGITS_TRAINER["fd"].items()}},
                         os.path.join(cfg.out, "fd_vs_alpha.png"), real_fd=metrics["real_train"]["fd"])
        table = fd_table(metrics)
        with open(os.path.join(cfg.out, "fd_table.md"), "w") as f:
            f.write(table)
    result = {"preset": dataclasses.asdict(preset), "config": dataclasses.asdict(cfg),
              "metrics": {**metrics, "alphas": {str(a): m for a, m in metrics["alphas"].items()}},
              "fd_alpha1": metrics["alphas"].get(1.0, {}).get("fd"), "best_alpha": best,
              "fd_best": metrics["alphas"][best]["fd"], "digits_trainer": DIGITS_TRAINER,
              "train_summary": summary, "times": clock.times,
              "total_wall_s": round(time.perf_counter() - t0, 1), "load_average_start": load_start,
              "load_average_end": _load_average(), "grids": {str(a): p for a, p in grids.items()},
              "table": os.path.join(cfg.out, "fd_table.md")}
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    if cfg.progress:
        print(table + f"total {result['total_wall_s']:.0f} s; grids: {', '.join(grids.values())}",
              file=sys.stderr)
    return result


def build_parser():
    return dataclass_parser(PipelineConfig, (__doc__ or "").split("\n\n")[0])


def main(argv: list[str] | None = None) -> dict:
    return run(parse_config(PipelineConfig, argv, (__doc__ or "").split("\n\n")[0]))


if __name__ == "__main__":
    main(sys.argv[1:])
