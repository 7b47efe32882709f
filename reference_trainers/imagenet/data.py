"""Dataset readers of the ImageNet trainers: an image folder (pixel presets) and cached VAE latents.

    data = open_dataset("/data/imagenet/train", get_preset("pixel-b16"))    # ImageFolderDataset
    data = open_dataset("/data/latents/train", get_preset("latent-b2"))     # LatentDataset
    x, label = data[i]                  # float32 tensor, int label
    data.labels                         # np.ndarray int64 [N] (for class-balanced sampling)
    data.generator = torch.Generator().manual_seed(seed + rank)   # the augmentation randomness
    x, label = data.item(i, generator)  # or draw the augmentation from an explicit generator

Layouts (see docs/imagenet_recipe.md):

* Images: ``root/<class>/<image>`` (files found recursively under each class folder, by extension, hidden
  files and folders ignored); the class folders' names sorted give labels 0..K-1 (an empty class folder
  keeps its label, as in the latent extraction tool). An item is a RandomResizedCrop (area scale 0.2-1,
  aspect ratio 3/4-4/3, bicubic) to ``image_size`` plus a horizontal flip with probability 0.5, as
  float32 [3, S, S] in [-1, 1]. A file that cannot be read or converted to RGB raises ImageReadError
  naming it.
* Latents: ``folder/manifest.json`` = {"format": "driftloss-latents-v1", "count": N,
  "shape": [2, 4, 32, 32], "dtype": "float16", "scale": 0.18215, "classes": [...], "shards": [{"latents":
  "latents-00000.npy", "labels": "labels-00000.npy", "count": n}, ...], ...}. Latents shards are .npy
  [n, 2, 4, 32, 32] (index 1 along axis 1: the latent of the horizontally flipped image), labels shards
  int64 [n]. The stored latents are the ones the generator produces, i.e. already multiplied by
  ``scale`` (divide by it before decoding with the VAE). An item takes the flipped copy with probability
  0.5 and returns float32 [4, 32, 32]. With ``crop_scale`` (MAE pretraining only) the latent grid is
  also randomly resized-cropped and resized back to 32x32 (bilinear): a crop "before the VAE" is not
  possible from cached latents, so the crop is applied to the latent grid itself. A manifest with
  "complete": false (an extraction still running or interrupted) is refused unless allow_incomplete.

Augmentation randomness: each dataset has a ``generator`` attribute (a torch.Generator, default seeded 0)
that ``__getitem__`` draws from; set it per epoch / rank, save its ``get_state()`` for an exact resume,
or call ``item(i, generator)`` with a generator of your own. A DataLoader with workers copies the dataset
(and its generator) into each worker: give each worker its own generator (worker_init_fn) or pass
generators explicitly, as pretrain_encoder.py does.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from reference_trainers.imagenet.presets import Preset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")
LATENTS_FORMAT = "driftloss-latents-v1"
LATENT_DTYPES = ("float16", "float32")
CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


class ImageReadError(RuntimeError):
    """An image file that cannot be decoded or converted to RGB."""


class ManifestError(ValueError):
    """A latents folder whose manifest.json or shards do not match the driftloss-latents-v1 layout."""


def _default_generator(generator: torch.Generator | None) -> torch.Generator:
    return generator if generator is not None else torch.Generator().manual_seed(0)


def _uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64).item()


def _randint(generator: torch.Generator, high: int) -> int:
    """Uniform integer in [0, high)."""
    return int(torch.randint(high, (), generator=generator).item())


def random_resized_crop_box(height: int, width: int, generator: torch.Generator,
                            scale: Sequence[float] = CROP_SCALE, ratio: Sequence[float] = CROP_RATIO
                            ) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering an area fraction in ``scale`` with aspect ratio w/h in
    ``ratio`` (log-uniform); after 10 failed draws, the largest central crop within ``ratio``
    (torchvision's RandomResizedCrop rule, drawn from ``generator``)."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * _uniform(generator, scale[0], scale[1])
        aspect = math.exp(_uniform(generator, log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return _randint(generator, height - h + 1), _randint(generator, width - w + 1), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _class_folders(root: str) -> list[str]:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist (expected root/<class>/<image>)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {root!r} has no class folders (expected root/<class>/<image>)")
    return classes


def _image_files(folder: str) -> list[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return files


def load_rgb(path: str) -> Image.Image:
    """The image at ``path`` as an RGB PIL image; ImageReadError naming the file if that fails."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:  # any decoder failure: truncated, not an image, unsupported mode, ...
        raise ImageReadError(f"cannot read {path!r} as an RGB image ({type(e).__name__}: {e}); remove or "
                             "replace the file (the extraction tool skips such files)") from e


def to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 RGB image -> float32 [3, H, W] in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images of ``root/<class>/<image>`` as float32 [3, image_size, image_size] in [-1, 1], int label.

    crop_scale: area range of the RandomResizedCrop (None: the central square, resized, no randomness
    from cropping). flip: horizontal flip with probability 0.5.
    """

    def __init__(self, root: str, image_size: int, *, crop_scale: Sequence[float] | None = CROP_SCALE,
                 flip: bool = True, generator: torch.Generator | None = None):
        self.root = root
        self.image_size = image_size
        self.crop_scale = None if crop_scale is None else tuple(crop_scale)
        self.flip = flip
        self.generator = _default_generator(generator)
        self.classes = _class_folders(root)
        self.files: list[str] = []
        labels = []
        for label, name in enumerate(self.classes):  # a class folder without images keeps its label
            files = _image_files(os.path.join(root, name))
            self.files += files
            labels += [label] * len(files)
        if not self.files:
            raise FileNotFoundError(f"image folder {root!r} has no images with extensions "
                                    f"{', '.join(IMAGE_EXTENSIONS)} in its {len(self.classes)} class folders "
                                    "(expected root/<class>/<image>)")
        self.labels = np.asarray(labels, dtype=np.int64)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.item(i, self.generator)

    def item(self, i: int, generator: torch.Generator) -> tuple[torch.Tensor, int]:
        """Item ``i`` with its crop and flip drawn from ``generator``."""
        path = self.files[i]
        img = load_rgb(path)
        width, height = img.size
        if self.crop_scale is None:
            side = min(width, height)
            top, left, h, w = (height - side) // 2, (width - side) // 2, side, side
        else:
            top, left, h, w = random_resized_crop_box(height, width, generator, self.crop_scale)
        size = (self.image_size, self.image_size)
        img = img.resize(size, Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
        if self.flip and _uniform(generator) < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_tensor(img), int(self.labels[i])


def read_manifest(folder: str, allow_incomplete: bool = False) -> dict:
    """The validated manifest.json of a latents folder (ManifestError / FileNotFoundError if invalid)."""
    path = os.path.join(folder, "manifest.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no manifest.json in {folder!r}: not a latents folder written by the "
                                "extraction tool")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: cannot parse ({e})") from e

    def bad(msg: str) -> ManifestError:
        return ManifestError(f"{path}: {msg}")

    if not isinstance(manifest, dict):
        raise bad("must hold a JSON object")
    if manifest.get("format") != LATENTS_FORMAT:
        raise bad(f"format must be {LATENTS_FORMAT!r}; got {manifest.get('format')!r}")
    if manifest.get("complete") is False and not allow_incomplete:
        raise bad("the extraction is not complete (\"complete\": false); finish it by re-running the "
                  "extraction tool, or pass allow_incomplete=True to read the shards written so far")
    for key in ("count", "shape", "dtype", "scale", "classes", "shards"):
        if key not in manifest:
            raise bad(f"missing key {key!r}")
    count, shape = manifest["count"], manifest["shape"]
    if not (isinstance(count, int) and count > 0):
        raise bad(f"count must be a positive integer; got {count!r}")
    if not (isinstance(shape, list) and len(shape) == 4 and shape[0] == 2
            and all(isinstance(s, int) and s > 0 for s in shape)):
        raise bad(f"shape must be [2, C, H, W] (original and flipped copy); got {shape!r}")
    if manifest["dtype"] not in LATENT_DTYPES:
        raise bad(f"dtype must be one of {LATENT_DTYPES}; got {manifest['dtype']!r}")
    if not isinstance(manifest["scale"], (int, float)) or isinstance(manifest["scale"], bool):
        raise bad(f"scale must be a number; got {manifest['scale']!r}")
    classes = manifest["classes"]
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise bad("classes must be a non-empty list of class names")
    shards = manifest["shards"]
    if not (isinstance(shards, list) and shards):
        raise bad("shards must be a non-empty list")
    for k, shard in enumerate(shards):
        if not (isinstance(shard, dict) and isinstance(shard.get("latents"), str)
                and isinstance(shard.get("labels"), str) and isinstance(shard.get("count"), int)
                and shard["count"] >= 0):
            raise bad(f"shard {k} must be {{'latents': file, 'labels': file, 'count': n}}; got {shard!r}")
    total = sum(s["count"] for s in shards)
    if total != count:
        raise bad(f"the shards' counts add up to {total}, not count = {count}")
    return manifest


class LatentDataset(torch.utils.data.Dataset):
    """Cached VAE latents (module docstring) as float32 [C, H, W] (the flipped copy with probability 0.5
    if ``flip``; a random resized crop of the latent grid if ``crop_scale``), int label."""

    def __init__(self, folder: str, *, flip: bool = True, crop_scale: Sequence[float] | None = None,
                 generator: torch.Generator | None = None, allow_incomplete: bool = False):
        self.folder = folder
        self.manifest = read_manifest(folder, allow_incomplete)
        self.flip = flip
        self.crop_scale = None if crop_scale is None else tuple(crop_scale)
        self.generator = _default_generator(generator)
        self.classes: list[str] = list(self.manifest["classes"])
        self.scale = float(self.manifest["scale"])
        self.shape = tuple(self.manifest["shape"][1:])           # (C, H, W) of one item
        dtype = np.dtype(self.manifest["dtype"])
        self._paths = []
        labels = []
        for k, shard in enumerate(self.manifest["shards"]):
            lat_path = os.path.join(folder, shard["latents"])
            lab_path = os.path.join(folder, shard["labels"])
            n = shard["count"]
            lat, lab = self._load(lat_path), self._load(lab_path)
            where = f"{folder}: shard {k}"
            if lat.shape != (n, 2, *self.shape) or lat.dtype != dtype:
                raise ManifestError(f"{where}: {shard['latents']} holds {lat.dtype} {lat.shape}; the "
                                    f"manifest says {dtype} {(n, 2, *self.shape)}")
            if lab.shape != (n,) or not np.issubdtype(lab.dtype, np.integer):
                raise ManifestError(f"{where}: {shard['labels']} holds {lab.dtype} {lab.shape}; expected "
                                    f"int64 ({n},)")
            lab = np.asarray(lab, dtype=np.int64)
            if n and (lab.min() < 0 or lab.max() >= len(self.classes)):
                raise ManifestError(f"{where}: labels outside 0..{len(self.classes) - 1} (the manifest's "
                                    f"{len(self.classes)} classes)")
            self._paths.append(lat_path)
            labels.append(lab)
        self.labels = np.concatenate(labels)
        self._ends = np.cumsum([s["count"] for s in self.manifest["shards"]])
        self._arrays: dict[int, np.ndarray] = {}

    @staticmethod
    def _load(path: str) -> np.ndarray:
        if not os.path.isfile(path):
            raise ManifestError(f"shard file {path!r} listed in the manifest does not exist")
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise ManifestError(f"cannot read shard file {path!r} as a .npy array ({e})") from e

    def __getstate__(self) -> dict:  # memory maps are reopened in each process, not pickled
        return {**self.__dict__, "_arrays": {}}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.item(i, self.generator)

    def item(self, i: int, generator: torch.Generator) -> tuple[torch.Tensor, int]:
        """Item ``i`` with its flip (and crop) drawn from ``generator``."""
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} latents")
        k = int(np.searchsorted(self._ends, i, side="right"))
        if k not in self._arrays:
            self._arrays[k] = np.load(self._paths[k], mmap_mode="r")
        j = i - (int(self._ends[k - 1]) if k else 0)
        copy = int(self.flip and _uniform(generator) < 0.5)
        x = torch.from_numpy(np.array(self._arrays[k][j, copy], dtype=np.float32))
        if self.crop_scale is not None:
            x = crop_latent(x, generator, self.crop_scale)
        return x, int(self.labels[i])


def crop_latent(x: torch.Tensor, generator: torch.Generator, scale: Sequence[float] = CROP_SCALE
                ) -> torch.Tensor:
    """A random resized crop of the latent grid x [C, H, W] (crop box as random_resized_crop_box),
    resized back to [C, H, W] (bilinear)."""
    height, width = x.shape[-2:]
    top, left, h, w = random_resized_crop_box(height, width, generator, scale)
    crop = x[None, :, top:top + h, left:left + w]
    return F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)[0]


def open_dataset(path: str, preset: Preset, *, generator: torch.Generator | None = None,
                 latent_crop: bool = False) -> ImageFolderDataset | LatentDataset:
    """The dataset of ``preset`` at ``path``: cached latents (a folder with manifest.json) for latent
    presets, an image folder for pixel presets; clear errors when they do not match the preset.

    latent_crop: also randomly resize-crop the latent grid (scale 0.2-1): the MAE pretraining's crop.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"data folder {path!r} does not exist")
    has_manifest = os.path.isfile(os.path.join(path, "manifest.json"))
    if preset.space == "latent":
        if not has_manifest:
            raise FileNotFoundError(
                f"preset {preset.name!r} reads cached VAE latents, but {path!r} has no manifest.json "
                "(extract the latents of the image folder first, or use a pixel preset)")
        data = LatentDataset(path, crop_scale=CROP_SCALE if latent_crop else None, generator=generator)
        want = (preset.channels, preset.size, preset.size)
        if data.shape != want:
            raise ValueError(f"{path!r} holds latents of shape {data.shape}; preset {preset.name!r} "
                             f"expects {want}")
    elif preset.space == "pixel":
        if has_manifest:
            raise ValueError(f"{path!r} holds cached latents (manifest.json); preset {preset.name!r} reads "
                             "images: give the image folder, or use a latent preset")
        data = ImageFolderDataset(path, preset.image_size, generator=generator,
                                  crop_scale=CROP_SCALE if preset.augment else None, flip=preset.augment)
    else:
        raise ValueError(f"preset {preset.name!r}: unknown space {preset.space!r}")
    if data.num_classes > preset.num_classes:
        raise ValueError(f"{path!r} has {data.num_classes} classes; preset {preset.name!r} has only "
                         f"{preset.num_classes} (num_classes)")
    return data
