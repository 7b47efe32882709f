"""Encode an ImageNet-style image folder into SD-VAE latents once, before training the latent presets.

    python -m reference_trainers.imagenet.latents --vae /models/sd-vae-ft-mse \\
        --images /data/imagenet/train --out /data/imagenet-latents-256 [--image-size 256] [--batch 64] \\
        [--shard-size 10000] [--device cuda|cpu] [--seed 0] [--precision fp32|bf16|fp16] [--workers 8]

Recipe (docs/imagenet_recipe.md, paper A.8): each image gets the ADM centre crop (while the short side is at
least twice ``image_size``, halve the image with a box filter; then resize the short side to ``image_size``
with BICUBIC; then crop the centre ``image_size x image_size``), is mapped to [-1, 1], and is encoded by the
SD-VAE (ft-mse); the stored latent is a posterior SAMPLE ``(mean + std * eps) * 0.18215``. The 50% horizontal
flip of training time is served from the data: every image stores two latents, index 0 of the image and
index 1 of the horizontally flipped crop.

Noise: ``eps`` of the image with index ``k`` in the sorted file list (over all candidate files, skipped
ones included) is ``torch.randn([2, C, h, w], generator=torch.Generator().manual_seed(noise_seed(seed, k)))``
on the CPU (``[0]`` for the image, ``[1]`` for its flip), so the result depends on neither the batch size,
the device nor an interruption (:func:`noise_seed`).

Files: class folders are the sorted sub-folders of ``--images`` (label = position in that order; a class
folder without images keeps its label); images are the files under a class folder (searched recursively, in
sorted order, hidden files ignored) whose extension is one of ``IMAGE_EXTENSIONS`` (case-insensitive); other
files are ignored. The skip rule (nothing is dropped silently; every skipped file is listed in the manifest's
``"skipped"`` with its reason and printed at the end with a count):

  - unreadable: PIL cannot open or fully decode the file (corrupt, truncated, not an image) -> skipped;
  - non-RGB: with ``--non-rgb convert`` (the default, what ADM's ``Image.convert("RGB")`` does, so every
    ImageNet image is kept) images of mode 1, L, LA, P, PA, RGBA, RGBX, CMYK or YCbCr are converted with
    ``Image.convert("RGB")`` (alpha is dropped) and listed in the manifest's ``"converted"`` with their mode;
    with ``--non-rgb skip`` they are skipped instead (reason ``non-RGB image (mode ...)``). Modes without a
    faithful 8-bit RGB conversion (I, I;16, F, LAB, HSV, ...) are always skipped.

Output (format "driftloss-latents-v1", read by reference_trainers/imagenet/data.py): ``--out/manifest.json``
and shards ``latents-NNNNN.npy`` (float16 ``[n, 2, C, h, w]``, h = w = image_size / 8) with
``labels-NNNNN.npy`` (int64 ``[n]``). Resumable: the manifest is rewritten atomically after each complete
shard (``"complete": false`` until the last one), and re-running the same command continues after the last
complete shard (a partially written shard is redone). Shards are filled with exactly ``--shard-size`` images
(the last one with the rest), batches never straddle shards, so a resumed run writes the same files as a
straight one (bitwise on the same device with the same ``--batch``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from reference_trainers.common.config_cli import check_fields, config_from_args, dataclass_parser, option

FORMAT = "driftloss-latents-v1"
SCALE = 0.18215                     # SD-VAE latent scaling factor
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")
CONVERTIBLE_MODES = ("1", "L", "LA", "P", "PA", "RGBA", "RGBX", "CMYK", "YCbCr")
PRECISIONS = ("fp32", "bf16", "fp16")
NON_RGB_RULES = ("convert", "skip")


@dataclass
class LatentsConfig:
    vae: str = option("", "local diffusers AutoencoderKL folder (config.json + weights), e.g. a download of "
                      "stabilityai/sd-vae-ft-mse made beforehand; nothing is downloaded at run time")
    images: str = option("", "image root laid out as <images>/<class>/<image> (sorted class folders -> "
                         "labels)")
    out: str = option("", "output folder for manifest.json and the shards; re-running the same command "
                      "continues after the last complete shard")
    image_size: int = option(256, "side of the ADM centre crop (latents are image_size/8); a multiple of 8",
                             ge=8)
    batch: int = option(64, "images per VAE call (each is encoded together with its horizontal flip)", ge=1)
    shard_size: int = option(10_000, "images per latents-NNNNN.npy shard", ge=1)
    device: str = option("auto", "cuda, cpu (or cuda:N), or auto: cuda when available")
    seed: int = option(0, "seed of the posterior-sample noise (drawn per image: see noise_seed)", ge=0)
    precision: str = option("fp32", "fp32, or bf16/fp16 autocast of the VAE (cuda only)", choices=PRECISIONS)
    workers: int = option(8, "DataLoader processes that decode and crop images (0: the main process)", ge=0)
    non_rgb: str = option("convert", "convert: non-RGB images (greyscale, palette, CMYK, RGBA) are "
                          "converted to RGB and listed in the manifest's 'converted'; skip: they are skipped "
                          "and listed in 'skipped' (unreadable files are always skipped and listed)",
                          choices=NON_RGB_RULES)
    max_shards: int = option(0, "stop after writing this many shards in this invocation (0: run to the end)",
                             ge=0)
    progress: bool = option(True, "tqdm progress bar")

    def __post_init__(self):
        check_fields(self)


def build_parser():
    return dataclass_parser(LatentsConfig, (__doc__ or "").split("\n\n")[0])


def parse_config(argv: list[str] | None) -> LatentsConfig:
    return config_from_args(LatentsConfig, vars(build_parser().parse_args(argv)))


# --------------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------------

def adm_center_crop(image, image_size: int) -> np.ndarray:
    """ADM's centre crop of an RGB PIL image: uint8 ``[image_size, image_size, 3]``.

    While the short side is at least ``2 * image_size`` the image is halved with a box filter; then the short
    side is resized to ``image_size`` with BICUBIC (the long side rounded); then the centre is cropped.
    """
    from PIL import Image

    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return np.ascontiguousarray(arr[top:top + image_size, left:left + image_size])


def load_image(path: str, image_size: int, non_rgb: str = "convert") -> tuple[np.ndarray | None, str, str]:
    """(crop, status, detail) of one file under the skip rule of the module docstring.

    status is "ok" (detail ""), "converted" (detail: the original mode) or "skipped" (detail: the reason,
    crop None).
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode == "RGB":
                rgb = img.copy()
            elif mode in CONVERTIBLE_MODES and non_rgb == "convert":
                rgb = img.convert("RGB")
            elif mode in CONVERTIBLE_MODES:
                return None, "skipped", f"non-RGB image (mode {mode}); --non-rgb convert would convert it"
            else:
                return None, "skipped", f"non-RGB image (mode {mode}) without a faithful RGB conversion"
    except Exception as err:  # anything PIL raises on a bad file: OSError, SyntaxError, ValueError, ...
        return None, "skipped", f"unreadable: {type(err).__name__}: {err}"
    status, detail = ("ok", "") if mode == "RGB" else ("converted", mode)
    return adm_center_crop(rgb, image_size), status, detail


def list_images(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(sorted class names, [(path relative to root, label)]) in the deterministic order of the module doc."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--images {root!r} is not a folder (expected <images>/<class>/<image>)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    files = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fname in sorted(filenames):
                if not fname.startswith(".") and fname.lower().endswith(IMAGE_EXTENSIONS):
                    rel = os.path.relpath(os.path.join(dirpath, fname), root)
                    files.append((Path(rel).as_posix(), label))
    if not files:
        raise FileNotFoundError(
            f"no images found under {root!r}: expected class folders <images>/<class>/ holding files with "
            f"extensions {', '.join(IMAGE_EXTENSIONS)} ({len(classes)} class folders found)")
    return classes, files


class _ImageFiles(torch.utils.data.Dataset):
    """Files ``start..`` of the list, decoded and cropped (in DataLoader workers)."""

    def __init__(self, root: str, files: list[tuple[str, int]], start: int, image_size: int, non_rgb: str):
        self.root, self.files, self.start = root, files, start
        self.image_size, self.non_rgb = image_size, non_rgb

    def __len__(self) -> int:
        return len(self.files) - self.start

    def __getitem__(self, i: int):
        k = self.start + i
        rel, label = self.files[k]
        crop, status, detail = load_image(os.path.join(self.root, rel), self.image_size, self.non_rgb)
        return k, rel, label, crop, status, detail


def _identity(item):
    return item


def _iter_files(dataset: _ImageFiles, workers: int):
    if workers <= 0:
        return (dataset[i] for i in range(len(dataset)))
    return iter(torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                                            collate_fn=_identity))


# --------------------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------------------

def noise_seed(seed: int, index: int) -> int:
    """Seed of the posterior noise of file ``index`` (position in the sorted file list) under ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


def image_noise(seed: int, index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """eps ``[2, *shape]`` of file ``index``: [0] for the image, [1] for its horizontal flip."""
    gen = torch.Generator().manual_seed(noise_seed(seed, index))
    return torch.randn((2, *shape), generator=gen)


def load_vae(path: str, device: str = "cpu"):
    """diffusers AutoencoderKL from a local folder (never downloads), in eval mode on ``device``."""
    if not path or not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"--vae {path!r} is not a local diffusers AutoencoderKL folder (a folder with config.json and "
            "the weights); give the path of a download made beforehand, e.g. of stabilityai/sd-vae-ft-mse "
            "(huggingface_hub.snapshot_download('stabilityai/sd-vae-ft-mse', local_dir=...)); nothing is "
            "downloaded at run time")
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True)
    except Exception as err:
        raise RuntimeError(f"could not load a diffusers AutoencoderKL from {path!r}: {err}") from err
    return vae.eval().requires_grad_(False).to(device)


def latent_shape(vae, image_size: int) -> tuple[int, int, int]:
    """(C, h, w) of the latents of ``image_size`` crops."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if image_size % factor:
        raise ValueError(f"image_size {image_size} is not divisible by the VAE's downsampling factor "
                         f"{factor}")
    return vae.config.latent_channels, image_size // factor, image_size // factor


@torch.no_grad()
def encode_crops(vae, crops: np.ndarray, indices: list[int], seed: int, device: str = "cpu",
                 precision: str = "fp32") -> np.ndarray:
    """Latents float16 ``[B, 2, C, h, w]`` of uint8 crops ``[B, S, S, 3]`` (file ``indices``): posterior
    samples x SCALE of each crop ([:, 0]) and of its horizontal flip ([:, 1])."""
    x = torch.from_numpy(crops).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    x = torch.cat([x, x.flip(-1)])                                   # [2B, 3, S, S]: images, then flips
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                if precision != "fp32" else contextlib.nullcontext())
    with autocast:
        moments = vae.encode(x).latent_dist.parameters
    mean, logvar = moments.float().chunk(2, dim=1)                     # as DiagonalGaussianDistribution,
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))                   # in float32
    b = len(indices)
    mean = mean.unflatten(0, (2, b)).transpose(0, 1)                   # [B, 2, C, h, w]
    std = std.unflatten(0, (2, b)).transpose(0, 1)
    eps = torch.stack([image_noise(seed, k, tuple(mean.shape[2:])) for k in indices]).to(mean.device)
    return ((mean + std * eps) * SCALE).to(torch.float16).cpu().numpy()


# --------------------------------------------------------------------------------------------------------
# shards and manifest
# --------------------------------------------------------------------------------------------------------

def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _settings(cfg: LatentsConfig, classes: list[str], files: list[tuple[str, int]], shape) -> dict:
    """The manifest fields that must match for a run to resume another one's output."""
    digest = hashlib.sha1("\n".join(f"{rel}\t{label}" for rel, label in files).encode()).hexdigest()
    return {"format": FORMAT, "shape": [2, *shape], "dtype": "float16", "scale": SCALE,
            "image_size": cfg.image_size, "classes": classes, "vae": cfg.vae, "seed": cfg.seed,
            "shard_size": cfg.shard_size, "non_rgb": cfg.non_rgb, "precision": cfg.precision,
            "files_total": len(files), "files_sha1": digest}


def _start_manifest(out: Path, settings: dict) -> dict:
    path = out / "manifest.json"
    if path.exists():
        with open(path) as f:
            manifest = json.load(f)
        diff = [k for k, v in settings.items() if manifest.get(k) != v]
        if diff:
            raise ValueError(
                f"{out} holds latents written with other settings ({', '.join(diff)} differ: "
                + "; ".join(f"{k}: {manifest.get(k)!r} there, {settings[k]!r} now" for k in diff
                            if k not in ("classes",))
                + "); give another --out, or delete that folder to start over")
        return manifest
    return {**settings, "count": 0, "shards": [], "skipped": [], "converted": [], "next_file": 0,
            "complete": False}


def _finish_shard(out: Path, index: int, mm, rows: int, labels: np.ndarray) -> dict:
    """Move a filled shard into place (trimmed to ``rows``); returns its manifest entry."""
    name, lname = f"latents-{index:05d}.npy", f"labels-{index:05d}.npy"
    tmp = out / f"{name}.partial"
    if rows < mm.shape[0]:                                             # the last shard: copy into a
        trimmed = out / f"{name}.trimmed"                              # right-sized file in chunks
        small = np.lib.format.open_memmap(trimmed, mode="w+", dtype=np.float16, shape=(rows, *mm.shape[1:]))
        for s in range(0, rows, 1024):
            small[s:s + 1024] = mm[s:min(s + 1024, rows)]
        small.flush()
        del small
        os.replace(trimmed, tmp)
    with open(out / f"{lname}.partial", "wb") as f:
        np.save(f, labels[:rows].astype(np.int64))
    os.replace(tmp, out / name)
    os.replace(out / f"{lname}.partial", out / lname)
    return {"latents": name, "labels": lname, "count": rows}


def _report(manifest: dict, out: Path, stopped: bool) -> None:
    print(f"{manifest['count']} latents in {len(manifest['shards'])} shards in {out}"
          + (" (stopped by --max-shards; run the same command again to continue)" if stopped else ""))
    skipped = manifest["skipped"]
    print(f"skipped {len(skipped)} files (listed in manifest.json 'skipped')" + (":" if skipped else ""))
    for entry in skipped[:50]:
        print(f"  {entry['path']}: {entry['reason']}")
    if len(skipped) > 50:
        print(f"  ... and {len(skipped) - 50} more in {out / 'manifest.json'}")
    if manifest["converted"]:
        print(f"converted {len(manifest['converted'])} non-RGB images to RGB (listed in manifest.json "
              "'converted')")


def run(cfg: LatentsConfig) -> dict:
    """Encode (or continue encoding) ``cfg.images`` into ``cfg.out``; returns the manifest."""
    if not cfg.vae:
        raise ValueError("--vae is required: a local diffusers AutoencoderKL folder (e.g. sd-vae-ft-mse)")
    if not cfg.images or not cfg.out:
        raise ValueError("--images and --out are required")
    if cfg.image_size <= 0 or cfg.image_size % 8:
        raise ValueError(f"--image-size must be a positive multiple of 8 (the SD-VAE downsamples by 8); "
                         f"got {cfg.image_size}")
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cuda", "cpu") and not device.startswith("cuda:"):
        raise ValueError(f"--device must be cuda, cpu or auto; got {cfg.device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but CUDA is not available; use --device cpu")
    if cfg.precision != "fp32" and not device.startswith("cuda"):
        raise ValueError(f"--precision {cfg.precision} (autocast) needs --device cuda; use fp32 on the CPU")

    vae = load_vae(cfg.vae, device)
    shape = latent_shape(vae, cfg.image_size)
    classes, files = list_images(cfg.images)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = _start_manifest(out, _settings(cfg, classes, files, shape))
    if manifest["complete"]:
        print(f"{out} is already complete")
        _report(manifest, out, False)
        return manifest

    start = manifest["next_file"]
    items = _iter_files(_ImageFiles(cfg.images, files, start, cfg.image_size, cfg.non_rgb), cfg.workers)
    bar = None
    if cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=len(files), initial=start, unit="img", desc="encoding", file=sys.stderr)
    written = 0
    try:
        while manifest["next_file"] < len(files):
            if cfg.max_shards and written >= cfg.max_shards:
                break
            index = len(manifest["shards"])
            rows_max = min(cfg.shard_size, len(files) - manifest["next_file"])
            mm = np.lib.format.open_memmap(out / f"latents-{index:05d}.npy.partial", mode="w+",
                                           dtype=np.float16, shape=(rows_max, 2, *shape))
            labels = np.empty(rows_max, np.int64)
            rows, skipped, converted, pending = 0, [], [], []
            next_file = manifest["next_file"]

            def flush(pending=pending, mm=mm, labels=labels):
                nonlocal rows
                z = encode_crops(vae, np.stack([p[1] for p in pending]), [p[0] for p in pending], cfg.seed,
                                 device, cfg.precision)
                mm[rows:rows + len(pending)] = z
                labels[rows:rows + len(pending)] = [p[2] for p in pending]
                rows += len(pending)
                pending.clear()

            for k, rel, label, crop, status, detail in items:
                next_file = k + 1
                if bar is not None:
                    bar.update(1)
                if status == "skipped":
                    skipped.append({"path": rel, "reason": detail})
                    continue
                if status == "converted":
                    converted.append({"path": rel, "mode": detail})
                pending.append((k, crop, label))
                if len(pending) == cfg.batch or rows + len(pending) == rows_max:
                    flush()
                if rows == cfg.shard_size:
                    break
            if pending:
                flush()
            mm.flush()
            if rows:
                entry = _finish_shard(out, index, mm, rows, labels)
                del mm
                manifest["shards"].append(entry)
                manifest["count"] += rows
                written += 1
            else:                                                      # only skipped files were left
                del mm
                os.remove(out / f"latents-{index:05d}.npy.partial")
            manifest["skipped"] += skipped
            manifest["converted"] += converted
            manifest["next_file"] = next_file
            manifest["complete"] = next_file >= len(files)
            _write_json(out / "manifest.json", manifest)
    finally:
        if bar is not None:
            bar.close()
    _report(manifest, out, not manifest["complete"])
    return manifest


def main(argv: list[str] | None = None) -> dict:
    return run(parse_config(argv))


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:                # the clear errors above, no traceback
        sys.exit(f"error: {err}")
