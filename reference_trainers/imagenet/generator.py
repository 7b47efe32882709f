"""The ImageNet generator f(eps, class, alpha, style): a DiT-style transformer evaluated once per sample.

    model = build_generator("latent-b2")                                   # or a Preset
    style = model.random_style(batch, generator=g)                         # long [B, style_tokens]
    x = model(noise, labels, alpha, style)                                 # [B, C, S, S] -> [B, C, S, S]

Layout (paper A.2, see docs/imagenet_recipe.md):
  - noise [B, C, S, S] -> (S/p)^2 patch tokens (Linear of each p x p x C patch) + a learnable absolute
    position embedding initialized to 2-D sin-cos;
  - condition c [B, D] = class embedding + sum of style_tokens style vectors (each index into its own table of
    style_codebook vectors) + 0.02 * RMSNorm(MLP(sincos256(alpha))); alpha is embedded like a diffusion
    timestep (256 sin-cos frequencies of alpha itself, max period 1e4);
  - register_tokens in-context tokens Linear(c) + learned embeddings are prepended, and dropped at the output;
  - blocks: RMSNorm (eps 1e-6, learnable scale), attention with qkv bias, per-head QK RMSNorm and RoPE,
    SwiGLU MLP (hidden = mlp_ratio * D rounded up to a multiple of 32, biased), adaLN-zero modulation from c;
  - final layer: RMSNorm + adaLN (shift, scale) from c, zero-initialized Linear to p*p*C, unpatchify.
Positions: RoPE is 1-D over all prefix + patch tokens in order (prefix first, then the patch grid row by
row, base 1e4); the 2-D structure comes from the absolute embedding. The adaLN and output layers start at
zero, so the output is exactly 0 at init whatever the inputs. Parameters are fp32; forward runs under bf16
autocast (norms and RoPE compute in fp32).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from reference_trainers.imagenet.presets import Preset, get_preset

ROPE_BASE = 1e4
NORM_EPS = 1e-6
ALPHA_FREQUENCIES = 256     # sin-cos features of alpha
ALPHA_SCALE = 0.02          # the alpha embedding's weight in the condition


def swiglu_hidden(hidden: int, mlp_ratio: float) -> int:
    """SwiGLU hidden width: mlp_ratio * hidden rounded up to a multiple of 32 (2048 at 768, 2752 at 1024)."""
    return 32 * math.ceil(round(mlp_ratio * hidden, 6) / 32)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """2-D sin-cos embedding [grid*grid, dim], tokens row by row; the first half of dim encodes the row, the
    second the column (each as [sin, cos] of dim/4 frequencies 1e4^(-i/(dim/4)))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))   # [dim/4]
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                                torch.arange(grid, dtype=torch.float64), indexing="ij")  # [grid, grid] each
    parts = []
    for pos in (rows, cols):
        angle = pos.reshape(-1, 1) * omega                                        # [grid*grid, dim/4]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1).float()                                        # [grid*grid, dim]


def sincos_timestep(t: torch.Tensor, dim: int = ALPHA_FREQUENCIES, max_period: float = 1e4) -> torch.Tensor:
    """Diffusion-timestep features of t [B]: [B, dim] = [cos(t w_i), sin(t w_i)],
    w_i = max_period^(-i/(dim/2)), i < dim/2."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angle = t.float()[:, None] * freqs[None]                                      # [B, dim/2]
    return torch.cat([angle.cos(), angle.sin()], dim=-1)                          # [B, dim]


def rope_tables(tokens: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D RoPE cos and sin [tokens, head_dim/2] in fp32 for positions 0..tokens-1 (base ROPE_BASE)."""
    inv = 1.0 / ROPE_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angle = torch.arange(tokens, dtype=torch.float32, device=device)[:, None] * inv[None]   # [N, hd/2]
    return angle.cos(), angle.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, N, hd] by position (rotate-half pairing), in fp32; cos/sin [N, hd/2]. Returns fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)                                           # [B, H, N, hd/2] each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)          # [B, H, N, hd]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x [B, N, D] * (1 + scale [B, D]) + shift [B, D]."""
    return x * (1 + scale[:, None]) + shift[:, None]                              # [B, N, D]


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, S, S] -> [B, (S/p)^2, p*p*C], patches row by row, each patch's features (py, px, c)."""
    b, c, s, _ = x.shape
    x = x.reshape(b, c, s // p, p, s // p, p)                                     # [B, C, h, p, w, p]
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (s // p) ** 2, p * p * c)       # [B, h*w, p*p*C]


def unpatchify(x: torch.Tensor, p: int, c: int) -> torch.Tensor:
    """The inverse of patchify: [B, (S/p)^2, p*p*C] -> [B, C, S, S]."""
    b, t, _ = x.shape
    h = math.isqrt(t)
    x = x.reshape(b, h, h, p, p, c)                                               # [B, h, w, p, p, C]
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, h * p, h * p)                # [B, C, S, S]


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learnable scale, computed in fp32, returned in the input dtype."""

    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()                                                           # [..., dim]
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)       # [..., dim]
        return (y * self.weight.float()).to(x.dtype)                              # [..., dim]


class Attention(nn.Module):
    """Multi-head self-attention: fused qkv (biased), per-head QK RMSNorm, RoPE, SDPA, output projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, N, D], cos/sin [N, hd/2] -> [B, N, D]."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim)            # [B, N, 3, H, hd]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                            # [B, H, N, hd] each
        q = apply_rope(self.q_norm(q), cos, sin).to(v.dtype)                      # [B, H, N, hd]
        k = apply_rope(self.k_norm(k), cos, sin).to(v.dtype)                      # [B, H, N, hd]
        out = F.scaled_dot_product_attention(q, k, v)                             # [B, H, N, hd]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))                    # [B, N, D]


class SwiGLU(nn.Module):
    """w_down(silu(w_gate x) * w_up x), all three linears biased."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden)
        self.w_up = nn.Linear(dim, hidden)
        self.w_down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, D] -> [B, N, D]."""
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))                 # [B, N, D]


class Block(nn.Module):
    """Pre-norm transformer block with adaLN-zero: shift/scale/gate for attention and MLP from c."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, mlp_hidden)
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, N, D], c [B, D], cos/sin [N, hd/2] -> [B, N, D]."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(c).chunk(6, dim=-1)   # [B, D] each
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin)   # [B, N, D]
        x = x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))             # [B, N, D]
        return x


class FinalLayer(nn.Module):
    """RMSNorm + adaLN (shift, scale) from c, then a zero-initialized Linear to p*p*C per token."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x [B, T, D], c [B, D] -> [B, T, p*p*C]."""
        shift, scale = self.adaln(c).chunk(2, dim=-1)                             # [B, D] each
        return self.linear(modulate(self.norm(x), shift, scale))                  # [B, T, p*p*C]


class Condition(nn.Module):
    """c = class embedding + sum of the style vectors + ALPHA_SCALE * RMSNorm(MLP(sincos256(alpha)))."""

    def __init__(self, dim: int, num_classes: int, style_tokens: int, style_codebook: int):
        super().__init__()
        self.style_tokens, self.style_codebook = style_tokens, style_codebook
        self.class_embed = nn.Embedding(num_classes, dim)
        self.style_embed = nn.Embedding(style_tokens * style_codebook, dim)   # style_tokens tables, stacked
        self.alpha_mlp = nn.Sequential(nn.Linear(ALPHA_FREQUENCIES, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.alpha_norm = RMSNorm(dim)

    def forward(self, labels: torch.Tensor, alpha: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """labels long [B], alpha float [B], style long [B, style_tokens] -> c [B, D]."""
        offsets = torch.arange(self.style_tokens, device=style.device) * self.style_codebook   # [T_s]
        styles = self.style_embed(style + offsets).sum(dim=1)                     # [B, D]
        a = self.alpha_norm(self.alpha_mlp(sincos_timestep(alpha)))               # [B, D]
        return self.class_embed(labels) + styles + ALPHA_SCALE * a                # [B, D]


class Generator(nn.Module):
    """f(noise [B, C, S, S], labels long [B], alpha float [B], style long [B, style_tokens]) -> [B, C, S, S].

    Under autocast the output is in the autocast dtype (the final Linear's); cast it as the loss needs.
    """

    def __init__(self, preset: Preset):
        super().__init__()
        d, p = preset.hidden, preset.patch_size
        if d % preset.heads or (d // preset.heads) % 2 or d % 4:
            raise ValueError(f"hidden {d} must be divisible by heads {preset.heads} into an even head dim, "
                             "and by 4 (2-D sin-cos position embedding)")
        if preset.size % p:
            raise ValueError(f"size {preset.size} is not a multiple of patch_size {p}")
        self.preset = preset
        self.channels, self.size, self.patch = preset.channels, preset.size, p
        self.num_classes = preset.num_classes
        self.style_tokens, self.style_codebook = preset.style_tokens, preset.style_codebook
        self.registers, self.head_dim = preset.register_tokens, d // preset.heads
        self.grid = preset.size // p
        self.patch_embed = nn.Linear(p * p * preset.channels, d)
        self.pos_embed = nn.Parameter(torch.zeros(self.grid * self.grid, d))
        self.condition = Condition(d, preset.num_classes, preset.style_tokens, preset.style_codebook)
        self.context_proj = nn.Linear(d, d)
        self.register_embed = nn.Parameter(torch.zeros(preset.register_tokens, d))
        mlp_hidden = swiglu_hidden(d, preset.mlp_ratio)
        self.blocks = nn.ModuleList([Block(d, preset.heads, mlp_hidden) for _ in range(preset.depth)])
        self.final = FinalLayer(d, p * p * preset.channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier-uniform linears with zero biases; embeddings N(0, 0.02); the patch position embedding 2-D
        sin-cos; every adaLN and the output Linear zero (the output is exactly 0 at init); norms' scales 1."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        nn.init.normal_(self.register_embed, std=0.02)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d(self.pos_embed.shape[1], self.grid).to(self.pos_embed.device))
        for zero in [*(b.adaln[-1] for b in self.blocks), self.final.adaln[-1], self.final.linear]:
            nn.init.zeros_(zero.weight)
            nn.init.zeros_(zero.bias)

    def random_style(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform style indices long [batch, style_tokens] in [0, style_codebook), drawn on ``generator``'s
        device (the CPU by default) and returned on the model's."""
        device = generator.device if generator is not None else torch.device("cpu")
        if self.pos_embed.device.type == "meta":
            device = self.pos_embed.device
        style = torch.randint(0, self.style_codebook, (batch, self.style_tokens), generator=generator,
                              device=device)                                      # [B, T_s]
        return style.to(self.pos_embed.device)

    def _validate(self, noise: torch.Tensor, labels: torch.Tensor, alpha: torch.Tensor | float,
                  style: torch.Tensor) -> torch.Tensor:
        """Check shapes, dtypes and index ranges; return alpha as float [B]."""
        expect = (self.channels, self.size, self.size)
        if noise.dim() != 4 or tuple(noise.shape[1:]) != expect:
            raise ValueError(f"noise must be [B, {', '.join(map(str, expect))}], got {list(noise.shape)}")
        b = noise.shape[0]
        if labels.shape != (b,) or labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"labels must be an integer tensor [{b}], "
                             f"got {labels.dtype} {list(labels.shape)}")
        if style.shape != (b, self.style_tokens) or style.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"style must be an integer tensor [{b}, {self.style_tokens}] (random_style), "
                             f"got {style.dtype} {list(style.shape)}")
        alpha = torch.as_tensor(alpha, dtype=torch.float32, device=noise.device)
        if alpha.dim() == 0:
            alpha = alpha.expand(b)
        if alpha.shape != (b,):
            raise ValueError(f"alpha must be a float or a tensor [{b}], got {list(alpha.shape)}")
        if noise.device.type != "meta" and not torch.compiler.is_compiling():
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"labels must lie in [0, {self.num_classes}), got "
                                 f"[{int(labels.min())}, {int(labels.max())}]")
            if style.numel() and (style.min() < 0 or style.max() >= self.style_codebook):
                raise ValueError(f"style indices must lie in [0, {self.style_codebook}), got "
                                 f"[{int(style.min())}, {int(style.max())}]")
        return alpha

    def forward(self, noise: torch.Tensor, labels: torch.Tensor, alpha: torch.Tensor | float,
                style: torch.Tensor) -> torch.Tensor:
        """noise [B, C, S, S], labels long [B], alpha float [B] (or a float), style long [B, style_tokens]
        -> [B, C, S, S]; T = (S/p)^2 patch tokens, R = register_tokens, N = R + T."""
        alpha = self._validate(noise, labels, alpha, style)                       # [B]
        x = self.patch_embed(patchify(noise, self.patch)) + self.pos_embed        # [B, T, D]
        c = self.condition(labels, alpha, style)                                  # [B, D]
        prefix = self.context_proj(c)[:, None] + self.register_embed              # [B, R, D]
        x = torch.cat([prefix.to(x.dtype), x], dim=1)                             # [B, N, D]
        cos, sin = rope_tables(x.shape[1], self.head_dim, x.device)               # [N, hd/2] each
        for block in self.blocks:
            x = block(x, c, cos, sin)                                             # [B, N, D]
        x = self.final(x[:, self.registers:], c)                                  # [B, T, p*p*C]
        return unpatchify(x, self.patch, self.channels)                           # [B, C, S, S]


def build_generator(preset: Preset | str, device: torch.device | str | None = None) -> Generator:
    """Generator(preset) built directly on ``device`` (default: the current default device); on
    torch.device("meta") nothing is allocated (shapes and parameter counts only)."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if device is None:
        return Generator(preset)
    with torch.device(device):
        return Generator(preset)


def count_parameters(module: nn.Module) -> int:
    """The number of parameters of ``module`` (every parameter, trainable or not)."""
    return sum(p.numel() for p in module.parameters())
