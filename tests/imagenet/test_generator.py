"""The ImageNet generator: shapes, parameter counts, zero init, gradients, conditioning, bf16, determinism."""

from __future__ import annotations

import pytest
import torch

from reference_trainers.imagenet import params
from reference_trainers.imagenet.generator import (
    Generator,
    apply_rope,
    build_generator,
    count_parameters,
    patchify,
    rope_tables,
    swiglu_hidden,
    unpatchify,
)
from reference_trainers.imagenet.presets import PRESETS, SYSTEM_PRESETS, get_preset

META = torch.device("meta")
PAPER_MILLIONS = {"latent-b2": 133, "latent-l2": 463, "pixel-b16": 134, "pixel-l16": 464}
TINY = ("latent-tiny", "pixel-tiny")
OUTPUT_LAYER = {"final.linear.weight", "final.linear.bias"}


def make_inputs(model: Generator, batch: int = 3, seed: int = 0, device=None):
    """noise, labels, alpha, style for ``model`` (on ``device``), drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    p = model.preset
    noise = torch.randn(batch, p.channels, p.size, p.size, generator=g)
    labels = torch.randint(0, p.num_classes, (batch,), generator=g)
    alpha = 1 + 3 * torch.rand(batch, generator=g)
    style = model.random_style(batch, generator=g)
    if device is not None:
        return noise.to(device), labels.to(device), alpha.to(device), style.to(device)
    return noise, labels, alpha, style


def tiny(name: str, seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    return build_generator(name)


def regression_step(model: Generator, opt: torch.optim.Optimizer, inputs, target: torch.Tensor) -> None:
    """One AdamW step on the mean squared error to ``target`` (grads left in .grad)."""
    opt.zero_grad(set_to_none=True)
    loss = (model(*inputs) - target).pow(2).mean()
    loss.backward()
    opt.step()


def expected_parameters(name: str) -> int:
    """The count the layout implies, written out term by term (see the generator's docstring)."""
    p = get_preset(name)
    d, hd, pp = p.hidden, p.hidden // p.heads, p.patch_size ** 2 * p.channels
    h = swiglu_hidden(d, p.mlp_ratio)
    block = (4 * d * d + 4 * d                 # qkv + proj, biased
             + 3 * d * h + 2 * h + d           # SwiGLU gate, up, down, biased
             + 6 * d * d + 6 * d               # adaLN-zero
             + 2 * d + 2 * hd)                 # two RMSNorms + per-head q/k RMSNorms
    embed = (pp * d + d                        # patch embedding
             + p.tokens * d                    # absolute position embedding
             + p.num_classes * d               # class embedding
             + p.style_tokens * p.style_codebook * d
             + 256 * d + d + d * d + d + d     # alpha MLP + its RMSNorm
             + d * d + d                       # in-context projection
             + p.register_tokens * d)          # register embeddings
    final = d + 2 * d * d + 2 * d + d * pp + pp
    return p.depth * block + embed + final


# --- (a), (b) shapes and parameter counts on the meta device -------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_output_shape_on_meta(name):
    model = build_generator(name, device=META)
    assert model.pos_embed.device.type == "meta"
    p = model.preset
    out = model(*make_inputs(model, batch=2, device=META))
    assert out.shape == (2, p.channels, p.size, p.size) and out.device.type == "meta"


@pytest.mark.parametrize("name", SYSTEM_PRESETS)
def test_system_parameter_counts_match_paper(name):
    count = count_parameters(build_generator(name, device=META))
    assert abs(count / (PAPER_MILLIONS[name] * 1e6) - 1) < 0.02, count


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_count_matches_layout(name):
    assert params.generator_params(name) == expected_parameters(name)


def test_swiglu_hidden_widths():
    assert swiglu_hidden(768, 8 / 3) == 2048
    assert swiglu_hidden(1024, 8 / 3) == 2752
    assert swiglu_hidden(64, 8 / 3) == 192


def test_params_cli_prints_every_preset(capsys, monkeypatch):
    monkeypatch.setattr(params, "encoder_params", lambda name: None)     # the generator's lines only
    params.main([])
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert all(len(fields) == 2 for fields in lines)
    gen = {fields[0]: int(fields[1]) for fields in lines}
    assert list(gen)[:4] == list(SYSTEM_PRESETS) and set(gen) == set(PRESETS) and len(lines) == len(PRESETS)
    assert gen["latent-b2"] == expected_parameters("latent-b2")
    monkeypatch.setattr(params, "encoder_params", lambda name: 7)        # the encoder hook's line format
    params.main(["--preset", "pixel-tiny"])
    assert capsys.readouterr().out.splitlines() == [f"pixel-tiny {expected_parameters('pixel-tiny')}",
                                                    "pixel-tiny encoder 7"]


# --- (d) zero init --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_output_is_exactly_zero_at_init(name):
    model = tiny(name)
    for seed in range(3):
        out = model(*make_inputs(model, seed=seed))
        assert torch.equal(out, torch.zeros_like(out))


def test_init_values():
    model = tiny("latent-tiny")
    assert torch.allclose(model.pos_embed[0, : model.pos_embed.shape[1] // 4], torch.zeros(16))  # sin(0)
    assert torch.allclose(model.pos_embed[0, model.pos_embed.shape[1] // 4: 32], torch.ones(16))  # cos(0)
    assert model.blocks[0].attn.qkv.bias.abs().sum() == 0
    assert model.blocks[0].attn.qkv.weight.std() > 0
    assert 0.01 < model.condition.class_embed.weight.std() < 0.03


# --- (c) gradients --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_gradients_flow_as_zero_init_implies(name):
    model = tiny(name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    inputs = make_inputs(model, batch=4)
    target = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(5))
    regression_step(model, opt, inputs, target)
    # Step 0: the output is 0 and the output Linear's weight is 0, so only that Linear gets gradient.
    for pname, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), pname
        assert (param.grad.abs().sum() > 0) == (pname in OUTPUT_LAYER), pname
    # Step 1: the final adaLN, the blocks' gates and everything under the residual stream / condition.
    regression_step(model, opt, inputs, target)
    assert model.final.adaln[-1].weight.grad.abs().sum() > 0
    assert model.blocks[0].adaln[-1].weight.grad.abs().sum() > 0
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() == 0          # still gated by 0
    # Step 2: the gates are open; every parameter has a finite, non-zero gradient.
    regression_step(model, opt, inputs, target)
    for pname, param in model.named_parameters():
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, pname


# --- (e) style and alpha condition the output -----------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_style_and_alpha_change_output_after_training(name):
    model = tiny(name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    noise, labels, alpha, style = make_inputs(model, batch=4)
    target = torch.randn(noise.shape, generator=torch.Generator().manual_seed(5))
    other_style = (style + 1) % model.style_codebook
    regression_step(model, opt, (noise, labels, alpha, style), target)
    with torch.no_grad():
        # After one step only the output Linear moved: the condition enters through zero adaLN layers only.
        base = model(noise, labels, alpha, style)
        assert base.abs().sum() > 0
        assert torch.equal(base, model(noise, labels, alpha, other_style))
        assert torch.equal(base, model(noise, labels, alpha + 1, style))
        assert not torch.allclose(base, model(noise.flip(0), labels, alpha, style))
    regression_step(model, opt, (noise, labels, alpha, style), target)
    with torch.no_grad():
        base = model(noise, labels, alpha, style)
        assert (base - model(noise, labels, alpha, other_style)).abs().max() > 1e-4
        assert (base - model(noise, labels, alpha + 1, style)).abs().max() > 3e-5
        assert (base - model(noise, (labels + 1) % model.num_classes, alpha, style)).abs().max() > 1e-4


# --- (f) bf16 autocast ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_bf16_autocast_close_to_fp32(name):
    model = tiny(name)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():                            # open the zero-initialized layers so the output is not 0
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=g))
    inputs = make_inputs(model)
    with torch.no_grad():
        ref = model(*inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(*inputs)
    assert low.dtype == torch.bfloat16 and ref.dtype == torch.float32
    assert torch.isfinite(low).all() and ref.abs().mean() > 0.1
    assert (low.float() - ref).norm() / ref.norm() < 0.05
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(*inputs).float().pow(2).mean().backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())


# --- (g) determinism ------------------------------------------------------------------------------------


def test_same_seed_same_weights():
    a, b, c = tiny("latent-tiny", seed=3), tiny("latent-tiny", seed=3), tiny("latent-tiny", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.0.attn.qkv.weight"], sc["blocks.0.attn.qkv.weight"])


def test_random_style():
    model = tiny("latent-tiny")
    s1 = model.random_style(500, generator=torch.Generator().manual_seed(0))
    s2 = model.random_style(500, generator=torch.Generator().manual_seed(0))
    assert s1.dtype == torch.long and s1.shape == (500, model.style_tokens) and torch.equal(s1, s2)
    assert s1.min() == 0 and s1.max() == model.style_codebook - 1


# --- helpers and validation -----------------------------------------------------------------------------


def test_patchify_roundtrip_and_layout():
    x = torch.randn(2, 3, 8, 8)
    tokens = patchify(x, 4)
    assert tokens.shape == (2, 4, 48) and torch.equal(unpatchify(tokens, 4, 3), x)
    assert torch.equal(tokens[:, 1].reshape(2, 4, 4, 3).permute(0, 3, 1, 2), x[:, :, :4, 4:])  # top-right


def test_rope_is_relative():
    cos, sin = rope_tables(12, 8, torch.device("cpu"))
    q, k = torch.randn(1, 1, 1, 8).expand(1, 1, 12, 8), torch.randn(1, 1, 1, 8).expand(1, 1, 12, 8)
    scores = apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-1, -2)    # [1, 1, 12, 12]
    assert torch.allclose(scores[0, 0].diagonal(2)[:-1], scores[0, 0].diagonal(2)[1:], atol=1e-5)
    assert not torch.allclose(scores[0, 0, 0, 0], scores[0, 0, 0, 3])
    assert torch.allclose(apply_rope(q, cos, sin).norm(dim=-1), q.norm(dim=-1))


def test_forward_validates_arguments():
    model = tiny("latent-tiny")
    noise, labels, alpha, style = make_inputs(model, batch=2)
    with pytest.raises(ValueError, match="noise must be"):
        model(noise[:, :3], labels, alpha, style)
    with pytest.raises(ValueError, match="labels must lie in"):
        model(noise, torch.tensor([0, model.num_classes]), alpha, style)
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        model(noise, labels.float(), alpha, style)
    with pytest.raises(ValueError, match="style must be an integer tensor"):
        model(noise, labels, alpha, style[:, 1:])
    with pytest.raises(ValueError, match="style indices must lie in"):
        model(noise, labels, alpha, style + model.style_codebook)
    with pytest.raises(ValueError, match="alpha must be"):
        model(noise, labels, alpha[:1], style)
    assert torch.equal(model(noise, labels, 1.5, style), model(noise, labels, torch.full((2,), 1.5), style))
