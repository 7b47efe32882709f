"""The JAX toy trainer: initialization, a short run, exact resume, agreement with the torch trainer."""

import numpy as np
import pytest

from reference_trainers.toy import toy2d_jax
from reference_trainers.toy.config import ToyConfig

SMALL = dict(hidden=64, n_gen=64, n_pos=64, eval_samples=400, progress=False, plots=False, log_every=10)


def test_initialization_places_the_outputs():
    cfg = ToyConfig(target="bimodal", init="far", **SMALL)
    out = toy2d_jax.generate(toy2d_jax.make_generator(cfg),
                             np.random.default_rng(5).standard_normal((4000, 32)).astype(np.float32))
    np.testing.assert_allclose(out.mean(0), [6.0, 6.0], atol=0.02)
    assert out.std(0).mean() == pytest.approx(0.1, rel=0.1)


def test_short_run_learns_the_bimodal_target(tmp_path):
    cfg = ToyConfig(target="bimodal", init="between", steps=200, snapshots=3, ema_decay=0.9,
                    **{**SMALL, "n_gen": 128, "n_pos": 128, "eval_samples": 500, "plots": True},
                    out=str(tmp_path))
    summary = toy2d_jax.run_all(cfg, lambda c: toy2d_jax.train(c)[0], framework="jax")
    m = summary["bimodal/between"]
    assert m["modes_covered"] == 2
    assert m["energy_distance"] < 0.25           # from ~1.8 at the start (a blob between the modes)
    assert (tmp_path / "samples.png").stat().st_size > 0 and (tmp_path / "drift.png").stat().st_size > 0


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    base = dict(target="8gaussians", init="collapsed", steps=20, snapshots=3, **SMALL)
    full, model_a, ema_a = toy2d_jax.train(ToyConfig(**base, out=str(tmp_path / "a")))
    toy2d_jax.train(ToyConfig(**base, stop_at=12, out=str(tmp_path / "b")))
    ckpt = str(tmp_path / "b" / "checkpoint.pkl")
    resumed, model_c, ema_c = toy2d_jax.train(ToyConfig(**base, resume=ckpt, out=str(tmp_path / "c")))
    for a, c in zip(toy2d_jax._leaves(model_a), toy2d_jax._leaves(model_c), strict=True):
        np.testing.assert_array_equal(a, c)
    for a, c in zip(toy2d_jax._leaves(ema_a), toy2d_jax._leaves(ema_c), strict=True):
        np.testing.assert_array_equal(a, c)
    assert resumed.loss == full.loss
    assert resumed.metrics["energy_distance"] == full.metrics["energy_distance"]
