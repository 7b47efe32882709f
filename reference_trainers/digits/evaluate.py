"""Evaluation of a digits generator by the separate evaluation classifier (digits_models.EvalClassifier).

FD-digits   Fréchet distance between Gaussians fitted to the classifier's 64-d penultimate features of
            generated digits (eval_per_class of each class) and of the held-out real digits (FID's formula).
accuracy    fraction of generated digits of class c that the classifier labels c (all classes pooled).
ED          energy distance (sample_metrics.energy_distance) in the same feature space, on a subset.
Each is measured at every alpha in cfg.eval_alphas (the FD-vs-alpha curve, paper Fig. 5). The real
train split scored the same way is the reference a perfect generator would reach at these sample sizes.
"""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402
import torch  # noqa: E402

from reference_trainers.common.sample_metrics import energy_distance  # noqa: E402
from reference_trainers.digits.config import DigitsConfig  # noqa: E402
from reference_trainers.digits.data import NUM_CLASSES, Digits  # noqa: E402

ED_SAMPLES = 500  # energy distance is O(n^2) in memory; FD uses every sample


def gaussian_frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + Tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2)): the squared 2-Wasserstein distance of two
    Gaussians N(mu1, cov1), N(mu2, cov2) (mu [D], cov [D, D])."""
    with warnings.catch_warnings():  # a near-singular product warns; the value is checked below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(cov1 @ cov2)
    if not np.all(np.isfinite(covmean)):  # singular product: regularize (as FID implementations do)
        eps = 1e-6 * np.eye(len(mu1))
        covmean = scipy.linalg.sqrtm((cov1 + eps) @ (cov2 + eps))
    covmean = np.real(covmean)  # tiny imaginary parts are rounding
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FD between Gaussians fitted (mean, unbiased covariance) to features a [n, D] and b [m, D]."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return gaussian_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def eval_inputs(cfg: DigitsConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed evaluation noise [10 * eval_per_class, noise_dim] and labels (class-major), from cfg.seed."""
    rng = np.random.default_rng([cfg.seed, 2**59])
    n = cfg.eval_per_class
    noise = rng.standard_normal((NUM_CLASSES * n, cfg.noise_dim)).astype(np.float32)
    return torch.from_numpy(noise), torch.arange(NUM_CLASSES).repeat_interleave(n)


@torch.no_grad()
def generate(model: torch.nn.Module, noise: torch.Tensor, labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """images [n, 1, 8, 8] at guidance scale alpha (one network evaluation)."""
    return model(noise, labels, torch.full((len(labels),), float(alpha)))


@torch.no_grad()
def score(classifier: torch.nn.Module, images: torch.Tensor, labels: np.ndarray,
          reference: np.ndarray) -> dict:
    """FD, energy distance and accuracy of images [n, 1, 8, 8] with intended labels [n] against the
    reference features [m, 64] (held-out real digits)."""
    feats = classifier.features(images)
    pred = classifier.head(feats).argmax(1).numpy()
    feats = feats.numpy()
    sub = np.random.default_rng(0).permutation(len(feats))[:ED_SAMPLES]
    return {"fd": frechet_distance(feats, reference),
            "ed": energy_distance(feats[sub], reference[:ED_SAMPLES]),
            "accuracy": float((pred == np.asarray(labels)).mean())}


@torch.no_grad()
def evaluate(model: torch.nn.Module, classifier: torch.nn.Module, data: Digits, cfg: DigitsConfig) -> dict:
    """{"alphas": {alpha: {fd, ed, accuracy}}, "best_alpha", "real_train": {...}, classifier accuracy}."""
    reference = classifier.features(torch.from_numpy(data.held_out.images)).numpy()
    noise, labels = eval_inputs(cfg)
    per_alpha = {float(a): score(classifier, generate(model, noise, labels, a), labels.numpy(), reference)
                 for a in cfg.eval_alphas}
    real = score(classifier, torch.from_numpy(data.train.images), data.train.labels, reference)
    best = min(per_alpha, key=lambda a: per_alpha[a]["fd"])
    return {"alphas": per_alpha, "best_alpha": best, "real_train": real,
            "classifier_held_out_accuracy": score(classifier, torch.from_numpy(data.held_out.images),
                                                  data.held_out.labels, reference)["accuracy"],
            "n_generated": len(labels), "n_reference": len(reference)}


def plot_fd_vs_alpha(curves: dict[str, dict], path: str, real_fd: float | None = None) -> None:
    """FD-digits and accuracy against alpha, one line per run: curves {label: metrics["alphas"]}.

    FD on a log axis (generated digits and the real-digit reference differ by orders of magnitude);
    accuracy on [0, 1] with chance (1/10) marked.
    """
    fig, (ax_fd, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.6), layout="constrained")
    fds = []
    for label, per_alpha in curves.items():
        alphas = sorted(per_alpha)
        fds += [per_alpha[a]["fd"] for a in alphas]
        ax_fd.plot(alphas, [per_alpha[a]["fd"] for a in alphas], "o-", label=label)
        ax_acc.plot(alphas, [per_alpha[a]["accuracy"] for a in alphas], "o-", label=label)
    if real_fd is not None:
        fds.append(real_fd)
        ax_fd.axhline(real_fd, color="grey", ls="--", lw=1, label="real train digits (reference)")
    ax_acc.axhline(1 / NUM_CLASSES, color="grey", ls=":", lw=1, label="chance")
    if min(fds, default=0.0) > 0:
        ax_fd.set_yscale("log")
    ax_fd.set(xlabel="guidance scale α at sampling", ylabel="FD-digits (lower is better)", title="FD vs α")
    ax_acc.set(xlabel="guidance scale α at sampling", ylabel="accuracy of the evaluation classifier",
               title="class-conditional accuracy vs α", ylim=(0, 1.02))
    ax_fd.legend(fontsize=8)
    ax_acc.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


@torch.no_grad()
def plot_sample_grid(model: torch.nn.Module, cfg: DigitsConfig, alpha: float, path: str) -> None:
    """10 rows (classes 0-9) x cfg.grid_columns generated digits at guidance scale alpha."""
    cols = cfg.grid_columns
    noise, labels = eval_inputs(cfg)
    keep = torch.cat([torch.arange(c * cfg.eval_per_class, c * cfg.eval_per_class + cols)
                      for c in range(NUM_CLASSES)])
    images = generate(model, noise[keep], labels[keep], alpha).clamp(-1, 1).numpy()[:, 0]  # [10*cols, 8, 8]
    grid = images.reshape(NUM_CLASSES, cols, 8, 8).transpose(0, 2, 1, 3).reshape(NUM_CLASSES * 8, cols * 8)
    fig, ax = plt.subplots(figsize=(max(cols * 0.45, 3.0), NUM_CLASSES * 0.45 + 0.6), layout="constrained")
    ax.imshow(-grid, cmap="gray", vmin=-1, vmax=1, interpolation="nearest")  # dark ink on white
    for edge in range(8, NUM_CLASSES * 8, 8):                                 # thin lines between digits
        ax.axhline(edge - 0.5, color="tab:blue", lw=0.6, alpha=0.6)
    for edge in range(8, cols * 8, 8):
        ax.axvline(edge - 0.5, color="tab:blue", lw=0.6, alpha=0.6)
    ax.set_xticks([])
    ax.set_yticks(np.arange(NUM_CLASSES) * 8 + 3.5, [str(c) for c in range(NUM_CLASSES)])
    ax.set_ylabel("class (condition)", fontsize=8)
    ax.set_xlabel(f"{cols} samples per class (EMA generator, fixed noise)", fontsize=8)
    ax.set_title(f"{cfg.method}, guidance α = {alpha:g}", fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)
