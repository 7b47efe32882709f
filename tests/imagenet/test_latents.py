"""The latent extraction tool (reference_trainers/imagenet/latents.py) on a tiny image folder and a tiny
random-weight AutoencoderKL saved to disk and loaded back through the users' code path."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
Image = pytest.importorskip("PIL.Image")

from diffusers import AutoencoderKL  # noqa: E402

from reference_trainers.imagenet import latents as L  # noqa: E402

SIZE = 64            # crops of 64 -> latents 8x8 (factor 8, as the SD-VAE)
SEED = 3
CLASSES = ("ant", "bee", "cat")
# (class, file name, (width, height)): sizes exercise upscaling, plain bicubic and the box halving (>= 128)
RGB_IMAGES = [
    ("ant", "a0.png", (80, 64)), ("ant", "a1.png", (300, 200)), ("ant", "a2.jpg", (64, 100)),
    ("ant", "a3.png", (50, 40)),
    ("bee", "b0.png", (96, 96)), ("bee", "b1.png", (130, 260)), ("bee", "b2.png", (70, 90)),
    ("bee", "b3.png", (64, 64)),
    ("cat", "c0.png", (100, 80)), ("cat", "c1.png", (90, 66)), ("cat", "c2.png", (256, 140)),
    ("cat", "c3.png", (65, 65)),
]


def _pattern(rng, width, height):
    """A random smooth-ish RGB pattern (uint8 [h, w, 3])."""
    yy, xx = np.mgrid[0:height, 0:width]
    f = rng.uniform(0.02, 0.2, size=(3, 2))
    img = np.stack([127 + 120 * np.sin(f[c, 0] * xx + f[c, 1] * yy + c) for c in range(3)], -1)
    return np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)


def _make_images(root):
    rng = np.random.default_rng(0)
    for cls, name, (w, h) in RGB_IMAGES:
        os.makedirs(root / cls, exist_ok=True)
        Image.fromarray(_pattern(rng, w, h)).save(root / cls / name)
    Image.fromarray(_pattern(rng, 70, 80)[..., 0]).save(root / "ant" / "a4_grey.png")          # mode L
    Image.fromarray(_pattern(rng, 80, 70)).convert("CMYK").save(root / "cat" / "c4_cmyk.jpg")  # CMYK
    Image.fromarray(_pattern(rng, 80, 70)[..., 0].astype(np.uint16) * 200).save(
        root / "bee" / "b4_i16.png")                                                           # 16-bit
    (root / "bee" / "b5_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 256, 64)))
    (root / "cat" / "notes.txt").write_text("not an image: ignored by extension")


def _make_vae(path):
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=8,
                        sample_size=SIZE)
    vae.save_pretrained(path)


def _argv(setup, out, *extra):
    return ["--vae", str(setup["vae"]), "--images", str(setup["images"]), "--out", str(out),
            "--image-size", str(SIZE), "--batch", "4", "--shard-size", "5", "--device", "cpu",
            "--seed", str(SEED), "--workers", "0", "--no-progress", *extra]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("latents")
    _make_images(base / "images")
    _make_vae(base / "vae")
    setup = {"base": base, "images": base / "images", "vae": base / "vae"}
    setup["manifest"] = L.main(_argv(setup, base / "straight"))
    setup["out"] = base / "straight"
    return setup


def _load(out):
    with open(out / "manifest.json") as f:
        manifest = json.load(f)
    z = np.concatenate([np.load(out / s["latents"]) for s in manifest["shards"]])
    y = np.concatenate([np.load(out / s["labels"]) for s in manifest["shards"]])
    return manifest, z, y


def _files_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_manifest_shapes_labels_and_skips(setup, capsys):
    manifest, z, y = _load(setup["out"])
    assert manifest == setup["manifest"]
    assert manifest["format"] == "driftloss-latents-v1"
    assert manifest["dtype"] == "float16" and manifest["scale"] == 0.18215
    assert manifest["image_size"] == SIZE and manifest["shape"] == [2, 4, 8, 8]
    assert manifest["classes"] == list(CLASSES)
    assert manifest["vae"] == str(setup["vae"]) and manifest["complete"] is True
    # 12 RGB + greyscale + CMYK (converted); the 16-bit and the corrupt file skipped; notes.txt ignored
    assert manifest["count"] == 14 == len(z) == len(y)
    assert [s["count"] for s in manifest["shards"]] == [5, 5, 4]
    assert [s["latents"] for s in manifest["shards"]] == [f"latents-0000{i}.npy" for i in range(3)]
    for s in manifest["shards"]:
        lat, lab = np.load(setup["out"] / s["latents"]), np.load(setup["out"] / s["labels"])
        assert lat.dtype == np.float16 and lat.shape == (s["count"], 2, 4, 8, 8)
        assert lab.dtype == np.int64 and lab.shape == (s["count"],)
    assert np.isfinite(z).all() and not np.array_equal(z[:, 0], z[:, 1])
    # sorted order: ant (a0-a3, a4_grey), bee (b0-b3; b4 and b5 skipped), cat (c0-c3, c4_cmyk)
    assert y.tolist() == [0] * 5 + [1] * 4 + [2] * 5
    skipped = {e["path"]: e["reason"] for e in manifest["skipped"]}
    assert set(skipped) == {"bee/b4_i16.png", "bee/b5_corrupt.png"}
    assert skipped["bee/b5_corrupt.png"].startswith("unreadable")
    assert "I;16" in skipped["bee/b4_i16.png"]
    assert manifest["converted"] == [{"path": "ant/a4_grey.png", "mode": "L"},
                                     {"path": "cat/c4_cmyk.jpg", "mode": "CMYK"}]
    L.main(_argv(setup, setup["out"]))                 # a complete folder: nothing to do, the report again
    printed = capsys.readouterr().out
    assert "already complete" in printed and "skipped 2 files" in printed and "b5_corrupt.png" in printed


def _adm_crop(img, size):
    """The ADM centre crop written out again: box-halve while short side >= 2 size, bicubic, centre."""
    while min(img.size) >= 2 * size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.BOX)
    s = size / min(img.size)
    img = img.resize((round(img.size[0] * s), round(img.size[1] * s)), resample=Image.BICUBIC)
    a = np.array(img)
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[top:top + size, left:left + size]


@pytest.mark.parametrize("row, rel, file_index", [(1, "ant/a1.png", 1), (11, "cat/c2.png", 13),
                                                  (4, "ant/a4_grey.png", 4)])
def test_latent_is_posterior_sample_of_crop_and_flip(setup, row, rel, file_index):
    _, z, _ = _load(setup["out"])
    vae = AutoencoderKL.from_pretrained(setup["vae"]).eval()
    crop = _adm_crop(Image.open(setup["images"] / rel).convert("RGB"), SIZE)
    assert crop.shape == (SIZE, SIZE, 3)
    x = torch.from_numpy(crop.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    seed = int(np.random.SeedSequence([SEED, file_index]).generate_state(1, np.uint64)[0])
    eps = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for view, image in enumerate([x, x.flip(-1)]):
            post = vae.encode(image).latent_dist
            want = ((post.mean + post.std * eps[view]) * 0.18215)[0].numpy()
            np.testing.assert_allclose(z[row, view].astype(np.float32), want, rtol=2e-3, atol=2e-3)
            assert np.abs(want - post.mean[0].numpy() * 0.18215).max() > 1e-2     # really a sample


def test_deterministic_under_seed(setup):
    base = setup["base"]
    L.main(_argv(setup, base / "again", "--workers", "1"))           # the DataLoader path
    assert _files_bytes(base / "again") == _files_bytes(setup["out"])
    L.main(_argv(setup, base / "batch3", "--batch", "3"))           # noise is per image, not per batch
    np.testing.assert_allclose(_load(base / "batch3")[1].astype(np.float32),
                               _load(setup["out"])[1].astype(np.float32), atol=2e-3)
    L.main(_argv(setup, base / "seed4", "--seed", "4"))
    assert np.abs(_load(base / "seed4")[1].astype(np.float32) - _load(setup["out"])[1]).max() > 1e-2


def test_interrupt_and_resume_equal_a_straight_run(setup, capsys):
    out = setup["base"] / "resumed"
    first = L.main(_argv(setup, out, "--max-shards", "1"))
    assert first["complete"] is False and first["count"] == 5 and len(first["shards"]) == 1
    assert "run the same command again" in capsys.readouterr().out
    # a crash in the middle of shard 1: a partial file left behind, the manifest still at one shard
    (out / "latents-00001.npy.partial").write_bytes(b"garbage")
    second = L.main(_argv(setup, out, "--max-shards", "1"))
    assert second["count"] == 10 and second["next_file"] == 12     # shard 1: bee/b0-b3 and cat/c0.png,
    assert {e["path"] for e in second["skipped"]} == {"bee/b4_i16.png", "bee/b5_corrupt.png"}  # 2 skips
    L.main(_argv(setup, out))
    assert _files_bytes(out) == _files_bytes(setup["out"])


def test_non_rgb_skip_rule(setup):
    manifest = L.main(_argv(setup, setup["base"] / "skip", "--non-rgb", "skip"))
    assert manifest["count"] == 12 and manifest["converted"] == []
    reasons = {e["path"]: e["reason"] for e in manifest["skipped"]}
    assert set(reasons) == {"ant/a4_grey.png", "bee/b4_i16.png", "bee/b5_corrupt.png", "cat/c4_cmyk.jpg"}
    assert reasons["ant/a4_grey.png"].startswith("non-RGB image (mode L)")


def test_clear_errors(setup, tmp_path):
    with pytest.raises(FileNotFoundError, match="local diffusers AutoencoderKL folder.*sd-vae-ft-mse"):
        L.main(_argv(setup, tmp_path / "o") + ["--vae", str(tmp_path / "missing")])
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images found"):
        L.main(_argv(setup, tmp_path / "o") + ["--images", str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="multiple of 8"):
        L.main(_argv(setup, tmp_path / "o") + ["--image-size", "60"])
    with pytest.raises(SystemExit) as exit_info:                    # a usage error naming the flag
        L.main(_argv(setup, tmp_path / "o") + ["--precision", "fp8"])
    assert exit_info.value.code == 2
    shutil.copytree(setup["out"], tmp_path / "other")
    with pytest.raises(ValueError, match="other settings.*seed"):
        L.main(_argv(setup, tmp_path / "other") + ["--seed", "5"])


def test_training_runs_on_extracted_latents(setup, tmp_path):
    """The pipeline's first two stages: PNGs -> latents.py -> a few guided drifting steps (latent-tiny on
    the tiny VAE's 16x16 latents of 128x128 crops; the encoder needs a grid of a multiple of 16)."""
    from reference_trainers.imagenet import train

    argv = _argv(setup, tmp_path / "latents")
    argv[argv.index("--image-size") + 1] = "128"
    L.main(argv)
    run = tmp_path / "run"
    summary = train.main(["--preset", "latent-tiny", "--data", str(tmp_path / "latents"), "--out", str(run),
                          "--set", "steps=2", "size=16", "--no-progress", "--grid-every", "2",
                          "--log-every", "1", "--threads", "1"])
    assert summary["step"] == 2 and np.isfinite(summary["loss"])
    assert (run / "grids" / "step-0000002.png").is_file()
