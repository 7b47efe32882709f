"""driftloss.adapters.torch_features: feature taps on tiny random-weight CNNs (no timm, no downloads)."""

import numpy as np
import pytest
from backends import B

if B.name != "torch":
    pytest.skip("torch adapter tests run in the torch env", allow_module_level=True)

import torch  # noqa: E402
from driftloss.adapters.torch_features import (  # noqa: E402
    FeatureTaps,
    default_tap_names,
    encoder_groups,
    feature_group_dicts,
)
from torch import nn  # noqa: E402

import driftloss  # noqa: E402


class Block(nn.Module):
    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride, 1)
        self.skip = nn.Conv2d(c_in, c_out, 1, stride) if (c_in != c_out or stride != 1) else nn.Identity()

    def forward(self, x):
        return self.skip(x) + torch.tanh(self.conv(x))


class TinyResNet(nn.Module):
    """ResNet-like: stem, layer1 (3 blocks), layer2 (2 blocks, stride 2), head."""

    def __init__(self, c_in=3):
        super().__init__()
        self.stem = nn.Conv2d(c_in, 4, 3, 1, 1)
        self.layer1 = nn.Sequential(Block(4, 4), Block(4, 4), Block(4, 4))
        self.layer2 = nn.Sequential(Block(4, 6, 2), Block(6, 6))
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.layer2(self.layer1(self.stem(x))).mean(dim=(2, 3)))


class Stage(nn.Module):
    def __init__(self, c_in, c_out, depth):
        super().__init__()
        self.downsample = nn.Conv2d(c_in, c_out, 2, 2)
        self.blocks = nn.Sequential(*[Block(c_out, c_out) for _ in range(depth)])

    def forward(self, x):
        return self.blocks(self.downsample(x))


class TinyConvNeXt(nn.Module):
    """ConvNeXt-like: `stages` of (downsample, blocks); optionally a timm-style feature_info."""

    def __init__(self, with_feature_info=False):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.stages = nn.Sequential(Stage(4, 4, 4), Stage(4, 8, 1))
        if with_feature_info:
            self.feature_info = [dict(num_chs=4, reduction=1, module="stem"),
                                 dict(num_chs=4, reduction=2, module="stages.0"),
                                 dict(num_chs=8, reduction=4, module="stages.1")]

    def forward(self, x):
        return self.stages(self.stem(x)).mean()


def seeded(module, seed=0):
    torch.manual_seed(seed)
    for p in module.parameters():
        nn.init.normal_(p, std=0.3)
    return module


def test_default_taps_of_a_resnet_like_encoder():
    assert default_tap_names(TinyResNet()) == ["layer1.1", "layer1.2", "layer2.1"]
    every_block = ["layer1.0", "layer1.1", "layer1.2", "layer2.0", "layer2.1"]
    assert default_tap_names(TinyResNet(), every=1) == every_block


def test_default_taps_of_a_convnext_like_encoder_with_and_without_feature_info():
    expected = ["stages.0.blocks.1", "stages.0.blocks.3", "stages.1.blocks.0"]
    assert default_tap_names(TinyConvNeXt()) == expected
    assert default_tap_names(TinyConvNeXt(with_feature_info=True)) == expected  # the stem is not tapped


def test_maps_equal_the_submodule_outputs():
    enc = seeded(TinyResNet()).eval()
    x = torch.randn(2, 3, 8, 8)
    with FeatureTaps(enc) as taps:
        maps = taps(x)
    assert list(maps) == ["layer1.1", "layer1.2", "layer2.1"]
    h = enc.stem(x)
    h1 = enc.layer1[1](enc.layer1[0](h))
    h2 = enc.layer1[2](h1)
    h3 = enc.layer2(h2)
    for got, want in zip(maps.values(), (h1, h2, h3), strict=True):
        torch.testing.assert_close(got, want)
    assert maps["layer2.1"].shape == (2, 6, 4, 4)
    enc(x)  # the hooks are gone: nothing is captured, nothing fails
    assert taps._handles == []


def test_explicit_module_names_on_a_plain_module():
    enc = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2, padding=1))
    taps = FeatureTaps(enc, ["0", "2"])
    maps = taps(torch.randn(2, 3, 8, 8))
    assert {k: tuple(v.shape) for k, v in maps.items()} == {"0": (2, 4, 8, 8), "2": (2, 5, 4, 4)}


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: FeatureTaps(nn.Sequential(nn.Conv2d(3, 4, 1))),
         r"found no stages of blocks in Sequential.*module_names"),
        (lambda: FeatureTaps(TinyResNet(), ["layer1.7"]), r"no module named \['layer1.7'\] in TinyResNet"),
        (lambda: FeatureTaps(TinyResNet(), []), "module_names is empty"),
        (lambda: FeatureTaps(TinyResNet(), ["stem", "stem"]), "duplicates"),
        (lambda: FeatureTaps(TinyResNet(), every=0), "every must be a positive int"),
    ],
)
def test_bad_taps(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_module_that_does_not_run_is_reported():
    enc = TinyResNet()
    enc.spare = nn.Conv2d(4, 4, 1)
    with pytest.raises(RuntimeError, match=r"modules \['spare'\] did not run"):
        FeatureTaps(enc, ["layer1.0", "spare"])(torch.randn(1, 3, 8, 8))


def test_encoder_groups_names_shapes_and_values():
    enc = seeded(TinyResNet()).eval()
    images = torch.randn(2, 3, 3, 8, 8)  # [G, n, C, H, W]
    taps = FeatureTaps(enc)
    groups = encoder_groups(taps, images)
    shapes = {k: tuple(v.shape) for k, v in groups.items()}
    assert shapes["layer1.1.loc"] == (2, 3, 64, 4)
    assert shapes["layer1.1.mean_4"] == (2, 3, 4, 4)
    assert shapes["layer2.1.mean_2"] == (2, 3, 4, 6)
    assert shapes["layer2.1.mean_4"] == (2, 3, 1, 6)
    assert shapes["input"] == (2, 3, 1, 3)
    assert shapes["global"] == (2, 3, 1, 192)
    # Each class's groups are those of its own images.
    maps = taps(images[1])
    ref = driftloss.feature_groups(maps["layer2.1"], prefix="layer2.1.")
    for k, v in ref.items():
        torch.testing.assert_close(groups[k][1], v)
    torch.testing.assert_close(groups["input"][1], driftloss.input_group(images[1]))


def test_patch_sizes_larger_than_a_map_are_skipped():
    enc = seeded(TinyResNet()).eval()
    groups = encoder_groups(FeatureTaps(enc), torch.randn(2, 3, 6, 6), with_input=False, with_global=False)
    assert "layer1.1.mean_4" in groups  # 6x6 map
    assert "layer2.1.mean_2" in groups and "layer2.1.mean_4" not in groups  # 3x3 map
    assert "input" not in groups and "global" not in groups


class TinyGenerator(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(5, 3 * 8 * 8)

    def forward(self, z):  # z [G, N, 5] -> images [G, N, 3, 8, 8]
        return self.net(z).reshape(*z.shape[:-1], 3, 8, 8)


def test_gradients_flow_through_a_frozen_encoder_into_the_generator():
    enc = seeded(TinyResNet()).eval().requires_grad_(False)
    gen = seeded(TinyGenerator(), seed=1)
    taps = FeatureTaps(enc)
    G, N, P, M = 2, 4, 5, 3
    fake = gen(torch.randn(G, N, 5))
    real, uncond = torch.randn(G, P, 3, 8, 8), torch.randn(G, M, 3, 8, 8)
    gen_g, pos_g, neg_g = feature_group_dicts(taps, fake, real, uncond)
    assert list(gen_g) == list(pos_g) == list(neg_g)
    assert all(v.requires_grad for v in gen_g.values())
    assert not any(v.requires_grad for v in (*pos_g.values(), *neg_g.values()))
    w = driftloss.cfg_weight(torch.tensor([1.0, 2.0]), N, M)[:, None].expand(G, M)
    loss, stats = driftloss.drifting_loss_groups(gen_g, pos_g, neg_g, neg_weight=w, return_stats=True)
    loss.backward()
    grads = [p.grad for p in gen.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().max() > 0 for g in grads)
    assert all(p.grad is None for p in enc.parameters())
    assert set(stats) == set(gen_g)
    expected = sum(float(s["loss"]) for s in stats.values())
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_positives_do_not_build_a_graph_even_with_a_trainable_encoder():
    enc = seeded(TinyResNet())  # parameters require grad
    taps = FeatureTaps(enc)
    fake = torch.randn(1, 3, 3, 8, 8, requires_grad=True)
    gen_g, pos_g, _ = feature_group_dicts(taps, fake, torch.randn(1, 4, 3, 8, 8))
    assert all(v.grad_fn is None for v in pos_g.values())
    assert all(v.grad_fn is not None for v in gen_g.values())
