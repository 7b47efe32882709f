"""The ImageNet 256x256 reference trainers: Table 8 presets, generator, feature encoder, training."""
