"""The ImageNet code path on scikit-learn's digits (reference_trainers/imagenet/digits_pipeline.py), reduced:
a few steps of each stage, every output checked."""

import json
import os

import numpy as np
import torch

from reference_trainers.digits.data import load_digit_splits
from reference_trainers.imagenet import digits_pipeline
from reference_trainers.imagenet.presets import get_preset


def test_upscaling_round_trips_to_the_digits():
    digits = load_digit_splits().train.images[:50]
    images = digits_pipeline.upscale(digits, 16)
    assert images.shape == (50, 16, 16, 3) and images.dtype == np.uint8
    back = digits_pipeline.to_digits(images).numpy()
    assert back.shape == digits.shape
    np.testing.assert_allclose(back, digits, atol=1 / 127.5)  # uint8 rounding only


def test_digit_folder_is_read_without_crop_or_flip(tmp_path):
    """digits-pixel has augment=False: the image reader returns each digit as written (no crop, no flip)."""
    from reference_trainers.imagenet import data

    split = load_digit_splits().train
    root = digits_pipeline.write_image_folder(split, str(tmp_path / "images"), 16)
    ds = data.open_dataset(root, get_preset("digits-pixel"))
    assert ds.crop_scale is None and ds.flip is False
    x, label = ds.item(0, torch.Generator().manual_seed(1))
    assert ds.num_classes == 10 and len(ds) == len(split.labels)
    expected = digits_pipeline.to_digits(digits_pipeline.upscale(split.images[split.labels == label][:1], 16))
    np.testing.assert_allclose(digits_pipeline.to_digits(((x.permute(1, 2, 0) + 1) * 127.5).round()
                                                         .to(torch.uint8).numpy()[None]), expected, atol=1e-2)

def test_pipeline_runs_every_stage_and_writes_its_outputs(tmp_path):
    out = tmp_path / "run"
    alphas = (1.0, 2.0)
    result = digits_pipeline.main([
        "--out", str(out), "--threads", "1", "--mae-steps", "3", "--steps", "2", "--per-class", "6",
        "--alphas", *map(str, alphas), "--no-progress", "--classifier-path", str(tmp_path / "cls.pt"),
        "--classifier-steps", "30", "--set", "n_pos=8", "n_neg=8", "n_unc=4", "mae_batch=32"])
    for name in ("results.json", "fd_table.md", "fd_vs_alpha.png", "samples_alpha1.png",
                 "encoder/encoder.pt", "train/checkpoint.pt", "samples/alpha-1.0/samples.npz",
                 "samples/alpha-2.0/grid.png"):
        assert os.path.isfile(out / name), name
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["metrics"]["alphas"]) == {str(a) for a in alphas}
    assert all(np.isfinite(m["fd"]) for m in result["metrics"]["alphas"].values())
    assert np.isfinite(saved["fd_alpha1"]) and saved["best_alpha"] in alphas
    table = (out / "fd_table.md").read_text()
    assert all(f"| {a:g} |" in table for a in alphas)
    for stage in ("data", "encoder", "train", "sample", "evaluate"):
        assert saved["times"][stage]["wall_s"] >= 0
