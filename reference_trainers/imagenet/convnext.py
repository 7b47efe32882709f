"""The ConvNeXt-V2 feature network of the pixel presets (timm; weights from a local file, never downloaded).

    convnext = build_convnext(preset, weights="/models/convnextv2_base/model.safetensors")   # frozen
    taps = FeatureTaps(convnext)          # every second block + each stage end of model.stages.<i>

The wrapper takes the generator's images x [n, 3, H, W] in [-1, 1], maps them to (x + 1) / 2, resizes
them to 224x224 (bilinear, antialiased) and normalizes them with the ImageNet mean / std before timm's
``convnextv2_*`` model (``num_classes=0``: pooled features out, no classifier). See docs/imagenet_recipe.md.
Weight files: safetensors or a torch state dict (optionally under "model" / "state_dict"), in timm's
key layout or the original ConvNeXt-V2 one (converted by timm's checkpoint filter); a classifier
("head.fc.*") in the file is dropped.
"""

from __future__ import annotations

import os

import timm
import torch
import torch.nn.functional as F
from torch import nn

from reference_trainers.imagenet.presets import Preset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SIZE = 224


class ConvNeXtFeatures(nn.Module):
    """timm ConvNeXt(-V2) ``name`` behind the [-1, 1] -> ImageNet-normalized 224x224 preprocessing."""

    def __init__(self, name: str, weights: str | None = None, input_size: int = INPUT_SIZE):
        super().__init__()
        self.model = timm.create_model(name, pretrained=False, num_classes=0)
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if weights:
            load_convnext_weights(self.model, weights)

    @property
    def feature_info(self) -> list[dict]:
        """timm's feature_info with module names relative to this wrapper (for FeatureTaps's defaults)."""
        return [{**d, "module": f"model.{d['module']}"} for d in self.model.feature_info]

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] in [-1, 1] -> [n, 3, 224, 224], ImageNet-normalized."""
        x = (x + 1.0) / 2.0
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            size = (self.input_size, self.input_size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features [n, num_features] (the taps see the stages' maps)."""
        return self.model(self.preprocess(x))


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"ConvNeXt-V2 weights file {path!r} not found; nothing is downloaded at run time: copy a timm "
            "checkpoint (e.g. model.safetensors of timm/convnextv2_base.fcmae_ft_in22k_in1k) there first")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or foreign file
        raise ValueError(f"cannot read ConvNeXt-V2 weights from {path!r} ({type(e).__name__}: {e})") from e
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path!r} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_convnext_weights(model: nn.Module, path: str) -> None:
    """Load a local weights file into timm ConvNeXt ``model`` (strict, except a dropped classifier)."""
    state = _read_state_dict(path)
    own = model.state_dict()
    if not set(own) & set(state):  # not timm's layout: try the original ConvNeXt(-V2) one
        from timm.models.convnext import checkpoint_filter_fn

        state = checkpoint_filter_fn(state, model)
    state = {k: v for k, v in state.items() if k in own or not k.startswith("head.fc.")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path!r} does not match timm's {type(model).__name__} "
            f"({getattr(model, 'default_cfg', {}).get('architecture', '?')}): missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]} (is it the right model size?)")
    model.load_state_dict(state)


def build_convnext(preset: Preset, weights: str | None = None, device: torch.device | str | None = None
                   ) -> ConvNeXtFeatures:
    """The frozen (eval, no grad) ConvNeXt-V2 of a pixel preset (``preset.convnext``), random weights unless
    a local ``weights`` file is given."""
    if not preset.convnext:
        raise ValueError(f"preset {preset.name!r} uses no ConvNeXt features (its convnext field is empty)")
    net = ConvNeXtFeatures(preset.convnext, weights)
    return net.to(device if device is not None else "cpu").eval().requires_grad_(False)
