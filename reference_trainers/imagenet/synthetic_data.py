"""Synthetic data in the trainers' formats, for smoke runs without ImageNet (and for the tests).

    python -m reference_trainers.imagenet.synthetic_data --out runs/synthetic
    python -m reference_trainers.imagenet.train --preset latent-tiny --data runs/synthetic/latents --out run
    python -m reference_trainers.imagenet.train --preset pixel-tiny --data runs/synthetic/images --out run2

Writes <out>/latents (the latents format of latents.py: manifest.json + shards [n, 2, 4, 32, 32], each class
a Gaussian blob around its own mean) and <out>/images (root/<class>/<i>.png, each class noise around its own
colour). Nothing here resembles ImageNet: it only exercises the code paths.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import numpy as np

from reference_trainers.common.config_cli import dataclass_parser, option


def write_latents(root: str, classes: int = 3, per_class: int = 12, size: int = 32, seed: int = 0) -> str:
    """A latents folder [n, 2, 4, size, size] float16 + int64 labels in one shard; returns ``root``."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    labels = np.repeat(np.arange(classes), per_class).astype(np.int64)
    centres = rng.normal(size=(classes, 1, 4, 1, 1))
    latents = (centres[labels] + 0.5 * rng.normal(size=(labels.size, 2, 4, size, size))).astype(np.float16)
    np.save(os.path.join(root, "latents-00000.npy"), latents)
    np.save(os.path.join(root, "labels-00000.npy"), labels)
    manifest = {"format": "driftloss-latents-v1", "count": int(labels.size), "shape": [2, 4, size, size],
                "dtype": "float16", "scale": 0.18215, "image_size": 8 * size,
                "classes": [f"class{c}" for c in range(classes)],
                "shards": [{"latents": "latents-00000.npy", "labels": "labels-00000.npy",
                            "count": int(labels.size)}], "skipped": [], "vae": "synthetic", "complete": True}
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return root


def write_images(root: str, classes: int = 2, per_class: int = 10, size: int = 72, seed: int = 0) -> str:
    """An image folder root/class<c>/<i>.png of RGB noise around a colour per class; returns ``root``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = os.path.join(root, f"class{c}")
        os.makedirs(folder, exist_ok=True)
        base = rng.integers(0, 256, size=3)
        for i in range(per_class):
            img = np.clip(base + rng.normal(scale=40, size=(size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(folder, f"{i}.png"))
    return root


@dataclass
class SyntheticConfig:
    out: str = option("runs/synthetic", "output folder: <out>/latents and <out>/images")
    classes: int = option(10, "number of classes", ge=2)
    per_class: int = option(32, "samples per class", ge=1)
    image_size: int = option(72, "side of the PNG images (pixel-tiny crops them to 64)", ge=8)
    seed: int = option(0, "seed", ge=0)


def main(argv: list[str] | None = None) -> SyntheticConfig:
    cfg = SyntheticConfig(**vars(dataclass_parser(SyntheticConfig, __doc__).parse_args(argv)))
    write_latents(os.path.join(cfg.out, "latents"), cfg.classes, cfg.per_class, seed=cfg.seed)
    write_images(os.path.join(cfg.out, "images"), cfg.classes, cfg.per_class, cfg.image_size, cfg.seed)
    print(f"wrote {cfg.classes} classes x {cfg.per_class}: {cfg.out}/latents and {cfg.out}/images")
    return cfg


if __name__ == "__main__":
    main(sys.argv[1:])
