"""Reference trainers for driftloss, runnable from a checkout: ``python -m reference_trainers.<name>``.

toy2d / toy2d_jax: 2-D toy targets (paper Fig. 3/4, Table 1 ablation) with PyTorch / JAX.
toy2d_ablations:   the Table 1 / Table 11 / multi-tau / allocation ablations on 8 Gaussians.
digits:            class-conditional scikit-learn digits with guidance, drifting in a pre-trained
                   encoder's feature space (digits_compare: against a GAN and an MMD baseline).
Measured results: reference_trainers/RESULTS.md.
"""
