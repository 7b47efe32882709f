"""The digits trainers: data, alpha sampler, Fréchet distance, pre-training, drifting/MMD/GAN runs, resume."""

import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch

from reference_trainers.common.guidance import sample_alpha
from reference_trainers.digits import compare as digits_compare
from reference_trainers.digits import train as digits
from reference_trainers.digits.baselines import mmd2
from reference_trainers.digits.config import DigitsConfig, parse_config
from reference_trainers.digits.data import load_digit_splits, shifted, step_batch
from reference_trainers.digits.evaluate import frechet_distance, gaussian_frechet_distance
from reference_trainers.digits.features import guidance_weight
from reference_trainers.digits.pretrain import (
    accuracy,
    load_or_pretrain_encoder,
    load_or_train_eval_classifier,
)

# a few seconds per run: 4 classes x 8 generated per step, tiny pre-training and evaluation
SMALL = ["--classes-per-step", "4", "--n-gen", "8", "--n-pos", "8", "--n-uncond", "4", "--hidden", "64",
         "--encoder-steps", "60", "--classifier-steps", "60", "--eval-per-class", "20", "--grid-columns", "4",
         "--eval-alphas", "1", "2", "--ema-decay", "0.9", "--log-every", "5", "--threads", "1",
         "--no-progress"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Cache paths shared by the module's runs (the encoder and classifier are trained once)."""
    d = tmp_path_factory.mktemp("digits_cache")
    return ["--encoder-path", str(d / "encoder.pt"), "--classifier-path", str(d / "classifier.pt")]


@pytest.fixture(scope="module")
def data():
    return load_digit_splits(0)


def test_cli_overrides_the_dataclass_defaults():
    cfg = parse_config(["--method", "gan", "--taus", "0.1", "0.3", "--no-plots", "--steps", "7"])
    assert cfg.method == "gan" and cfg.taus == (0.1, 0.3) and cfg.plots is False and cfg.steps == 7
    assert parse_config([]) == DigitsConfig()
    with pytest.raises(ValueError, match="method"):
        DigitsConfig(method="vae")


def test_splits_are_disjoint_stratified_and_scaled(data):
    sizes = [len(s.labels) for s in (data.train, data.classifier, data.held_out)]
    assert sum(sizes) == 1797 and sizes[0] == 898
    rows = {tuple(x.ravel()) for s in (data.train, data.held_out) for x in s.images}
    assert len(rows) > 1300  # (a few digits are duplicated in the data set itself)
    assert data.train.images.min() == -1.0 and data.train.images.max() == 1.0
    for split in (data.train, data.classifier, data.held_out):
        counts = np.bincount(split.labels, minlength=10)
        assert counts.min() >= 0.9 * len(split.labels) / 10 * 0.95


def test_step_batch_is_a_pure_function_of_seed_and_step(data):
    a, b = (step_batch(data.train, 3, 17, 4, 8, 6, 5, 32) for _ in range(2))
    c = step_batch(data.train, 3, 18, 4, 8, 6, 5, 32)
    assert torch.equal(a.pos, b.pos) and torch.equal(a.noise, b.noise) and not torch.equal(a.noise, c.noise)
    assert a.pos.shape == (4, 6, 1, 8, 8) and a.uncond.shape == (4, 5, 1, 8, 8)
    assert a.noise.shape == (4, 8, 32)
    for g, cls in enumerate(a.classes.tolist()):  # each positive row holds digits of its class
        pool = {tuple(x.ravel()) for x in data.train.of_class(cls)}
        assert all(tuple(x.ravel()) in pool for x in a.pos[g].numpy())


def test_shift_augmentation_translates_with_background_padding():
    img = torch.full((1, 1, 8, 8), -1.0)
    img[0, 0, 3, 4] = 1.0
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(shifted(img, gen, max_shift=0), img)
    out = shifted(img.repeat(50, 1, 1, 1), gen)
    assert torch.all((out == 1.0).sum((1, 2, 3)) == 1)  # the ink pixel moved by at most one in each axis
    pos = torch.nonzero(out[:, 0] == 1.0)[:, 1:]
    assert (pos - torch.tensor([3, 4])).abs().max() == 1 and len({tuple(p) for p in pos.tolist()}) == 9


@pytest.mark.parametrize("power, one_fraction", [(3.0, 0.0), (5.0, 0.0), (1.0, 0.0), (3.0, 0.25)])
def test_alpha_sampler_matches_the_power_law(power, one_fraction):
    gen = torch.Generator().manual_seed(0)
    u, u_one = torch.rand(400_000, generator=gen, dtype=torch.float64), torch.rand(400_000, generator=gen)
    alpha = sample_alpha(u, u_one, power, 4.0, one_fraction)
    assert alpha.min() >= 1.0 and alpha.max() <= 4.0
    # analytic mean of p(a) ∝ a^-k on [1, 4]: int a^(1-k) / int a^-k
    grid = np.linspace(1.0, 4.0, 300_001)
    expected = np.trapezoid(grid ** (1 - power), grid) / np.trapezoid(grid ** (-power), grid)
    if power == 3.0:
        assert expected == pytest.approx(1.6, abs=1e-6)  # (1 - 1/4) / ((1 - 1/16) / 2)
    expected = one_fraction + (1 - one_fraction) * expected
    assert float(alpha.mean()) == pytest.approx(expected, abs=4e-3)
    assert float((alpha == 1.0).double().mean()) == pytest.approx(one_fraction, abs=3e-3)
    # and the CDF at 2: (1 - 2^(1-k)) / (1 - 4^(1-k))
    cdf2 = math.log(2) / math.log(4) if power == 1 else (1 - 2 ** (1 - power)) / (1 - 4 ** (1 - power))
    assert float((alpha[u_one >= one_fraction] <= 2.0).double().mean()) == pytest.approx(cdf2, abs=4e-3)


def test_guidance_weight_is_the_cfg_formula():
    w = guidance_weight(torch.tensor([1.0, 2.0, 4.0]), 32, 16)
    assert w.shape == (3, 16)
    np.testing.assert_allclose(w[:, 0].numpy(), [0.0, 31 / 16, 3 * 31 / 16])


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((500, 5))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 2.0])
    # commuting covariances: |mu1 - mu2|^2 + sum (sigma1 - sigma2)^2 = 9 + (1-2)^2 + (2-1)^2 + (3-3)^2
    cov1, cov2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 9.0])
    assert gaussian_frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(11.0, abs=1e-8)
    # rotating both covariances together changes nothing
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    rotated = gaussian_frechet_distance(q @ mu1, q @ cov1 @ q.T, q @ mu2, q @ cov2 @ q.T)
    assert rotated == pytest.approx(11.0, abs=1e-6)
    # 2-D, non-commuting: N(0, I) vs N(0, S) gives tr(I) + tr(S) - 2 tr(S^(1/2))
    s = np.array([[2.0, 1.0], [1.0, 2.0]])  # eigenvalues 3 and 1
    assert gaussian_frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), s) == pytest.approx(
        2 + 4 - 2 * (math.sqrt(3) + 1), abs=1e-8)
    # from samples: 20,000 draws of N(0, I) vs N(m, 4 I) in 4-D -> |m|^2 + 4 * (2 - 1)^2
    x, y = rng.standard_normal((20_000, 4)), 2 * rng.standard_normal((20_000, 4)) + 1.0
    assert frechet_distance(x, y) == pytest.approx(4.0 + 4.0, rel=0.03)


def test_mmd_is_zero_for_equal_sets_and_grows_with_a_shift():
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(3, 64, 5, generator=gen, dtype=torch.float64)
    x = torch.randn(3, 64, 5, generator=gen, dtype=torch.float64)
    near, far = mmd2(x, y), mmd2(x + 3.0, y)
    assert near.shape == (3,) and torch.all(near.abs() < 0.05) and torch.all(far > 0.2)
    x = x.requires_grad_()
    mmd2(torch.cat([x, x[:, :1]], 1), y, "laplace").sum().backward()  # coincident points: finite gradient
    assert torch.isfinite(x.grad).all()


def test_pretraining_learns_and_is_cached(tmp_path, data):
    cfg = DigitsConfig(encoder_path=str(tmp_path / "enc.pt"), classifier_path=str(tmp_path / "cls.pt"),
                       encoder_steps=120, classifier_steps=120, threads=1)
    torch.set_num_threads(1)
    encoder = load_or_pretrain_encoder(cfg, data)
    classifier = load_or_train_eval_classifier(cfg, data)
    assert accuracy(encoder, data.held_out) > 0.6 and accuracy(classifier, data.held_out) > 0.6  # chance: 0.1
    again = load_or_pretrain_encoder(cfg, data)  # from the cache: the same weights
    assert all(torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), again.state_dict().values()))
    assert torch.load(cfg.encoder_path, weights_only=False)["key"]["kind"] == "encoder"
    other = load_or_pretrain_encoder(dataclasses.replace(cfg, encoder_steps=5), data)  # new key: retrained
    assert accuracy(other, data.held_out) < accuracy(encoder, data.held_out)


def test_drifting_run_learns_and_writes_outputs(tmp_path, cache):
    out = str(tmp_path / "drift")
    untrained = digits.main(SMALL + cache + ["--steps", "1", "--out", str(tmp_path / "init"), "--no-plots"])
    m = digits.main(SMALL + cache + ["--steps", "60", "--lr", "3e-3", "--out", out])
    assert set(m["alphas"]) == {1.0, 2.0} and m["best_alpha"] in (1.0, 2.0)
    assert m["alphas"][1.0]["fd"] < 0.6 * untrained["alphas"][1.0]["fd"]
    assert 0.0 <= m["alphas"][1.0]["accuracy"] <= 1.0 and m["real_train"]["accuracy"] > 0.8
    for name in ("checkpoint.pt", "log.txt", "metrics.json", "fd_vs_alpha.png", "samples_alpha1.png",
                 "curves.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    with open(os.path.join(out, "log.txt")) as f:
        last = f.read().strip().splitlines()[-1]
    assert last.startswith("step 60 ") and "drift_rms [" in last and "samples/s" in last
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert {"model", "ema", "opt", "step", "config"} <= set(ckpt) and ckpt["step"] == 60
    assert len(ckpt["history"]["logs"][-1]["drift_rms"]) == 3


def _params(path):
    ckpt = torch.load(path, weights_only=False)
    return ckpt["model"], ckpt["ema"], ckpt["objective"]


@pytest.mark.parametrize("method", ["drifting", "gan"])
def test_resume_is_exact(tmp_path, cache, method):
    common = SMALL + cache + ["--method", method, "--steps", "8", "--no-evaluate", "--lr", "3e-3"]
    whole, part = str(tmp_path / "whole"), str(tmp_path / "part")
    digits.main(common + ["--out", whole])
    digits.main(common + ["--out", part, "--stop-at", "4"])
    assert torch.load(os.path.join(part, "checkpoint.pt"), weights_only=False)["step"] == 4
    digits.main(["--resume", os.path.join(part, "checkpoint.pt")])
    a, b = _params(os.path.join(whole, "checkpoint.pt")), _params(os.path.join(part, "checkpoint.pt"))
    for sa, sb in zip(a[:2], b[:2]):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    if method == "gan":
        da, db = a[2]["disc"], b[2]["disc"]
        assert all(torch.equal(da[k], db[k]) for k in da)
    # and training moved the weights (the comparison is not trivially equal)
    fresh = str(tmp_path / "fresh")
    digits.main(common + ["--out", fresh, "--steps", "1"])
    one_step = _params(os.path.join(fresh, "checkpoint.pt"))[0]
    assert not torch.equal(one_step["mlp.6.weight"], a[0]["mlp.6.weight"])


def test_compare_trains_the_three_methods_and_writes_tables(tmp_path, cache):
    out = str(tmp_path / "cmp")
    results = digits_compare.main(SMALL + cache + ["--steps", "15", "--out", out, "--no-plots"])
    assert set(results) == {"drifting", "mmd", "gan"}
    for m in results.values():
        assert all(np.isfinite(v["fd"]) for v in m["alphas"].values())
    with open(os.path.join(out, "comparison.md")) as f:
        text = f.read()
    assert all(f"| {k} |" in text for k in ("drifting", "mmd", "gan")) and "| 2 |" in text
    with open(os.path.join(out, "comparison.json")) as f:
        assert set(json.load(f)) == {"drifting", "mmd", "gan"}
    assert os.path.getsize(os.path.join(out, "fd_vs_alpha.png")) > 0
