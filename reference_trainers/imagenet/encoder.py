"""The feature encoder of the ImageNet recipes (A.3): a ResNet-34 layout with GroupNorm, MAE-pretrained.

    encoder = build_encoder(get_preset("latent-tiny"))           # random weights (seeded)
    encoder = build_encoder(get_preset("latent-b2"), "meta")     # shapes and parameter counts only
    encoder = load_encoder("runs/encoder/encoder.pt")            # the EMA encoder pretrain_encoder.py wrote
    taps = FeatureTaps(encoder.eval().requires_grad_(False))     # default taps, no names needed

Layout (C = preset.encoder_width, p = preset.encoder_patch; shapes for a 32x32 grid, see
docs/imagenet_recipe.md):

    input   [n, 4, 32, 32] latents (p = 1) | [n, 3, 256, 256] pixels (p = 8: patchify -> [n, 192, 32, 32])
    stem    3x3 conv stride 1 + GN + ReLU                               -> [n, C, 32, 32]
    layer1  3 blocks, width C                                           -> [n, C, 32, 32]
    layer2  4 blocks, width 2C, stride 2 in its first block             -> [n, 2C, 16, 16]
    layer3  6 blocks, width 4C, stride 2 in its first block             -> [n, 4C, 8, 8]
    layer4  3 blocks, width 8C, stride 2 in its first block             -> [n, 8C, 4, 4]

Each ``layer<i>`` is an ``nn.Sequential`` of its blocks followed by the stage's GroupNorm, so the default
taps of ``FeatureTaps`` (every second element of a stage and its last one) are every second block plus the
GroupNorm'd stage output: layer1.1, layer1.3, layer2.1, layer2.3, layer2.4, layer3.1, layer3.3, layer3.5,
layer3.6, layer4.1, layer4.3. Blocks are "basic" (two 3x3 convs, A.3 and Table 3) or "bottleneck" (Table 8;
1x1 -> 3x3 -> 1x1 with a quarter of the stage width inside, the stage widths staying C..8C). A 1x1 conv +
GN shortcut is used where a block changes the shape. GroupNorm has min(32, channels) groups (the largest
divisor of the channels not above 32). Convolutions have no bias (each is followed by a GroupNorm).
"""

from __future__ import annotations

import os

import torch
from driftloss.adapters.torch_features import default_tap_names
from torch import nn

from reference_trainers.common.checkpoints import save_checkpoint
from reference_trainers.imagenet.presets import PRESETS, Preset, get_preset, preset_with_overrides

ENCODER_FORMAT = "driftloss-encoder-v1"
MAX_GROUPS = 32


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the largest number of groups <= 32 that divides ``channels``."""
    groups = max(g for g in range(1, min(MAX_GROUPS, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class Shortcut(nn.Sequential):
    """1x1 conv (with the block's stride) + GN: the residual path where a block changes the shape."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(conv1x1(cin, cout, stride), group_norm(cout))


class BasicBlock(nn.Module):
    """relu(x + GN(conv3x3(relu(GN(conv3x3(x, stride)))))): [n, cin, H, W] -> [n, cout, H/s, W/s]."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1, self.norm1 = conv3x3(cin, cout, stride), group_norm(cout)
        self.conv2, self.norm2 = conv3x3(cout, cout), group_norm(cout)
        self.act = nn.ReLU(inplace=True)
        self.shortcut = Shortcut(cin, cout, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.shortcut(x))

    @property
    def last_norm(self) -> nn.GroupNorm:
        return self.norm2


class BottleneckBlock(nn.Module):
    """1x1 (cout/4) -> 3x3 (cout/4, stride) -> 1x1 (cout), GN after each, ReLU; residual as in BasicBlock."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        mid = max(cout // 4, 1)
        self.conv1, self.norm1 = conv1x1(cin, mid), group_norm(mid)
        self.conv2, self.norm2 = conv3x3(mid, mid, stride), group_norm(mid)
        self.conv3, self.norm3 = conv1x1(mid, cout), group_norm(cout)
        self.act = nn.ReLU(inplace=True)
        self.shortcut = Shortcut(cin, cout, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.act(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return self.act(out + self.shortcut(x))

    @property
    def last_norm(self) -> nn.GroupNorm:
        return self.norm3


BLOCKS = {"basic": BasicBlock, "bottleneck": BottleneckBlock}


def stage(block: type[nn.Module], cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` blocks (the first with ``stride``, changing the width) followed by the stage's GroupNorm."""
    layers = [block(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(blocks)]
    return nn.Sequential(*layers, group_norm(cout))


class ResNetEncoder(nn.Module):
    """The A.3 encoder of ``preset`` (see the module docstring for the layout and shapes).

    ``forward(x)`` returns the last map [n, 8C, 4, 4]; ``features(x)`` returns the stem output and the four
    stage outputs [stem, f1, f2, f3, f4] (the MAE decoder's skips).
    """

    def __init__(self, preset: Preset):
        super().__init__()
        if preset.encoder_block not in BLOCKS:
            raise ValueError(f"encoder_block must be one of {tuple(BLOCKS)}; got {preset.encoder_block!r}")
        if len(preset.encoder_blocks) != 4:
            raise ValueError(f"encoder_blocks must give 4 stages; got {preset.encoder_blocks}")
        grid, rem = divmod(preset.size, preset.encoder_patch)
        if rem or grid % 16:  # three stride-2 stages, then 2x2 mask patches still whole at the last scale
            raise ValueError(f"preset {preset.name!r}: size {preset.size} / encoder_patch "
                             f"{preset.encoder_patch} must be a multiple of 16")
        self.preset_name = preset.name
        self.patch = preset.encoder_patch
        self.in_channels = preset.channels * preset.encoder_patch**2  # 4 latents, 192 = 3 * 8 * 8 pixels
        self.grid = grid                                                 # 32: the stem's resolution
        width = preset.encoder_width
        self.widths = tuple(width * 2**i for i in range(4))             # C, 2C, 4C, 8C
        block = BLOCKS[preset.encoder_block]
        # [n, channels, size, size] -> [n, channels * p * p, size / p, size / p] (identity for p = 1)
        self.patchify = nn.PixelUnshuffle(self.patch) if self.patch > 1 else nn.Identity()
        self.stem = nn.Sequential(conv3x3(self.in_channels, width), group_norm(width), nn.ReLU(inplace=True))
        cin = width
        for i, (cout, n) in enumerate(zip(self.widths, preset.encoder_blocks), start=1):
            self.add_module(f"layer{i}", stage(block, cin, cout, n, 1 if i == 1 else 2))
            cin = cout
        self.out_channels = self.widths[-1]

    @property
    def layers(self) -> list[nn.Sequential]:
        """[layer1, layer2, layer3, layer4]."""
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The stem's and the stages' outputs for x [n, channels, size, size] (g = size / encoder_patch = 32):
        [stem [n, C, g, g], f1 [n, C, g, g], f2 [n, 2C, g/2, g/2], f3 [n, 4C, g/4, g/4], f4 [n, 8C, g/8, g/8]]
        """
        h = self.stem(self.patchify(x))
        maps = [h]
        for layer in self.layers:
            h = layer(h)
            maps.append(h)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[-1]


@torch.no_grad()
def initialize_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded init of every conv / norm / linear in ``model`` (an encoder, decoder or whole MAE).

    Convs: Kaiming normal (fan_out, ReLU). GroupNorm: weight 1, bias 0, except the last norm of each
    residual branch, zero-initialized so every block starts as the identity (plus ReLU). Linears: normal
    std 0.01, bias 0. Meta tensors are left alone. Returns ``model``.
    """
    generators: dict[torch.device, torch.Generator] = {}

    def gen(t: torch.Tensor) -> torch.Generator:
        if t.device not in generators:
            generators[t.device] = torch.Generator(device=t.device).manual_seed(seed)
        return generators[t.device]

    zero_norms = {id(m.last_norm) for m in model.modules() if isinstance(m, (BasicBlock, BottleneckBlock))}
    for m in model.modules():
        params = [p for p in m.parameters(recurse=False)]
        if any(p.is_meta for p in params):
            continue
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=gen(m.weight))
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.GroupNorm):
            m.weight.fill_(0.0 if id(m) in zero_norms else 1.0)
            m.bias.zero_()
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01, generator=gen(m.weight))
            if m.bias is not None:
                m.bias.zero_()
    return model


def build_encoder(preset: Preset | str, device: torch.device | str | None = None, seed: int = 0
                  ) -> ResNetEncoder:
    """The encoder of ``preset`` (or preset name) built on ``device`` (default CPU) with seeded weights;
    on the "meta" device no memory is allocated (shapes and parameter counts only)."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    with torch.device(device if device is not None else "cpu"):
        encoder = ResNetEncoder(preset)
    return initialize_weights(encoder, seed)


def tap_names(encoder: nn.Module, *, stem: bool = False, every: int = 2) -> list[str]:
    """FeatureTaps's default tap names of ``encoder`` (every second block + each GN'd stage output),
    with the stem's output first if ``stem``."""
    return (["stem"] if stem else []) + default_tap_names(encoder, every=every)


def parameter_count(module: nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())


def save_encoder(path: str, encoder: ResNetEncoder, **extra) -> None:
    """Write {"format", "preset", "encoder" (state dict), **extra} to ``path`` (atomically)."""
    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    save_checkpoint(path, {"format": ENCODER_FORMAT, "preset": encoder.preset_name, "encoder": state,
                           **extra})


def load_encoder(path: str, preset: Preset | str | None = None, device: torch.device | str | None = None
                 ) -> ResNetEncoder:
    """The frozen (eval, no grad) encoder saved by pretrain_encoder.py at ``path``.

    ``preset`` defaults to the one named in the file with the file's preset overrides (--set) applied; a
    given preset must have the same encoder architecture as the saved one (a clear error otherwise).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no encoder file at {path!r} (pretrain_encoder.py writes <out>/encoder.pt)")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(saved, dict) or saved.get("format") != ENCODER_FORMAT:
        raise ValueError(f"{path!r} is not an encoder file written by pretrain_encoder.py "
                         f"(format {ENCODER_FORMAT!r})")
    saved_name = saved["preset"]
    if preset is None:
        if saved_name not in PRESETS:
            raise ValueError(f"{path!r} was trained for preset {saved_name!r}, which is unknown; "
                             "pass preset=")
        preset = preset_with_overrides(get_preset(saved_name), saved.get("set", ()))
    preset = get_preset(preset) if isinstance(preset, str) else preset
    encoder = build_encoder(preset, "meta")
    shapes = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in saved["encoder"].items()}
    if shapes != got:
        raise ValueError(f"{path!r} holds the encoder of preset {saved_name!r}, whose architecture differs "
                         f"from that of preset {preset.name!r} (see encoder_width, encoder_blocks, "
                         "encoder_block, encoder_patch, channels)")
    encoder = encoder.to_empty(device=device if device is not None else "cpu")
    encoder.load_state_dict(saved["encoder"])
    return encoder.eval().requires_grad_(False)
