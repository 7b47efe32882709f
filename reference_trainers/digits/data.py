"""scikit-learn's bundled handwritten digits (1,797 images, 8x8, 10 classes; no download) and step batches.

The images are split once, stratified by class, with a fixed seed:
  train       50%  the generator's real samples and the feature encoder's pre-training data
  classifier  25%  only for training the separate evaluation classifier
  held_out    25%  the reference set of the evaluation (FD-digits) and the classifier's test set
Pixels (0..16) are scaled to [-1, 1]; images are [n, 1, 8, 8] float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

NUM_CLASSES = 10
SPLIT_FRACTIONS = {"train": 0.5, "classifier": 0.25, "held_out": 0.25}


@dataclass
class DigitsSplit:
    images: np.ndarray  # [n, 1, 8, 8] float32 in [-1, 1]
    labels: np.ndarray  # [n] int64

    def of_class(self, c: int) -> np.ndarray:
        return self.images[self.labels == c]


@dataclass
class Digits:
    train: DigitsSplit
    classifier: DigitsSplit
    held_out: DigitsSplit


def load_digit_splits(split_seed: int = 0) -> Digits:
    """The three stratified splits (see the module docstring); the same for a given split_seed."""
    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # [1797, 1, 8, 8]
    labels = bunch.target.astype(np.int64)
    idx = np.arange(len(labels))
    train, rest = train_test_split(idx, train_size=SPLIT_FRACTIONS["train"], stratify=labels,
                                   random_state=split_seed)
    classifier, held_out = train_test_split(rest, train_size=0.5, stratify=labels[rest],
                                            random_state=split_seed)
    splits = (np.sort(i) for i in (train, classifier, held_out))
    return Digits(*(DigitsSplit(images[i], labels[i]) for i in splits))


@dataclass
class StepBatch:
    """What one training step needs; every field is a pure function of (seed, step)."""

    classes: torch.Tensor   # [G] int64, the classes of this step's kernel problems
    noise: torch.Tensor     # [G, N, noise_dim]
    pos: torch.Tensor       # [G, P, 1, 8, 8] real images of each class
    uncond: torch.Tensor    # [G, M, 1, 8, 8] real images of any class (guidance negatives)
    u_alpha: torch.Tensor   # [G] uniform draws for the alpha sampler
    u_one: torch.Tensor     # [G] uniform draws deciding alpha = 1


def step_batch(data: DigitsSplit, seed: int, step: int, n_classes: int, n_gen: int, n_pos: int,
               n_uncond: int, noise_dim: int) -> StepBatch:
    """The batch of optimizer step ``step`` (its own RNG stream, so a resumed run draws the same batches)."""
    rng = np.random.default_rng([seed, step])
    classes = np.sort(rng.choice(NUM_CLASSES, n_classes, replace=False))
    pos = np.stack([_draw(rng, data.of_class(int(c)), n_pos) for c in classes])
    uncond = np.stack([_draw(rng, data.images, n_uncond) for _ in classes])
    noise = rng.standard_normal((n_classes, n_gen, noise_dim)).astype(np.float32)
    u_alpha, u_one = rng.random(n_classes), rng.random(n_classes)
    return StepBatch(*(torch.from_numpy(a) for a in (classes, noise, pos, uncond)),
                     torch.from_numpy(u_alpha).float(), torch.from_numpy(u_one).float())


def _draw(rng: np.random.Generator, images: np.ndarray, n: int) -> np.ndarray:
    """n images, without replacement when there are enough."""
    return images[rng.choice(len(images), n, replace=n > len(images))]


def shifted(images: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Each image [n, 1, 8, 8] translated by a random (dy, dx) in [-max_shift, max_shift]^2, padded with
    the background value -1 (augmentation for the classifiers)."""
    n = images.shape[0]
    pad = torch.nn.functional.pad(images, (max_shift,) * 4, value=-1.0)
    shifts = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    rows = (shifts[:, 0, None] + torch.arange(8))[:, :, None]          # [n, 8, 1]
    cols = (shifts[:, 1, None] + torch.arange(8))[:, None, :]          # [n, 1, 8]
    return pad[torch.arange(n)[:, None, None], 0, rows, cols][:, None]  # [n, 1, 8, 8]
