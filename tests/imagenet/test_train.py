"""The ImageNet training run on tiny presets: guided drifting steps from latents and from pixels, the
2-process run equal to the single process, exact resume, a non-finite loss stopped with its message,
TensorBoard events, checkpoints and sample grids."""

import json
import os
import socket

import numpy as np
import pytest
import torch

from reference_trainers.imagenet import train
from reference_trainers.imagenet.encoder import build_encoder
from reference_trainers.imagenet.generator import Generator
from reference_trainers.imagenet.objective import FeatureObjective
from reference_trainers.imagenet.presets import get_preset
from reference_trainers.imagenet.synthetic_data import write_images, write_latents
from reference_trainers.imagenet.train import StepInputs, draw_inputs, drifting_step

FAST = ["--no-progress", "--grid-every", "0", "--log-every", "1", "--checkpoint-every", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    return write_latents(str(tmp_path_factory.mktemp("latents")))


def _run(tmp, data, *extra, preset="latent-tiny"):
    return train.main(["--preset", preset, "--data", data, "--out", str(tmp), *FAST, *extra])


def test_guided_steps_from_latents_write_events_checkpoint_and_grid(tmp_path, latents):
    out = tmp_path / "run"
    summary = train.main(["--preset", "latent-tiny", "--data", latents, "--out", str(out), "--no-progress",
                          "--set", "steps=3", "--grid-every", "3", "--log-every", "1", "--threads", "1"])
    assert summary["step"] == 3 and np.isfinite(summary["loss"])
    assert set(summary["time"]) >= {"generator", "encoder", "loss", "backward", "optimizer"}
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 3 and len(ckpt["emas"]) == len(get_preset("latent-tiny").ema_decays)
    assert os.path.getsize(out / "grids" / "step-0000003.png") > 0
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tensorboard"))
    lines = [json.loads(x) for x in open(out / "log.txt")]
    assert [x["step"] for x in lines] == [1, 2, 3]


def test_bf16_autocast_step(tmp_path, latents):
    """--precision bf16 (the GPU default): networks and frozen encoders in bf16, the loss in float32."""
    summary = _run(tmp_path / "run", latents, "--set", "steps=1", "--precision", "bf16")
    assert summary["step"] == 1 and np.isfinite(summary["loss"])


def test_guided_steps_from_pixels(tmp_path):
    images = write_images(str(tmp_path / "images"))
    summary = _run(tmp_path / "run", images, "--set", "steps=2", preset="pixel-tiny")
    assert summary["step"] == 2 and np.isfinite(summary["loss"])


def test_training_lowers_the_drifting_distance(tmp_path, latents):
    """A few dozen steps on 3 well-separated latent classes: the energy distance of the global group
    (generated vs real, in units of the mean distance) falls."""
    out = tmp_path / "run"
    _run(out, latents, "--set", "steps=30", "lr=3e-3", "warmup_steps=1")
    lines = [json.loads(x) for x in open(out / "log.txt")]
    first, last = lines[0]["energy_distance_global"], lines[-1]["energy_distance_global"]
    assert last < 0.5 * first, (first, last)


def _params(state):
    return {k: v.clone() for k, v in state.items()}


def test_resume_is_exact(tmp_path, latents):
    common = ["--set", "steps=4"]
    _run(tmp_path / "straight", latents, *common)
    _run(tmp_path / "split", latents, *common, "--stop-at", "2")
    assert torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)["step"] == 2
    train.main(["--resume", str(tmp_path / "split" / "checkpoint.pt"), *FAST])
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for key in ("model",):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), name
    for ea, eb in zip(a["emas"], b["emas"]):
        for name, t in ea.items():
            assert torch.equal(t, eb[name]), name


def test_resume_with_another_architecture_is_a_clear_error(tmp_path, latents):
    _run(tmp_path / "run", latents, "--set", "steps=1")
    with pytest.raises(ValueError, match="another architecture.*hidden"):
        train.main(["--resume", str(tmp_path / "run" / "checkpoint.pt"), "--set", "steps=2", "hidden=32",
                    *FAST])


def test_non_finite_loss_stops_with_step_and_group(tmp_path, latents, monkeypatch):
    original = drifting_step

    def poisoned(model, objective, inputs, pos, uncond, autocast, timer=None):
        pos = pos.clone()
        pos[0, 0].fill_(float("nan"))
        return original(model, objective, inputs, pos, uncond, autocast, timer)

    monkeypatch.setattr(train, "drifting_step", poisoned)
    with pytest.raises(train.NonFiniteLoss, match=r"step 1:.*(global|input|resnet)"):
        _run(tmp_path / "run", latents, "--set", "steps=2")


# --- two processes (gloo) == one process ---------------------------------------------------------------

G, P, M = 4, 6, 3


def _fixed_batch(preset):
    gen = torch.Generator().manual_seed(7)
    classes = torch.tensor([0, 3, 1, 2])
    inputs = draw_inputs(preset, classes, gen)
    pos = torch.randn(G, P, preset.channels, preset.size, preset.size, generator=gen)
    uncond = torch.randn(G, M, preset.channels, preset.size, preset.size, generator=gen)
    return inputs, pos, uncond


def _slice(inputs: StepInputs, lo: int, hi: int, n: int) -> StepInputs:
    return StepInputs(inputs.labels[lo * n:hi * n], inputs.alpha[lo:hi], inputs.noise[lo * n:hi * n],
                      inputs.style[lo * n:hi * n])


def _loss_and_grads(model, preset, inputs, pos, uncond):
    torch.manual_seed(0)
    objective = FeatureObjective({"resnet": build_encoder(preset, seed=1)}, preset.taus)
    loss, _ = drifting_step(model, objective, inputs, pos, uncond, autocast=False)
    loss.backward()
    inner = getattr(model, "module", model)
    return loss.detach(), {k: p.grad.clone() for k, p in inner.named_parameters() if p.grad is not None}


def _tiny():
    # one optimizer step away from the zero-initialized output, so every parameter gets a gradient
    return get_preset("latent-tiny", n_neg=4, num_classes=4)


def _model(preset):
    torch.manual_seed(0)
    model = Generator(preset)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def _worker(rank, world, port, out_dir, mode):
    import torch.distributed as dist

    from reference_trainers.common.distributed import Distributed
    from reference_trainers.imagenet.networks import wrap_generator

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        preset = _tiny()
        inputs, pos, uncond = _fixed_batch(preset)
        lo, hi = rank * G // world, (rank + 1) * G // world
        net = wrap_generator(_model(preset), [], Distributed(rank, world, rank, torch.device("cpu")),
                             fsdp=mode == "fsdp")
        loss, grads = _loss_and_grads(net, preset, _slice(inputs, lo, hi, preset.n_neg), pos[lo:hi],
                                      uncond[lo:hi])
        grads = {k: g.full_tensor() if hasattr(g, "full_tensor") else g for k, g in grads.items()}
        torch.save({"loss": loss, "grads": grads}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_the_single_process(tmp_path, mode):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), mode), nprocs=2, join=True)
    preset = _tiny()
    inputs, pos, uncond = _fixed_batch(preset)
    loss, grads = _loss_and_grads(_model(preset), preset, inputs, pos, uncond)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # each rank's loss is the mean over its classes with global statistics: their mean is the whole loss
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / 2, loss, rtol=1e-4, atol=0.0)
    assert grads.keys() == ranks[0]["grads"].keys()
    for name, g in grads.items():
        for r in ranks:  # DDP and FSDP average the gradients: the single-process gradient
            # float32 sums in another order: within 1e-4 of the tensor's largest entry (measured: <= 1e-5)
            error = (r["grads"][name] - g).abs().max()
            assert error <= 1e-4 * g.abs().max(), (name, float(error), float(g.abs().max()))


def _train_worker(rank, world, port, argv):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train.main(argv)


def test_sharded_run_checkpoints_whole_weights_that_resume_in_one_process(tmp_path, latents):
    """torchrun's path on 2 CPU processes with FSDP: the checkpoint holds whole (unsharded) state dicts, so a
    single process resumes it."""
    import torch.multiprocessing as mp

    out = tmp_path / "run"
    argv = ["--preset", "latent-tiny", "--data", latents, "--out", str(out), *FAST, "--fsdp",
            "--set", "steps=3", "--stop-at", "2"]
    mp.spawn(_train_worker, args=(2, _free_port(), argv), nprocs=2, join=True)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 2 and len(ckpt["source"]) == 2
    whole = Generator(get_preset("latent-tiny")).state_dict()
    assert {k: v.shape for k, v in ckpt["model"].items()} == {k: v.shape for k, v in whole.items()}
    with pytest.warns(UserWarning, match="sample queues restart"):  # each rank's queue state is its own
        summary = train.main(["--resume", str(out / "checkpoint.pt"), *FAST])
    assert summary["step"] == 3


def test_chunks_accumulate_the_mean_gradient_of_the_class_chunks():
    """chunks=2 over 4 classes: the gradient is the mean of the two halves' gradients, each half a drifting
    loss with its own statistics (lr 0 and no clipping, so the step leaves the gradient readable)."""
    from reference_trainers.imagenet.train import train_step

    preset = get_preset("latent-tiny", n_neg=4, num_classes=4, lr=0.0, grad_clip=1e9)
    inputs, pos, uncond = _fixed_batch(preset)
    halves = []
    for lo, hi in ((0, 2), (2, 4)):
        _, grads = _loss_and_grads(_model(preset), preset, _slice(inputs, lo, hi, preset.n_neg), pos[lo:hi],
                                   uncond[lo:hi])
        halves.append(grads)
    model = _model(preset)
    torch.manual_seed(0)
    objective = FeatureObjective({"resnet": build_encoder(preset, seed=1)}, preset.taus)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    gen = torch.Generator().manual_seed(7)  # _fixed_batch's draws: the same inputs
    result = train_step(model, model, [], opt, objective, preset, 1, torch.tensor([0, 3, 1, 2]), pos, uncond,
                        gen, autocast=False, chunks=2)
    assert np.isfinite(float(result.loss))
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        want = (halves[0][name] + halves[1][name]) / 2
        assert (p.grad - want).abs().max() <= 1e-5 * want.abs().max() + 1e-12, name
