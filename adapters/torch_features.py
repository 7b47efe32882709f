"""Feature taps on a torch encoder and the feature groups of feature-space drifting (§3.4, A.5).

    taps = FeatureTaps(encoder.eval().requires_grad_(False))   # every 2nd block + each stage end
    gen_g, pos_g, neg_g = feature_group_dicts(taps, generated, real)
    loss = driftloss.drifting_loss_groups(gen_g, pos_g, neg_g)

Default taps come from the encoder's structure, found by duck typing (timm is not imported):
timm's ``feature_info`` (a list of dicts with a "module" name, as on timm ResNet and ConvNeXt),
else a ``stages`` sequence (ConvNeXt-like), else children ``layer1``, ``layer2``, ... (ResNet-like).
Any other ``nn.Module`` works with explicit ``module_names``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import array_api_compat.torch as xp_torch
import torch
from torch import nn

from driftloss._feature_groups import feature_groups, global_group, input_group

_BLOCK_CONTAINERS = (nn.Sequential, nn.ModuleList)


class FeatureTaps:
    """Forward hooks that return an encoder's intermediate feature maps of one forward pass.

        taps = FeatureTaps(encoder)                      # default taps (see default_tap_names)
        taps = FeatureTaps(encoder, ["body.2", "body.5"])  # any nn.Module, named submodules
        maps = taps(images)                              # {module name: [n, C, H, W]}

    The encoder is run whole (its head included) and is not modified except for the hooks;
    ``remove()`` (or leaving a ``with FeatureTaps(...) as taps:`` block) takes them off. If a
    tapped module runs more than once in a forward pass, its last output is kept; a tuple or
    list output contributes its first element. For feature-space drifting freeze the encoder
    (``encoder.eval().requires_grad_(False)``): gradients still flow through it into its input.
    """

    def __init__(self, encoder: nn.Module, module_names: Sequence[str] | None = None, *, every: int = 2):
        self.encoder = encoder
        names = default_tap_names(encoder, every=every) if module_names is None else list(module_names)
        if not names:
            raise ValueError("FeatureTaps: module_names is empty; name at least one module to tap")
        if len(set(names)) != len(names):
            raise ValueError(f"FeatureTaps: module_names has duplicates: {names}")
        modules = dict(encoder.named_modules())
        unknown = [n for n in names if n not in modules]
        if unknown:
            raise ValueError(
                f"FeatureTaps: no module named {unknown} in {type(encoder).__name__}; names are those of "
                f"encoder.named_modules(), e.g. {[n for n in modules if n][:8]}"
            )
        self.names: tuple[str, ...] = tuple(names)
        self._captured: dict[str, torch.Tensor] | None = None
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if self._captured is not None:
                self._captured[name] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the encoder on images [n, ...]; return {tapped module name: its output}."""
        self._captured = {}
        try:
            self.encoder(images)
            captured = self._captured
        finally:
            self._captured = None
        missing = [n for n in self.names if n not in captured]
        if missing:
            raise RuntimeError(f"FeatureTaps: modules {missing} did not run in the encoder's forward pass")
        return {n: captured[n] for n in self.names}

    def remove(self) -> None:
        """Take the hooks off the encoder."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def default_tap_names(encoder: nn.Module, *, every: int = 2) -> list[str]:
    """Every ``every``-th block of each stage plus each stage's last block (A.5), in order.

    E.g. a ResNet-50 (3, 4, 6, 3 blocks; every=2): layer1.1, layer1.2, layer2.1, layer2.3,
    layer3.1, layer3.3, layer3.5, layer4.1, layer4.2. The blocks of a stage are its ``blocks``
    sequence (ConvNeXt-like) or the stage itself when it is an nn.Sequential/nn.ModuleList; a
    stage with neither is tapped as a whole. ``feature_info`` entries with no blocks (a stem,
    such as timm ResNet's "act1") are not tapped.
    """
    if not (isinstance(every, int) and every >= 1):
        raise ValueError(f"default_tap_names: every must be a positive int; got {every!r}")
    modules = dict(encoder.named_modules())
    names = []
    for stage, from_feature_info in _stage_names(encoder, modules):
        prefix, blocks = _blocks_of(stage, modules[stage])
        if not blocks:
            if not from_feature_info:
                names.append(stage)
            continue
        last = len(blocks) - 1
        names += [f"{prefix}.{b}" for i, b in enumerate(blocks) if (i + 1) % every == 0 or i == last]
    if not names:
        raise ValueError(
            f"default_tap_names: found no stages of blocks in {type(encoder).__name__} (no timm "
            "feature_info, no `stages`, no `layer1`, `layer2`, ...); pass module_names=[...] to FeatureTaps"
        )
    return names


def _stage_names(encoder: nn.Module, modules: dict[str, nn.Module]) -> list[tuple[str, bool]]:
    """(stage module name, whether it came from feature_info), in forward order."""
    info = getattr(encoder, "feature_info", None)
    if info is not None:
        dicts = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
        stages = [d["module"] for d in dicts if isinstance(d, dict) and d.get("module") in modules]
        if stages:
            return [(s, True) for s in stages]
    stages_attr = getattr(encoder, "stages", None)
    if isinstance(stages_attr, _BLOCK_CONTAINERS):
        return [(f"stages.{n}", False) for n, _ in stages_attr.named_children()]
    numbered = ((re.fullmatch(r"layer(\d+)", n), n) for n, _ in encoder.named_children())
    layers = sorted((int(m.group(1)), n) for m, n in numbered if m)
    return [(n, False) for _, n in layers]


def _blocks_of(stage: str, module: nn.Module) -> tuple[str, list[str]]:
    """(prefix, child names) of the blocks of a stage; no names when it has no block sequence."""
    inner = getattr(module, "blocks", None)
    if isinstance(inner, _BLOCK_CONTAINERS):
        return f"{stage}.blocks", [n for n, _ in inner.named_children()]
    if isinstance(module, _BLOCK_CONTAINERS):
        return stage, [n for n, _ in module.named_children()]
    return stage, []


def encoder_groups(taps: FeatureTaps, images: torch.Tensor, *, patch_sizes: Sequence[int] = (2, 4),
                   layout: str = "NCHW", with_input: bool = True, with_global: bool = True
                   ) -> dict[str, torch.Tensor]:
    """The feature groups (docs/design.md §4) of images [..., n, C, H, W]: name -> [..., n, L, C'].

    For each tapped map "<module>": "<module>.loc", ".mean", ".std", ".mean_<p>", ".std_<p>"
    (``driftloss.feature_groups``; patch sizes larger than a map are skipped for that map);
    plus "input" (``driftloss.input_group`` of the images, [..., n, 1, C]) and "global" (the
    images flattened, [..., n, 1, C*H*W]). ``layout`` is that of the tapped maps ("NHWC" for
    encoders with channels-last outputs). Leading dims (e.g. classes G) are flattened for one
    encoder pass and restored.
    """
    if images.ndim < 4:
        raise ValueError(
            f"encoder_groups: images must have shape [..., n, C, H, W]; got {tuple(images.shape)}"
        )
    lead = tuple(images.shape[:-3])
    flat = images.reshape(-1, *images.shape[-3:])
    groups: dict[str, torch.Tensor] = {}
    for name, fmap in taps(flat).items():
        if fmap.ndim != 4:
            raise ValueError(
                f"encoder_groups: tapped module {name!r} gave shape {tuple(fmap.shape)}, not a feature map "
                "[n, C, H, W]; tap other modules"
            )
        h, w = (fmap.shape[1], fmap.shape[2]) if layout == "NHWC" else (fmap.shape[2], fmap.shape[3])
        sizes = tuple(p for p in patch_sizes if p <= min(h, w))
        groups.update(feature_groups(fmap, layout=layout, patch_sizes=sizes, prefix=f"{name}.", xp=xp_torch))
    if with_input:
        groups["input"] = input_group(flat, xp=xp_torch)
    if with_global:
        groups["global"] = global_group(flat, xp=xp_torch)
    return {k: v.reshape(*lead, *v.shape[1:]) for k, v in groups.items()}


Groups = dict[str, torch.Tensor]


def feature_group_dicts(taps: FeatureTaps, generated: torch.Tensor, positives: torch.Tensor,
                        negatives: torch.Tensor | None = None, **options: Any
                        ) -> tuple[Groups, Groups, Groups | None]:
    """The group dicts of ``driftloss.drifting_loss_groups`` for generated, real (and negative) images.

    generated [G, N, C, H, W], positives [G, P, C, H, W], negatives [G, M, C, H, W] or None
    -> (gen, pos, neg) dicts name -> [G, n, L, C']. The generated images' groups carry the
    gradient through the encoder into the generator; positives and negatives are encoded under
    ``torch.no_grad()``. ``options`` are those of ``encoder_groups``.
    """
    gen = encoder_groups(taps, generated, **options)
    with torch.no_grad():
        pos = encoder_groups(taps, positives, **options)
        neg = None if negatives is None else encoder_groups(taps, negatives, **options)
    return gen, pos, neg
