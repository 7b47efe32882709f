"""The networks of a training run, built and placed: frozen feature encoders, the data-parallel generator."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from reference_trainers.common.distributed import Distributed
from reference_trainers.imagenet.encoder import build_encoder, load_encoder
from reference_trainers.imagenet.presets import Preset


def load_feature_encoders(preset: Preset, encoder_path: str, convnext_path: str, device: torch.device,
                          dtype: torch.dtype = torch.float32) -> dict[str, nn.Module]:
    """{"resnet": the MAE-pretrained ResNet (+ "convnext": ConvNeXt-V2 for pixel presets)}, frozen, on
    ``device`` in ``dtype`` (bf16 when the networks run under bf16 autocast: half the memory, no per-pass
    casts). Empty paths give random weights, with a warning: fine for smoke tests, useless for results."""
    if encoder_path:
        resnet = load_encoder(encoder_path, preset, device)
    else:
        warnings.warn("no --encoder given: drifting in the features of a RANDOM encoder (smoke tests only; "
                      "pretrain one: python -m reference_trainers.imagenet.pretrain_encoder)", stacklevel=2)
        resnet = build_encoder(preset, device)
    encoders = {"resnet": resnet}
    if preset.convnext:
        from reference_trainers.imagenet.convnext import build_convnext

        if not convnext_path:
            warnings.warn(f"no --convnext weights given: {preset.convnext} has RANDOM weights", stacklevel=2)
        encoders["convnext"] = build_convnext(preset, convnext_path or None).to(device)
    return {k: v.to(dtype).eval().requires_grad_(False) for k, v in encoders.items()}


def wrap_generator(model: nn.Module, emas: list[nn.Module], dist_info: Distributed, fsdp: bool = False
                   ) -> nn.Module:
    """The module the step calls: ``model`` itself on one process; over several, DDP (gradients averaged)
    or, with ``fsdp``, FSDP2 (``fully_shard`` on every block and the whole model; the EMA copies are
    sharded the same way, so their updates stay local). Create the optimizer after this call."""
    if dist_info.world_size == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for module in (model, *emas):
            for block in module.blocks:
                fully_shard(block)
            fully_shard(module)
        return model
    ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def full_state_dicts(model: nn.Module, emas: list[nn.Module], opt: torch.optim.Optimizer, sharded: bool
                     ) -> dict:
    """{model, emas, opt} as whole (unsharded) CPU state dicts; a collective call on every rank when
    ``sharded`` (FSDP), so checkpoints load into any number of processes, sharded or not."""
    if not sharded:
        return {"model": model.state_dict(), "emas": [e.state_dict() for e in emas], "opt": opt.state_dict()}
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {"model": get_model_state_dict(model, options=full),
            "emas": [get_model_state_dict(e, options=full) for e in emas],
            "opt": get_optimizer_state_dict(model, opt, options=full)}


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict, sharded: bool) -> None:
    """Load a whole optimizer state dict (full_state_dicts' "opt") into ``opt``, sharding it under FSDP."""
    if not sharded:
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
