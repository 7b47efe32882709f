"""The ImageNet feature encoder, its MAE (masking, loss, decoder, class head) and the ConvNeXt-V2 wrapper."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from driftloss.adapters.torch_features import FeatureTaps

from reference_trainers.imagenet.convnext import IMAGENET_MEAN, IMAGENET_STD, build_convnext
from reference_trainers.imagenet.encoder import (
    BasicBlock,
    build_encoder,
    load_encoder,
    parameter_count,
    save_encoder,
    tap_names,
)
from reference_trainers.imagenet.mae import MAE, cls_weight_at, expand_mask, masked_l2, random_mask
from reference_trainers.imagenet.presets import SYSTEM_PRESETS, get_preset

# the default taps of the paper's [3, 4, 6, 3] stages: every second block and the (GroupNorm'd) stage output
DEFAULT_TAPS = ["layer1.1", "layer1.3", "layer2.1", "layer2.3", "layer2.4", "layer3.1", "layer3.3",
                "layer3.5", "layer3.6", "layer4.1", "layer4.3"]


def expected_taps(blocks) -> list[str]:
    """Stage i is an nn.Sequential of its blocks and a GroupNorm: every second child and the last one."""
    return [f"layer{i}.{j}" for i, n in enumerate(blocks, start=1) for j in range(n + 1)
            if (j + 1) % 2 == 0 or j == n]



def expected_tap_shapes(width: int, blocks=(3, 4, 6, 3)) -> dict[str, tuple[int, int, int]]:
    """[C, H, W] of each default tap for base width C on a 32x32 grid."""
    stage = {1: (width, 32), 2: (2 * width, 16), 3: (4 * width, 8), 4: (8 * width, 4)}
    shapes = {}
    for name in expected_taps(blocks):
        channels, side = stage[int(name[5])]
        shapes[name] = (channels, side, side)
    return shapes


def closed_form_count(width: int, in_channels: int, blocks=(3, 4, 6, 3)) -> int:
    """Parameters of the basic-block ResNet with GroupNorm, written out independently of the module code:
    stem 3x3 conv (no bias) + GN; per block two 3x3 convs + two GNs (+ 1x1 conv + GN where the shape
    changes); one GN after each stage. A GN over c channels has 2c parameters."""
    total = 9 * in_channels * width + 2 * width
    cin = width
    for i, n in enumerate(blocks):
        c = width * 2**i
        for b in range(n):
            ci = cin if b == 0 else c
            total += 9 * ci * c + 9 * c * c + 4 * c
            if ci != c or (b == 0 and i > 0):
                total += ci * c + 2 * c
        total += 2 * c
        cin = c
    return total


# ----------------------------------------------------------------------------------------------------------
# encoder


@pytest.mark.parametrize("name", ["latent-tiny", "pixel-tiny"])
def test_tiny_encoder_taps(name):
    preset = get_preset(name)
    encoder = build_encoder(preset).eval()
    with FeatureTaps(encoder) as taps:
        assert list(taps.names) == expected_taps(preset.encoder_blocks) == tap_names(encoder)
        x = torch.randn(3, preset.channels, preset.size, preset.size)
        maps = taps(x)
    shapes = expected_tap_shapes(preset.encoder_width, preset.encoder_blocks)
    assert {n: tuple(m.shape[1:]) for n, m in maps.items()} == shapes
    assert {m.shape[-1] for m in maps.values()} == {32, 16, 8, 4}
    assert all(torch.isfinite(m).all() and m.std() > 0 for m in maps.values())
    # the stem sees 32x32: latents as they are, 64x64x3 pixels patchified 2x2 into 12 channels
    assert encoder.patchify(x).shape == (3, 4 if name == "latent-tiny" else 12, 32, 32)
    assert tap_names(encoder, stem=True)[0] == "stem"


@pytest.mark.parametrize("name", ["ablation", *SYSTEM_PRESETS])
def test_full_preset_tap_shapes_on_meta(name):
    preset = get_preset(name)
    encoder = build_encoder(preset, "meta")
    assert encoder.in_channels == (4 if preset.space == "latent" else 192)
    x = torch.empty(2, preset.channels, preset.size, preset.size, device="meta")
    assert encoder.patchify(x).shape == (2, encoder.in_channels, 32, 32)
    maps = FeatureTaps(encoder)(x)
    assert preset.encoder_blocks == (3, 4, 6, 3) and list(maps) == DEFAULT_TAPS
    assert {n: tuple(m.shape[1:]) for n, m in maps.items()} == expected_tap_shapes(preset.encoder_width)


@pytest.mark.parametrize("name, paper", [("ablation", 0.34e9), ("latent-b2", 2.1e9), ("pixel-b16", 2.1e9)])
def test_parameter_counts(name, paper):
    preset = get_preset(name)
    encoder = build_encoder(preset, "meta")
    count = parameter_count(encoder)
    in_channels = preset.channels * preset.encoder_patch**2
    print(f"{name}: C={preset.encoder_width}, stem input {in_channels} ch: {count:,} encoder parameters")
    assert count == closed_form_count(preset.encoder_width, in_channels)
    assert abs(count - paper) / paper < 0.02   # the paper's recount: ~0.34B at C=256, ~2.1B at C=640


def test_group_norm_groups():
    encoder = build_encoder(get_preset("ablation"), "meta")
    groups = {m.num_groups for m in encoder.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert groups == {32}
    tiny = build_encoder(get_preset("latent-tiny"))
    norms = [m for m in tiny.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert all(m.num_groups == min(32, m.num_channels) for m in norms)


def test_bottleneck_variant():
    preset = dataclasses.replace(get_preset("latent-tiny"), encoder_block="bottleneck", encoder_width=16)
    maps = FeatureTaps(build_encoder(preset))(torch.randn(2, 4, 32, 32))
    assert {n: tuple(m.shape[1:]) for n, m in maps.items()} == expected_tap_shapes(16, preset.encoder_blocks)
    with pytest.raises(ValueError, match="encoder_block"):
        build_encoder(dataclasses.replace(preset, encoder_block="dense"))


def test_initialization_is_seeded():
    preset = get_preset("latent-tiny")
    a, b, c = build_encoder(preset, seed=1), build_encoder(preset, seed=1), build_encoder(preset, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["stem.0.weight"], sc["stem.0.weight"])
    assert all(torch.all(m.norm2.weight == 0) for m in a.modules() if isinstance(m, BasicBlock))


def test_save_and_load_encoder(tmp_path):
    preset = get_preset("latent-tiny")
    encoder = build_encoder(preset, seed=3)
    path = str(tmp_path / "encoder.pt")
    save_encoder(path, encoder, step=7)
    loaded = load_encoder(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.randn(2, 4, 32, 32)
    assert torch.equal(loaded.eval()(x), encoder.eval()(x))
    with pytest.raises(ValueError, match="architecture differs"):
        load_encoder(path, "pixel-tiny")
    with pytest.raises(FileNotFoundError):
        load_encoder(str(tmp_path / "none.pt"))


# ----------------------------------------------------------------------------------------------------------
# MAE: masking, loss, lambda


def test_random_mask_rate_and_patches():
    gen = torch.Generator().manual_seed(0)
    mask = random_mask(64, 32, 0.5, gen)
    assert mask.shape == (64, 1, 32, 32) and set(mask.unique().tolist()) == {0.0, 1.0}
    cells = mask[:, :, ::2, ::2]
    assert torch.equal(expand_mask(cells, 2), mask)          # constant on each 2x2 patch
    assert abs(cells.mean().item() - 0.5) < 0.02               # 16384 patches, each masked with p = 0.5
    assert random_mask(4, 32, 0.0, gen).sum() == 0 and random_mask(4, 32, 1.0, gen).mean() == 1
    assert abs(random_mask(256, 32, 0.25, gen).mean().item() - 0.25) < 0.01


def test_masked_l2_by_hand():
    """2 channels on a 4x4 grid: the top-left 2x2 patch masked. Only its 4 cells x 2 channels count."""
    target = torch.zeros(1, 2, 4, 4)
    pred = torch.zeros(1, 2, 4, 4)
    pred[0, 0, 0, 0], pred[0, 1, 1, 1] = 2.0, 1.0               # errors inside the masked patch: 4 + 1
    pred[0, 0, 3, 3] = 100.0                                   # outside: ignored
    mask = expand_mask(torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]]), 2)
    total, count = masked_l2(pred, target, mask)
    assert total.item() == 5.0 and count.item() == 8.0         # masked mean 5 / 8


def test_mae_zeroes_masked_input_and_scores_masked_cells():
    preset = get_preset("pixel-tiny")                           # 64x64x3, 2x2 patchify -> 32x32 grid
    mae = MAE(preset, seed=0)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    mask = random_mask(2, 32, 0.5, torch.Generator().manual_seed(1))
    seen = {}
    handle = mae.encoder.patchify.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0]))
    recon, logits = mae(x, mask)
    handle.remove()
    pixel_mask = expand_mask(mask, 2)                            # each grid cell = 2x2 pixels
    assert torch.all(seen["x"][pixel_mask.expand_as(x) == 1] == 0)
    assert torch.equal(seen["x"][pixel_mask.expand_as(x) == 0], x[pixel_mask.expand_as(x) == 0])
    assert recon.shape == x.shape and logits.shape == (2, preset.num_classes)
    loss, logs = mae.loss(x, mask)
    by_hand = ((recon - x) ** 2 * pixel_mask).sum() / (pixel_mask.sum() * 3)
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6) and "ce" not in logs
    labels = torch.tensor([1, 2])
    loss, logs = mae.loss(x, mask, labels, cls_weight=0.25)
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert loss.item() == pytest.approx(0.75 * by_hand.item() + 0.25 * ce.item(), rel=1e-6)


def test_mae_gradient_only_from_masked_cells():
    """The reconstruction loss has no gradient w.r.t. the prediction at visible cells."""
    preset = get_preset("latent-tiny")
    mae = MAE(preset)
    x = torch.randn(2, 4, 32, 32)
    mask = random_mask(2, 32, 0.5, torch.Generator().manual_seed(0))
    recon, _ = mae(x, mask, with_logits=False)
    recon.retain_grad()
    total, count = masked_l2(recon, x, mask)
    (total / count).backward()
    assert torch.all(recon.grad[mask.expand_as(recon) == 0] == 0)
    assert torch.all(recon.grad[mask.expand_as(recon) == 1] != 0)


def test_mae_decoder_shapes_on_meta():
    for name in ("latent-b2", "pixel-b16"):
        preset = get_preset(name)
        with torch.device("meta"):
            mae = MAE(preset)
        x = torch.empty(2, preset.channels, preset.size, preset.size, device="meta")
        recon, logits = mae(x, torch.zeros(2, 1, 32, 32, device="meta"))
        assert recon.shape == x.shape and logits.shape == (2, 1000)


def test_cls_weight_ramp_by_hand():
    # latent-tiny: 20 steps, the last 4 classify, lambda ramps to 0.1 over 2 steps
    values = [cls_weight_at(s, 20, 4, 0.1, 2) for s in range(1, 21)]
    assert values[:16] == [0.0] * 16
    assert values[16:] == pytest.approx([0.05, 0.1, 0.1, 0.1])
    # the paper: 200k steps, the last 3k with classification, ramp over the first 1k of them
    assert cls_weight_at(197_000, 200_000, 3000, 0.1, 1000) == 0.0
    assert cls_weight_at(197_001, 200_000, 3000, 0.1, 1000) == pytest.approx(1e-4)
    assert cls_weight_at(197_500, 200_000, 3000, 0.1, 1000) == pytest.approx(0.05)
    assert cls_weight_at(198_000, 200_000, 3000, 0.1, 1000) == pytest.approx(0.1)
    assert cls_weight_at(200_000, 200_000, 3000, 0.1, 1000) == pytest.approx(0.1)
    assert all(cls_weight_at(s, 30_000, 0, 0.1, 1000) == 0.0 for s in (1, 29_999, 30_000))  # ablation


# ----------------------------------------------------------------------------------------------------------
# ConvNeXt-V2


@pytest.fixture(scope="module")
def convnext():
    return build_convnext(get_preset("pixel-tiny"))


def test_convnext_random_weights_and_taps(convnext):
    assert not convnext.training and not any(p.requires_grad for p in convnext.parameters())
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with FeatureTaps(convnext) as taps:
        assert all(n.startswith("model.stages.") for n in taps.names)
        maps = taps(x)
    sizes = sorted({m.shape[-1] for m in maps.values()}, reverse=True)
    assert sizes == [56, 28, 14, 7] and all(m.ndim == 4 for m in maps.values())
    # gradients reach the generator's images through the frozen network
    x.requires_grad_(True)
    convnext(x).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_convnext_preprocessing(convnext):
    x = torch.full((1, 3, 64, 64), -1.0)
    pre = convnext.preprocess(x)
    assert pre.shape == (1, 3, 224, 224)
    expected = -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(pre[0, :, 100, 100], expected, atol=1e-6)
    assert convnext.preprocess(torch.zeros(1, 3, 224, 224)).shape == (1, 3, 224, 224)


def test_convnext_weights_round_trip(tmp_path, convnext):
    from safetensors.torch import save_file

    preset = get_preset("pixel-tiny")
    torch.manual_seed(0)
    source = build_convnext(preset)
    for p in source.parameters():
        p.data.normal_(0, 0.02)
    state = source.model.state_dict()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    want = source(x)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    with_head = {**state, "head.fc.weight": torch.zeros(10, 320), "head.fc.bias": torch.zeros(10)}
    torch.save({"model": with_head}, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        loaded = build_convnext(preset, weights=str(tmp_path / name))
        assert torch.equal(loaded(x), want)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        build_convnext(preset, weights=str(tmp_path / "missing.safetensors"))
    torch.save({k: v for k, v in state.items() if not k.startswith("stages.3")}, tmp_path / "part.pt")
    with pytest.raises(ValueError, match="missing"):
        build_convnext(preset, weights=str(tmp_path / "part.pt"))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read"):
        build_convnext(preset, weights=str(tmp_path / "junk.pt"))
    with pytest.raises(ValueError, match="no ConvNeXt"):
        build_convnext(get_preset("latent-tiny"))
