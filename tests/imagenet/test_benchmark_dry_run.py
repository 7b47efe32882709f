"""benchmarks.imagenet_step --dry-run: the FLOP counts checked against closed forms from the presets, and the
ESTIMATE table with a row per Table 8 preset (meta-device models: no weights, a few seconds on a CPU)."""

import os
import re

import pytest

from benchmarks import imagenet_step
from reference_trainers.imagenet.generator import (
    ALPHA_FREQUENCIES,
    build_generator,
    count_parameters,
    swiglu_hidden,
)
from reference_trainers.imagenet.presets import SYSTEM_PRESETS, get_preset


@pytest.fixture(scope="module")
def dry_run():
    before = os.stat(imagenet_step.RESULTS).st_mtime_ns if os.path.exists(imagenet_step.RESULTS) else None
    rows, text = imagenet_step.main(["--dry-run"])
    after = os.stat(imagenet_step.RESULTS).st_mtime_ns if os.path.exists(imagenet_step.RESULTS) else None
    assert before == after, "--dry-run without --write must not touch RESULTS_LOG.md"
    return {r["preset"]: r for r in rows}, text


def generator_forward(preset) -> int:
    """Matrix FLOP of one sample's forward, from the preset alone (A.2 layout)."""
    d, depth, p2c = preset.hidden, preset.depth, preset.patch_size**2 * preset.channels
    h = swiglu_hidden(d, preset.mlp_ratio)
    t = preset.tokens
    n = t + preset.register_tokens
    per_token = 3 * d * d + d * d + 3 * d * h                     # qkv, proj, SwiGLU gate / up / down
    blocks = depth * 2 * n * per_token
    attention = depth * 4 * n * n * d                             # QK^T and AV
    patches = 2 * t * p2c * d * 2                                 # patch embedding in, output layer out
    per_sample = 2 * (depth * 6 * d * d + 2 * d * d + ALPHA_FREQUENCIES * d + d * d + d * d)
    return blocks + attention + patches + per_sample              # adaLN, final adaLN, alpha MLP, context


def resnet_forward(preset) -> int:
    """Conv FLOP (2 * MACs) of one sample through the basic-block ResNet encoder of a latent preset."""
    c, g = preset.encoder_width, preset.size // preset.encoder_patch
    flops = 2 * 9 * preset.channels * preset.encoder_patch**2 * c * g * g       # stem
    cin = c
    for i, blocks in enumerate(preset.encoder_blocks):
        cout, g = c * 2**i, g if i == 0 else g // 2
        for b in range(blocks):
            first_in = cin if b == 0 else cout
            flops += 2 * 9 * first_in * cout * g * g + 2 * 9 * cout * cout * g * g
            if first_in != cout or (b == 0 and i > 0):
                flops += 2 * first_in * cout * g * g                            # 1x1 shortcut
        cin = cout
    return flops


def test_generator_flops_of_latent_b2_match_the_closed_form(dry_run):
    rows, _ = dry_run
    preset = get_preset("latent-b2")
    gen = rows["latent-b2"]["gen"]
    assert gen["forward"] == generator_forward(preset)
    n = preset.tokens + preset.register_tokens
    attention = 4 * n * n * preset.hidden * preset.depth
    assert gen["attention"] == attention
    params = count_parameters(build_generator(preset, "meta"))
    assert gen["naive"] == 2 * params * n + attention
    # adaLN-zero's 6 D^2 per block act once per sample: the per-token rule overcounts by about half
    assert 1.4 < gen["naive"] / gen["forward"] < 1.6
    assert 45e9 < gen["forward"] < 55e9


def test_encoder_flops_and_groups_of_latent_b2(dry_run):
    rows, _ = dry_run
    preset = get_preset("latent-b2")
    enc = rows["latent-b2"]["enc"]
    assert enc["forward"] == resnet_forward(preset)
    assert enc["backward"] == enc["forward"]   # frozen: input gradients only, one product per conv
    # 11 taps x (loc, mean, std, mean_2, std_2, mean_4, std_4) + input + global
    assert len(enc["groups"]) == 11 * 7 + 2
    assert enc["groups"]["global"] == (1, 4 * 32 * 32)
    assert enc["groups"]["resnet.layer1.1.loc"] == (32 * 32, 640)
    assert enc["groups"]["resnet.layer4.3.mean_2"] == (4, 5120)
    k, n, p, m = 16, preset.n_neg, preset.n_pos, preset.n_unc
    want = sum(2 * k * L * n * (n + m + p) * C * 4 for L, C in enc["groups"].values())
    assert rows["latent-b2"]["f_loss"] == want and rows["latent-b2"]["classes"] == 16


def test_gpu_hour_table_has_a_row_per_system_preset(dry_run):
    rows, text = dry_run
    assert "ESTIMATE (FLOP-based), not measured" in text
    assert set(SYSTEM_PRESETS) <= set(rows)
    lines = text.splitlines()
    head = [c.strip() for c in next(x for x in lines if x.startswith("| preset |")).strip("|").split("|")]
    for name in SYSTEM_PRESETS:
        preset = get_preset(name)
        line = next(x for x in lines if x.startswith(f"| {name} |"))
        cells = dict(zip(head, (c.strip() for c in line.strip("|").split("|"))))
        assert cells["classes / device (share)"] == f"{preset.n_classes // 8} of {preset.n_classes} (0.125)"
        r = rows[name]
        assert r["img_s"] > 0 and r["device_hours"] > 0
        assert r["device_hours"] == pytest.approx(
            preset.steps * preset.batch_size / r["img_s"] / 3600)
        hours = float(re.sub(",", "", cells["device-hours"]))
        assert hours == pytest.approx(r["device_hours"], rel=0.01, abs=0.05)
        assert float(re.sub(",", "", cells["wall h @ 8"])) == pytest.approx(hours / 8, rel=0.02)
    # pixel presets drift in ConvNeXt-V2 features too: more groups, more encoder FLOP
    assert len(rows["pixel-b16"]["enc"]["groups"]) > len(rows["latent-b2"]["enc"]["groups"])
    assert rows["pixel-b16"]["enc"]["forward"] > rows["latent-b2"]["enc"]["forward"]
