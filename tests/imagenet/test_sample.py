"""One-step evaluation sampling (reference_trainers/imagenet/sample.py) from tiny checkpoints in train.py's
format: the ADM .npz layout, labels in the ImageNet-val order, determinism under the seed, independence from
the batch size and from the number of ranks, grids, the VAE decode of latent presets and its errors."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from reference_trainers.common.distributed import Distributed
from reference_trainers.imagenet import sample as S
from reference_trainers.imagenet.generator import Generator
from reference_trainers.imagenet.presets import get_preset
from reference_trainers.imagenet.sampling import generate, indexed_inputs

CPU = torch.device("cpu")
FAST = ["--device", "cpu", "--precision", "fp32", "--no-progress"]


def perturbed_state(preset, seed: int) -> dict:
    """A generator's state dict moved away from the zero init (whose output is exactly 0)."""
    torch.manual_seed(seed)
    model = Generator(preset)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.state_dict()


def write_checkpoint(path, preset_name: str, step: int = 7, **overrides) -> str:
    """checkpoint.pt in train.py's layout: model, emas (one per decay), preset as a dict with lists."""
    preset = get_preset(preset_name, **overrides)
    as_dict = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(preset).items()}
    ckpt = {"model": perturbed_state(preset, 0), "emas": [perturbed_state(preset, 1 + i)
                                                         for i in range(len(preset.ema_decays))],
            "opt": {}, "source": [], "step": step, "config": {"preset": preset_name}, "preset": as_dict,
            "rng": {}}
    torch.save(ckpt, path)
    return str(path)


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    """pixel-tiny at 16x16 (16 tokens): the many runs of the determinism tests stay fast."""
    return write_checkpoint(tmp_path_factory.mktemp("small") / "checkpoint.pt", "pixel-tiny", size=16,
                            image_size=16)


@pytest.fixture(scope="module")
def latent_ckpt(tmp_path_factory):
    """latent-tiny with 8x8 latents of 64x64 images (the VAE's factor 8 kept, the decode 16x cheaper)."""
    return write_checkpoint(tmp_path_factory.mktemp("latent") / "checkpoint.pt", "latent-tiny", size=8,
                            image_size=64)


def run(ckpt, out, *extra) -> dict:
    return S.main(["--checkpoint", ckpt, "--out", str(out), *FAST, *extra])


def load(out, alpha):
    with np.load(os.path.join(out, f"alpha-{float(alpha)}", "samples.npz")) as f:
        return f["arr_0"], f["labels"], float(f["alpha"])


def test_pixel_npz_layout_labels_and_grid(small_ckpt, tmp_path):
    result = run(small_ckpt, tmp_path, "--per-class", "2", "--alpha", "1.0", "1.5", "--batch", "8",
                 "--grid", "9")
    assert sorted(result) == [1.0, 1.5]
    for alpha in (1.0, 1.5):
        images, labels, a = load(tmp_path, alpha)
        assert images.shape == (20, 16, 16, 3) and images.dtype == np.uint8  # [N, image_size, image_size, 3]
        assert a == alpha
        np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 2))  # per_class each, in class order
        assert images.std() > 5                                              # not the zero init's constant
        grid = os.path.join(tmp_path, f"alpha-{alpha}", "grid.png")
        from PIL import Image

        assert Image.open(grid).size == (3 * 16, 3 * 16)
    a1, _, _ = load(tmp_path, 1.0)
    a2, _, _ = load(tmp_path, 1.5)
    assert not np.array_equal(a1, a2)                                        # alpha conditions the generator
    info = json.load(open(tmp_path / "sample_config.json"))
    assert info["checkpoint_step"] == 7 and info["num"] == 20 and info["ema_decay"] == 0.9


def test_seed_determinism_batch_and_rank_independence(small_ckpt, tmp_path):
    base = ["--num-samples", "12", "--alpha", "1.0", "--grid", "0"]
    run(small_ckpt, tmp_path / "a", *base, "--batch", "12")
    run(small_ckpt, tmp_path / "b", *base, "--batch", "12")
    run(small_ckpt, tmp_path / "c", *base, "--batch", "5")
    run(small_ckpt, tmp_path / "d", *base, "--batch", "12", "--seed", "1")
    a, la, _ = load(tmp_path / "a", 1.0)
    np.testing.assert_array_equal(a, load(tmp_path / "b", 1.0)[0])           # same seed: identical
    c = load(tmp_path / "c", 1.0)[0]
    # another batch size: the same inputs; the network's float32 output may differ in the last bits only
    assert np.abs(a.astype(int) - c.astype(int)).max() <= 1 and (a != c).mean() < 1e-3
    assert (a != load(tmp_path / "d", 1.0)[0]).mean() > 0.5                  # another seed: other samples
    np.testing.assert_array_equal(la, (np.arange(12) * 10) // 12)            # balanced, in class order

    # two ranks (simulated one after the other without a process group): rank 1 writes its part, rank 0
    # writes its own, merges both in index order and removes the parts
    cfg = S.parse_config(["--checkpoint", small_ckpt, "--out", str(tmp_path / "e"), *FAST, *base,
                          "--batch", "4"])
    for rank in (1, 0):
        S.sample(cfg, Distributed(rank=rank, world_size=2, local_rank=rank, device=CPU))
    e = load(tmp_path / "e", 1.0)[0]
    assert np.abs(a.astype(int) - e.astype(int)).max() <= 1 and (a != e).mean() < 1e-3
    assert not [p for p in os.listdir(tmp_path / "e" / "alpha-1.0") if p.startswith("part-")]


def test_inputs_depend_only_on_seed_and_index():
    preset = get_preset("pixel-tiny")
    n1, s1 = indexed_inputs(preset, torch.arange(10), seed=3)
    n2, s2 = indexed_inputs(preset, torch.tensor([7, 8, 9]), seed=3)
    torch.testing.assert_close(n1[7:], n2, rtol=0, atol=0)
    assert torch.equal(s1[7:], s2)
    assert s1.max() < preset.style_codebook and s1.shape == (10, preset.style_tokens)
    n3, _ = indexed_inputs(preset, torch.arange(10), seed=4)
    assert not torch.equal(n1, n3)


def test_ema_selection(small_ckpt, tmp_path):
    ckpt = torch.load(small_ckpt, weights_only=False)
    for index, key in ((0, ("emas", 0)), (1, ("emas", 1)), (-1, ("model",))):
        model, preset, _ = S.load_generator(small_ckpt, index)
        expect = ckpt[key[0]] if len(key) == 1 else ckpt[key[0]][key[1]]
        assert all(torch.equal(v, expect[k]) for k, v in model.state_dict().items())
        assert preset.size == 16 and preset.betas == (0.9, 0.95)               # lists back to tuples
    run(small_ckpt, tmp_path / "raw", "--num-samples", "2", "--grid", "0", "--ema", "-1")
    assert load(tmp_path / "raw", 1.0)[0].shape == (2, 16, 16, 3)            # pixel-tiny's eval_alpha is 1.0
    with pytest.raises(ValueError, match="holds 2 EMA generator"):
        run(small_ckpt, tmp_path / "bad", "--num-samples", "2", "--ema", "5")


def _tiny_vae(path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    blocks = 4  # the SD-VAE's factor 8
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(4,) * blocks,
                        down_block_types=("DownEncoderBlock2D",) * blocks,
                        up_block_types=("UpDecoderBlock2D",) * blocks, layers_per_block=1, norm_num_groups=2,
                        sample_size=64)
    vae.save_pretrained(path)
    return str(path)


def test_latent_preset_decodes_with_vae(latent_ckpt, tmp_path):
    pytest.importorskip("diffusers")
    vae = _tiny_vae(tmp_path / "vae")
    run(latent_ckpt, tmp_path / "out", "--num-samples", "3", "--vae", vae, "--grid", "4",
        "--decode-batch", "2")
    images, labels, _ = load(tmp_path / "out", 1.0)                          # latent-tiny's eval_alpha
    assert images.shape == (3, 64, 64, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, [0, 3, 6])
    assert os.path.isfile(tmp_path / "out" / "alpha-1.0" / "grid.png")


def test_latent_preset_without_vae(latent_ckpt, tmp_path):
    with pytest.raises(ValueError, match="--vae"):
        run(latent_ckpt, tmp_path / "x", "--num-samples", "2")
    run(latent_ckpt, tmp_path / "y", "--num-samples", "2", "--latents-only", "--grid", "2")
    folder = tmp_path / "y" / "alpha-1.0"
    latents = np.load(folder / "latents.npy")
    assert latents.shape == (2, 4, 8, 8) and latents.dtype == np.float32
    np.testing.assert_array_equal(np.load(folder / "labels.npy"), [0, 5])
    assert os.path.isfile(folder / "grid.png") and not os.path.exists(folder / "samples.npz")
    # the latents are the generator's output for the indexed inputs
    model, preset, _ = S.load_generator(latent_ckpt, 0)
    labels = torch.tensor([0, 5])
    noise, style = indexed_inputs(preset, torch.arange(2), seed=0)
    with torch.no_grad():
        expect = model(noise, labels, torch.ones(2), style)
    np.testing.assert_allclose(latents, expect.numpy(), rtol=1e-5, atol=1e-5)
    # the training-time grid sampler is untouched (its own stream)
    assert generate(model, preset, labels, 1.0, seed=0, autocast=False).shape == (2, 4, 8, 8)
