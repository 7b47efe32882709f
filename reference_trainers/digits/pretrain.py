"""Pre-training of the feature encoder and of the evaluation classifier, cached on local disk.

Both are digit classifiers trained here (cross-entropy, Adam, random +-1 pixel shifts); nothing is
downloaded. The cache file holds {"model", "key", "accuracy"}; a file whose key (what it was trained
from: kind, split seed, steps, seed) differs from the one asked for is retrained and overwritten.

    encoder    = load_or_pretrain_encoder(cfg, data)      # FeatureEncoder on the train split, seed 1
    classifier = load_or_train_eval_classifier(cfg, data)  # EvalClassifier on the classifier split, seed 2
"""

from __future__ import annotations

import os

import torch
from torch import nn

from reference_trainers.digits.config import DigitsConfig
from reference_trainers.digits.data import Digits, DigitsSplit, shifted
from reference_trainers.digits.models import EvalClassifier, FeatureEncoder, initialize_weights

ENCODER_SEED = 1
CLASSIFIER_SEED = 2
BATCH = 128


def train_classifier(model: nn.Module, split: DigitsSplit, steps: int, seed: int, lr: float = 2e-3,
                     weight_decay: float = 1e-4) -> nn.Module:
    """Minimize cross-entropy on ``split`` (shifted copies; AdamW, cosine decay); returns the model in eval
    mode."""
    initialize_weights(model, seed)
    gen = torch.Generator().manual_seed(seed)
    images, labels = torch.from_numpy(split.images), torch.from_numpy(split.labels)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (BATCH,), generator=gen)
        loss = nn.functional.cross_entropy(model(shifted(images[idx], gen)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, split: DigitsSplit) -> float:
    """Fraction of ``split`` classified correctly."""
    pred = model(torch.from_numpy(split.images)).argmax(dim=1).numpy()
    return float((pred == split.labels).mean())


def _load_or_train(path: str, key: dict, build: type[nn.Module], train_split: DigitsSplit,
                   test_split: DigitsSplit, steps: int, seed: int) -> nn.Module:
    model = build()
    if path and os.path.exists(path):
        cached = torch.load(path, weights_only=False)
        if cached.get("key") == key:
            model.load_state_dict(cached["model"])
            return model.eval().requires_grad_(False)
    train_classifier(model, train_split, steps, seed)
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        torch.save({"model": model.state_dict(), "key": key, "accuracy": accuracy(model, test_split)}, path)
    return model.eval().requires_grad_(False)


def load_or_pretrain_encoder(cfg: DigitsConfig, data: Digits) -> FeatureEncoder:
    """The frozen feature encoder of drifting and MMD, trained on the train split (the generator's data)."""
    key = {"kind": "encoder", "split_seed": cfg.split_seed, "steps": cfg.encoder_steps, "seed": ENCODER_SEED}
    return _load_or_train(cfg.encoder_path, key, FeatureEncoder, data.train, data.held_out,
                          cfg.encoder_steps, ENCODER_SEED)


def load_or_train_eval_classifier(cfg: DigitsConfig, data: Digits) -> EvalClassifier:
    """The frozen evaluation classifier, trained on the classifier split only (never seen by a generator)."""
    key = {"kind": "eval_classifier", "split_seed": cfg.split_seed, "steps": cfg.classifier_steps,
           "seed": CLASSIFIER_SEED}
    return _load_or_train(cfg.classifier_path, key, EvalClassifier, data.classifier, data.held_out,
                          cfg.classifier_steps, CLASSIFIER_SEED)
