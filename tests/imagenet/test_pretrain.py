"""MAE pretraining of the ImageNet feature encoder (reference_trainers/imagenet/pretrain_encoder.py) on
generated latents and images: the loss goes down, resume is exact, outputs and errors."""

from __future__ import annotations

import os
import socket

import pytest
import torch
from driftloss.adapters.torch_features import FeatureTaps

from reference_trainers.common.checkpoints import load_checkpoint
from reference_trainers.imagenet.data import open_dataset
from reference_trainers.imagenet.encoder import load_encoder
from reference_trainers.imagenet.mae import MAE, random_mask
from reference_trainers.imagenet.presets import get_preset
from reference_trainers.imagenet.pretrain_encoder import StepChunks, build_parser, main

from .test_data import write_image_folder, write_latents

FAST = ["--threads", "1", "--no-progress"]



@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    return write_latents(str(tmp_path_factory.mktemp("lat")), shard_counts=(16, 14, 10), num_classes=4)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(str(tmp_path_factory.mktemp("img")), per_class=10)


def eval_recon(mae: MAE, preset, folder: str) -> float:
    """Masked L2 of ``mae`` on a fixed batch (16 items, fixed augmentation and mask)."""
    data = open_dataset(folder, preset)
    gen = torch.Generator().manual_seed(123)
    x = torch.stack([data.item(i % len(data), gen)[0] for i in range(16)])
    mask = random_mask(16, 32, preset.mae_mask_ratio, torch.Generator().manual_seed(9))
    with torch.no_grad():
        return mae.loss(x, mask)[1]["recon"]


@pytest.mark.parametrize("name, steps, batch", [("latent-tiny", 16, 8), ("pixel-tiny", 12, 8)])
def test_pretraining_lowers_the_masked_loss(tmp_path, latents, images, name, steps, batch):
    preset = get_preset(name)
    folder = latents if preset.space == "latent" else images
    before = eval_recon(MAE(preset, seed=0), preset, folder)   # the trainer's initialization (seed 0)
    result = main(["--preset", name, "--data", folder, "--out", str(tmp_path), "--steps", str(steps),
                   "--batch", str(batch), "--set", "cls_finetune_steps=0", *FAST])
    after = eval_recon(result["mae"], preset, folder)
    print(f"{name}: masked L2 on a fixed batch {before:.4f} -> {after:.4f} after {steps} steps of {batch}")
    assert after < 0.95 * before


def _all_tensors(state, prefix=""):
    """Flatten nested dicts / lists of a checkpoint into {path: tensor or value}."""
    if isinstance(state, dict):
        out = {}
        for k, v in state.items():
            out.update(_all_tensors(v, f"{prefix}{k}."))
        return out
    if isinstance(state, (list, tuple)):
        out = {}
        for i, v in enumerate(state):
            out.update(_all_tensors(v, f"{prefix}{i}."))
        return out
    return {prefix: state}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def test_resume_is_bit_exact(tmp_path, latents):
    """2 steps + resume + 2 steps == 4 straight steps, bit for bit (model, EMA, optimizer, encoder.pt),
    with micro-batches and the classification phase (lambda > 0) in the resumed part."""
    common = ["--preset", "latent-tiny", "--data", latents, "--steps", "4", "--batch", "8",
              "--micro-batch", "4", "--set", "cls_finetune_steps=2", "cls_ramp_steps=2", "--log-every", "1",
              *FAST]
    straight = main([*common, "--out", str(tmp_path / "straight")])
    main([*common, "--out", str(tmp_path / "split"), "--stop-at", "2"])
    half = load_checkpoint(str(tmp_path / "split" / "checkpoint.pt"))
    assert half["step"] == 2 and half["config"]["stop_at"] == 2
    resumed = main(["--resume", str(tmp_path / "split" / "checkpoint.pt"), *FAST])
    assert resumed["step"] == 4
    a = load_checkpoint(str(tmp_path / "straight" / "checkpoint.pt"))
    b = load_checkpoint(str(tmp_path / "split" / "checkpoint.pt"))
    for key in ("model", "ema", "opt", "step"):
        ta, tb = _all_tensors(a[key]), _all_tensors(b[key])
        assert ta.keys() == tb.keys()
        assert all(_same(ta[k], tb[k]) for k in ta), key
    ea = torch.load(tmp_path / "straight" / "encoder.pt", weights_only=False)["encoder"]
    eb = torch.load(tmp_path / "split" / "encoder.pt", weights_only=False)["encoder"]
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    # lambda by step: 0, 0, then ramped to cls_weight 0.1 over 2 steps
    assert [e["lambda"] for e in straight["log"]] == pytest.approx([0.0, 0.0, 0.05, 0.1])
    assert [e["lambda"] for e in resumed["log"]] == pytest.approx([0.05, 0.1])
    assert "ce" in straight["log"][-1] and "ce" not in straight["log"][0]
    assert set(a["rng"]) >= {"torch", "numpy", "python", "data"}


def test_results_do_not_depend_on_workers_or_micro_batches(tmp_path, latents):
    """Loader workers change nothing (bit for bit); micro-batches give the same batch, loss and gradient
    (Adam's first moment after one step, 0.1 * gradient) up to float summation order."""
    common = ["--preset", "latent-tiny", "--data", latents, "--batch", "8", "--log-every", "1", *FAST]
    base = main([*common, "--steps", "2", "--out", str(tmp_path / "a")])["mae"].state_dict()
    workers = main([*common, "--steps", "2", "--out", str(tmp_path / "b"), "--workers", "2"])
    workers = workers["mae"].state_dict()
    assert all(torch.equal(base[k], workers[k]) for k in base)
    whole = main([*common, "--steps", "1", "--out", str(tmp_path / "c")])
    micro = main([*common, "--steps", "1", "--out", str(tmp_path / "d"), "--micro-batch", "2"])
    for key in ("loss", "recon", "ce", "acc", "grad_norm"):
        assert micro["log"][0][key] == pytest.approx(whole["log"][0][key], rel=1e-5)
    ga = load_checkpoint(str(tmp_path / "c" / "checkpoint.pt"))["opt"]["state"]
    gb = load_checkpoint(str(tmp_path / "d" / "checkpoint.pt"))["opt"]["state"]
    assert all(torch.allclose(ga[k]["exp_avg"], gb[k]["exp_avg"], rtol=1e-4, atol=1e-8) for k in ga)


def test_step_batches_cover_each_epoch_once(latents):
    data = open_dataset(latents, get_preset("latent-tiny"))
    chunks = StepChunks(data, seed=0, batch=8, chunk=4, first=1, last=5)   # 40 items: epoch 1 = steps 1-5
    seen = [i for step in range(1, 6) for c in range(2) for i in chunks.indices(step, c)]
    assert sorted(seen) == list(range(40))
    assert len(chunks) == 10 and chunks[3][:2] == (2, 1) and chunks[3][2].shape == (4, 4, 32, 32)
    assert chunks.indices(6, 0) != seen[:4]                                  # epoch 2: a new permutation


def test_outputs(tmp_path, images):
    out = tmp_path / "run"
    result = main(["--preset", "pixel-tiny", "--data", images, "--out", str(out), "--steps", "3", "--batch",
                   "4", "--checkpoint-every", "2", "--log-every", "1", *FAST])
    ckpt = load_checkpoint(str(out / "checkpoint.pt"))
    assert ckpt["step"] == 3 and ckpt["preset"] == "pixel-tiny" and ckpt["config"]["steps"] == 3
    assert {"decoder.head.weight", "head.weight", "encoder.stem.0.weight"} <= set(ckpt["model"])
    assert set(ckpt["ema"]) == set(result["mae"].encoder.state_dict())
    lines = (out / "log.txt").read_text().splitlines()
    assert len(lines) == 3 and "img_per_s" in lines[0] and "recon" in lines[0]
    encoder = load_encoder(str(out / "encoder.pt"))
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in result["ema"].state_dict().items())
    maps = FeatureTaps(encoder)(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert {m.shape[-1] for m in maps.values()} == {32, 16, 8, 4}


def test_cli_help_and_errors(tmp_path, latents, images):
    text = " ".join(build_parser().format_help().split())
    for flag in ("--preset", "--data", "--micro-batch", "--resume", "--stop-at", "--workers"):
        assert flag in text
    assert "gradient accumulation" in text and "mae_steps" in text
    with pytest.raises(ValueError, match="give --preset"):
        main(["--data", latents, *FAST])
    with pytest.raises(ValueError, match="unknown preset"):
        main(["--preset", "latent-xxl", "--data", latents, *FAST])
    with pytest.raises(ValueError, match="preset override"):
        main(["--preset", "latent-tiny", "--data", latents, "--set", "mae_lr", *FAST])
    with pytest.raises(ValueError, match="give --data"):
        main(["--preset", "latent-tiny", *FAST])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["--preset", "latent-tiny", "--data", str(tmp_path / "none"), *FAST])
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        main(["--preset", "latent-tiny", "--data", images, "--out", str(tmp_path / "x"), *FAST])
    with pytest.raises(ValueError, match="holds cached latents"):
        main(["--preset", "pixel-tiny", "--data", latents, "--out", str(tmp_path / "x"), *FAST])
    with pytest.raises(ValueError, match="must divide"):
        main(["--preset", "latent-tiny", "--data", latents, "--batch", "8", "--micro-batch", "3", *FAST])
    main(["--preset", "latent-tiny", "--data", latents, "--out", str(tmp_path / "r"), "--steps", "1",
          "--batch", "2", *FAST])
    with pytest.raises(ValueError, match="trained with preset 'latent-tiny'"):
        main(["--resume", str(tmp_path / "r" / "checkpoint.pt"), "--preset", "pixel-tiny", "--data", images,
              *FAST])
    with pytest.raises(ValueError, match="already at step 1"):
        main(["--resume", str(tmp_path / "r" / "checkpoint.pt"), *FAST])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        main(["--resume", str(tmp_path / "missing.pt"), *FAST])
    assert os.path.isfile(tmp_path / "r" / "encoder.pt")


def _rank_worker(rank, world, port, argv):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    main(argv)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path, latents):
    """torchrun-style (2 gloo processes, each half the batch): the same loss and gradient as one process."""
    import torch.multiprocessing as mp

    common = ["--preset", "latent-tiny", "--data", latents, "--steps", "1", "--batch", "8", "--device", "cpu",
              "--set", "cls_finetune_steps=1", "--log-every", "1", *FAST]
    # fork, not spawn: a spawned child re-imports torch (~7 s each on busy cores); each child, like a
    # DataLoader worker, first sets one intra-op thread
    mp.start_processes(_rank_worker, args=(2, _free_port(), [*common, "--out", str(tmp_path / "two")]),
                       nprocs=2, join=True, start_method="fork")
    one = main([*common, "--out", str(tmp_path / "one")])
    two = load_checkpoint(str(tmp_path / "two" / "checkpoint.pt"))
    ref = load_checkpoint(str(tmp_path / "one" / "checkpoint.pt"))
    assert all(torch.allclose(two["opt"]["state"][k]["exp_avg"], v["exp_avg"], rtol=1e-4, atol=1e-8)
               for k, v in ref["opt"]["state"].items())
    line = (tmp_path / "two" / "log.txt").read_text().split()
    logged = dict(zip(line[::2], map(float, line[1::2])))
    for key in ("loss", "recon", "ce", "acc", "grad_norm"):
        assert logged[key] == pytest.approx(one["log"][0][key], rel=1e-5)
