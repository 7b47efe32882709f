"""Parameter counts of the ImageNet networks, built on the meta device (nothing is allocated).

    python -m reference_trainers.imagenet.params                       # every preset, system presets first
    python -m reference_trainers.imagenet.params --preset latent-b2    # one preset

One line per preset: ``<preset> <generator params>``, then ``<preset> encoder <params>`` when
reference_trainers/imagenet/encoder.py exists and exposes ``build_encoder(preset, device=None)``.
Paper (A.2): latent-b2 133M, latent-l2 463M, pixel-b16 134M, pixel-l16 464M generator parameters.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util

import torch

from reference_trainers.imagenet.generator import build_generator, count_parameters
from reference_trainers.imagenet.presets import PRESETS, SYSTEM_PRESETS, get_preset

META = torch.device("meta")


def generator_params(name: str) -> int:
    """The generator's parameter count for preset ``name`` (built on the meta device)."""
    return count_parameters(build_generator(get_preset(name), device=META))


def encoder_params(name: str) -> int | None:
    """The feature encoder's parameter count for preset ``name``, or None while encoder.py (with
    ``build_encoder(preset, device=None)``) is absent."""
    if importlib.util.find_spec("reference_trainers.imagenet.encoder") is None:
        return None
    module = importlib.import_module("reference_trainers.imagenet.encoder")
    build_encoder = getattr(module, "build_encoder", None)
    if build_encoder is None:
        return None
    return count_parameters(build_encoder(get_preset(name), device=META))


def preset_order() -> list[str]:
    """The system presets first, then the others in PRESETS order."""
    return [*SYSTEM_PRESETS, *(name for name in PRESETS if name not in SYSTEM_PRESETS)]


def report_lines(name: str) -> list[str]:
    """``<name> <generator params>`` and, when an encoder builder exists, ``<name> encoder <params>``."""
    lines = [f"{name} {generator_params(name)}"]
    encoder = encoder_params(name)
    if encoder is not None:
        lines.append(f"{name} encoder {encoder}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Print the parameter counts of the ImageNet generator (and encoder, when present) for "
                    "each preset of Table 8, built on the meta device.")
    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help="print this preset only (default: every preset, system presets first)")
    args = parser.parse_args(argv)
    for name in [args.preset] if args.preset else preset_order():
        for line in report_lines(name):
            print(line)


if __name__ == "__main__":
    main()
