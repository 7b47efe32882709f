"""The ImageNet dataset readers (reference_trainers/imagenet/data.py) on generated images and latents."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from reference_trainers.imagenet.data import (
    ImageFolderDataset,
    ImageReadError,
    LatentDataset,
    ManifestError,
    crop_latent,
    open_dataset,
    random_resized_crop_box,
)
from reference_trainers.imagenet.presets import get_preset


def write_image_folder(root, classes=("cat", "ant", "bee", "dog"), per_class=10, size=(48, 40), seed=0):
    """PNG images of class-dependent stripes plus noise: root/<class>/<k>.png (+ a non-image file)."""
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    yy, xx = np.mgrid[0:h, 0:w]
    for c, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for k in range(per_class):
            phase = rng.uniform(0, 2 * np.pi)
            freq = 0.15 + 0.1 * c
            base = 0.5 + 0.5 * np.sin(freq * (xx + (c % 2) * yy) + phase)
            rgb = np.stack([base, np.roll(base, c + 1, axis=1), 1 - base], -1)
            rgb = np.clip(rgb + rng.normal(0, 0.05, rgb.shape), 0, 1)
            Image.fromarray((rgb * 255).astype(np.uint8)).save(os.path.join(root, name, f"{k:03d}.png"))
    with open(os.path.join(root, classes[0], "notes.txt"), "w") as f:
        f.write("not an image")
    return root


def write_latents(folder, shard_counts=(7, 5, 8), num_classes=3, shape=(4, 32, 32), dtype="float16", seed=0,
                  manifest_overrides=None):
    """A driftloss-latents-v1 folder: smooth random latents (the flipped copy = the mirror) in shards."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    shards = []
    c, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    for k, n in enumerate(shard_counts):
        labels = rng.integers(0, num_classes, n).astype(np.int64)
        lat = np.empty((n, 2, c, h, w), dtype=np.float32)
        for i in range(n):
            coef = rng.normal(size=(c, 4))
            field = (coef[:, :1, None] * np.sin(3 * xx + labels[i]) + coef[:, 1:2, None] * np.cos(4 * yy)
                     + coef[:, 2:3, None] * xx * yy + 0.3 * coef[:, 3:4, None])
            lat[i, 0] = field
            lat[i, 1] = field[:, :, ::-1]
        np.save(os.path.join(folder, f"latents-{k:05d}.npy"), lat.astype(dtype))
        np.save(os.path.join(folder, f"labels-{k:05d}.npy"), labels)
        shards.append({"latents": f"latents-{k:05d}.npy", "labels": f"labels-{k:05d}.npy", "count": int(n)})
    manifest = {"format": "driftloss-latents-v1", "count": int(sum(shard_counts)), "shape": [2, *shape],
                "dtype": dtype, "scale": 0.18215, "classes": [f"n{k:08d}" for k in range(num_classes)],
                "shards": shards, "complete": True, **(manifest_overrides or {})}
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return folder



# ----------------------------------------------------------------------------------------------------------
# image folders


def test_image_folder_labels_shapes_range(tmp_path):
    root = write_image_folder(str(tmp_path / "img"), per_class=3)
    data = ImageFolderDataset(root, 32, generator=torch.Generator().manual_seed(1))
    assert data.classes == ["ant", "bee", "cat", "dog"] and data.num_classes == 4
    assert len(data) == 12 and data.labels.dtype == np.int64
    assert data.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert all(f.endswith(".png") for f in data.files)  # notes.txt ignored
    for i in range(len(data)):
        x, y = data[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
        assert y == data.labels[i] and -1.0 <= x.min() and x.max() <= 1.0
    # the augmentation comes from the generator: same state -> same item
    a, _ = data.item(0, torch.Generator().manual_seed(5))
    b, _ = data.item(0, torch.Generator().manual_seed(5))
    c, _ = data.item(0, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_image_folder_extreme_values(tmp_path):
    """Black -> -1, white -> +1 exactly."""
    for name, value in (("black", 0), ("white", 255)):
        os.makedirs(tmp_path / name)
        Image.new("RGB", (20, 30), (value,) * 3).save(tmp_path / name / "a.png")
    data = ImageFolderDataset(str(tmp_path), 16)
    assert torch.all(data[0][0] == -1.0) and torch.all(data[1][0] == 1.0)


def test_image_folder_flip_probability(tmp_path):
    """Left half dark, right half bright: the fraction of flipped items over many draws is ~0.5."""
    os.makedirs(tmp_path / "a")
    arr = np.zeros((16, 16, 3), np.uint8)
    arr[:, 8:] = 255
    Image.fromarray(arr).save(tmp_path / "a" / "x.png")
    data = ImageFolderDataset(str(tmp_path), 16, crop_scale=None, generator=torch.Generator().manual_seed(0))
    flips = [bool(data[0][0][0, 0, 0] > 0) for _ in range(400)]
    assert 0.42 < np.mean(flips) < 0.58
    no_flip = ImageFolderDataset(str(tmp_path), 16, crop_scale=None, flip=False)
    assert all(no_flip[0][0][0, 0, 0] < 0 for _ in range(20))


def test_random_resized_crop_box_bounds():
    gen = torch.Generator().manual_seed(0)
    areas = []
    for _ in range(300):
        top, left, h, w = random_resized_crop_box(40, 48, gen)
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 48 and h > 0 and w > 0
        areas.append(h * w / (40 * 48))
    assert min(areas) > 0.15 and max(areas) <= 1.0 and np.std(areas) > 0.1


def test_unreadable_image_names_the_file(tmp_path):
    os.makedirs(tmp_path / "a")
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "good.png")
    (tmp_path / "a" / "broken.jpg").write_bytes(b"this is not a jpeg")
    data = ImageFolderDataset(str(tmp_path), 8)
    bad = data.files.index(str(tmp_path / "a" / "broken.jpg"))
    with pytest.raises(ImageReadError, match="broken.jpg"):
        data[bad]


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(str(tmp_path / "missing"), 8)
    with pytest.raises(ValueError, match="no class folders"):
        ImageFolderDataset(str(tmp_path), 8)
    os.makedirs(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderDataset(str(tmp_path), 8)
    # an empty class folder keeps its label (as in the latent extraction tool)
    os.makedirs(tmp_path / "b")
    Image.new("RGB", (8, 8)).save(tmp_path / "b" / "x.png")
    data = ImageFolderDataset(str(tmp_path), 8)
    assert data.classes == ["a", "b"] and data.labels.tolist() == [1]


# ----------------------------------------------------------------------------------------------------------
# latents


def test_latents_labels_shapes_values(tmp_path):
    folder = write_latents(str(tmp_path / "lat"))
    data = LatentDataset(folder, generator=torch.Generator().manual_seed(0))
    assert len(data) == 20 and data.num_classes == 3 and data.scale == pytest.approx(0.18215)
    expected = np.concatenate([np.load(os.path.join(folder, f"labels-{k:05d}.npy")) for k in range(3)])
    assert data.labels.dtype == np.int64 and np.array_equal(data.labels, expected)
    shard1 = np.load(os.path.join(folder, "latents-00001.npy"))
    for _ in range(10):
        x, y = data[9]                         # shard 1, row 2
        assert x.dtype == torch.float32 and x.shape == (4, 32, 32) and y == expected[9]
        assert any(np.array_equal(x.numpy(), shard1[2, k].astype(np.float32)) for k in (0, 1))
    with pytest.raises(IndexError):
        data[20]


def test_latents_flip_probability_and_reproducibility(tmp_path):
    folder = write_latents(str(tmp_path / "lat"), shard_counts=(3,))
    data = LatentDataset(folder, generator=torch.Generator().manual_seed(3))
    copies = np.load(os.path.join(folder, "latents-00000.npy"))[1].astype(np.float32)
    picks = [int(np.array_equal(data[1][0].numpy(), copies[1])) for _ in range(2000)]
    assert 0.46 < np.mean(picks) < 0.54
    seq = [data.item(i % 3, torch.Generator().manual_seed(7))[0] for i in range(3)]
    again = [data.item(i % 3, torch.Generator().manual_seed(7))[0] for i in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(seq, again))
    data.generator = torch.Generator().manual_seed(11)
    first = [data[0][0] for _ in range(8)]
    data.generator = torch.Generator().manual_seed(11)
    assert all(torch.equal(a, data[0][0]) for a in first)
    no_flip = LatentDataset(folder, flip=False)
    assert all(np.array_equal(no_flip[1][0].numpy(), np.load(os.path.join(folder, "latents-00000.npy"))[1, 0])
               for _ in range(10))


def test_latent_crop(tmp_path):
    x = torch.randn(4, 32, 32)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(crop_latent(x, gen, (1.0, 1.0)), x)  # the whole grid: unchanged
    y = crop_latent(x, gen, (0.2, 0.5))
    assert y.shape == x.shape and not torch.allclose(y, x)
    # a crop of a linear ramp stays a linear ramp with a smaller slope (zoom in)
    ramp = torch.arange(32.0).expand(4, 32, 32).contiguous()
    z = crop_latent(ramp, torch.Generator().manual_seed(1), (0.2, 0.5))
    slope = z[:, :, 1:-1].diff(dim=-1)
    assert torch.allclose(slope, slope[0, 0, 0].expand_as(slope), atol=1e-4) and 0 < slope[0, 0, 0] < 1
    folder = write_latents(str(tmp_path / "lat"), shard_counts=(2,))
    data = LatentDataset(folder, crop_scale=(0.2, 1.0))
    assert data[0][0].shape == (4, 32, 32)


def test_latents_pickle_without_memmaps(tmp_path):
    folder = write_latents(str(tmp_path / "lat"), shard_counts=(2, 2))
    data = LatentDataset(folder)
    data.item(3, torch.Generator())  # opens a memory map
    clone = pickle.loads(pickle.dumps(data))
    assert clone._arrays == {}
    assert torch.equal(clone.item(3, torch.Generator().manual_seed(1))[0],
                       data.item(3, torch.Generator().manual_seed(1))[0])


def _edit_manifest(folder, **changes):
    path = os.path.join(folder, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    for k, v in changes.items():
        if v is None:
            manifest.pop(k)
        else:
            manifest[k] = v
    with open(path, "w") as f:
        json.dump(manifest, f)


@pytest.mark.parametrize("change, match", [
    ({"format": "other"}, "format must be"),
    ({"count": None}, "missing key 'count'"),
    ({"count": 19}, "add up to 20"),
    ({"count": -1}, "positive integer"),
    ({"shape": [4, 32, 32]}, r"\[2, C, H, W\]"),
    ({"shape": [2, 4, 16, 16]}, "the manifest says"),
    ({"dtype": "int8"}, "dtype must be"),
    ({"dtype": "float32"}, "the manifest says"),
    ({"scale": "x"}, "scale must be a number"),
    ({"classes": []}, "classes must be"),
    ({"classes": ["a"]}, "labels outside"),
    ({"shards": []}, "shards must be"),
    ({"shards": [{"latents": "latents-00000.npy"}]}, "shard 0 must be"),
    ({"complete": False}, "not complete"),
])
def test_manifest_errors(tmp_path, change, match):
    folder = write_latents(str(tmp_path / "lat"), shard_counts=(12, 8))
    _edit_manifest(folder, **change)
    with pytest.raises(ManifestError, match=match):
        LatentDataset(folder)


def test_manifest_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        LatentDataset(str(tmp_path))
    folder = write_latents(str(tmp_path / "lat"), shard_counts=(2, 3))
    os.remove(os.path.join(folder, "labels-00001.npy"))
    with pytest.raises(ManifestError, match="labels-00001.npy.*does not exist"):
        LatentDataset(folder)
    np.save(os.path.join(folder, "labels-00001.npy"), np.zeros(3, np.float32))
    with pytest.raises(ManifestError, match="expected int64"):
        LatentDataset(folder)
    with open(os.path.join(folder, "labels-00001.npy"), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(ManifestError, match="cannot read shard"):
        LatentDataset(folder)
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ManifestError, match="cannot parse"):
        LatentDataset(folder)
    folder = write_latents(str(tmp_path / "lat2"), shard_counts=(2,), manifest_overrides={"complete": False})
    assert len(LatentDataset(folder, allow_incomplete=True)) == 2


# ----------------------------------------------------------------------------------------------------------
# open_dataset


def test_open_dataset_by_preset(tmp_path):
    latents = write_latents(str(tmp_path / "lat"), shard_counts=(4,))
    images = write_image_folder(str(tmp_path / "img"), per_class=2)
    lat, pix = get_preset("latent-tiny"), get_preset("pixel-tiny")
    assert isinstance(open_dataset(latents, lat), LatentDataset)
    assert open_dataset(latents, lat).crop_scale is None
    assert open_dataset(latents, lat, latent_crop=True).crop_scale == (0.2, 1.0)
    data = open_dataset(images, pix)
    assert isinstance(data, ImageFolderDataset) and data[0][0].shape == (3, 64, 64)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        open_dataset(images, lat)
    with pytest.raises(ValueError, match="holds cached latents"):
        open_dataset(latents, pix)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_dataset(str(tmp_path / "nothing"), lat)
    small = write_latents(str(tmp_path / "small"), shard_counts=(2,), shape=(4, 16, 16))
    with pytest.raises(ValueError, match=r"expects \(4, 32, 32\)"):
        open_dataset(small, lat)
    many = write_latents(str(tmp_path / "many"), shard_counts=(2,), num_classes=11)
    with pytest.raises(ValueError, match="11 classes"):
        open_dataset(many, lat)
