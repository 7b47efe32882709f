"""Reference trainers for driftloss, run from a checkout: ``python -m reference_trainers.<family>.<entry>``.

common/    what every family shares: dataclass config -> CLI, EMA, checkpoints, LR schedules, sample metrics
toy/       2-D toy targets (paper Fig. 3/4) with PyTorch (toy2d) and JAX (toy2d_jax); ablations on the toy
digits/    class-conditional scikit-learn digits with guidance, drifting in a pre-trained encoder's
           feature space (train; compare: against a GAN and an MMD baseline)
imagenet/  the ImageNet 256x256 latent and pixel recipes (Table 8 presets, generator, feature encoder)
Measured results: reference_trainers/RESULTS.md.
"""
