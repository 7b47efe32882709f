"""Benchmark problems as lists of loss calls on NumPy float64 data (cast per implementation).

b2-class    one class of the ImageNet B/2 feature set (docs/design.md §4, §6): 9 feature maps
            2 x (32x32, C=640), 2 x (16x16, 1280), 3 x (8x8, 2560), 2 x (4x4, 5120) (C times width_scale);
            each map gives groups loc (H*W problems), mean, std (1 each), mean/std over 2x2 and 4x4
            patches ((H/p)*(W/p) each): 1666 + 418 + 106 + 28 problems per map of each size,
            2*1666 + 2*418 + 3*106 + 2*28 = 4542 problems in 63 loss calls (one per group);
            N=64 generated, P=128 positives, M=32 unconditional negatives with guidance weight
            (alpha - 1)(N - 1)/M at alpha = 2.
toy-large-2d / toy-large-64d   one problem, N = P = 16384, D = 2 or 64, no extra negatives.
cifar-like  one problem, N = P = 256, D = 2048.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TAUS = (0.02, 0.05, 0.2)
B2_MAPS = ((32, 2, 640), (32, 2, 640), (16, 2, 1280), (16, 2, 1280), (8, 3, 2560), (8, 3, 2560),
           (8, 3, 2560), (4, 5, 5120), (4, 5, 5120))  # (H = W, stage, C); stages only label maps
PATCHES = (2, 4)


@dataclass
class Call:
    """One drifting_loss call: x [L, N, C], pos [L, P, C], neg [L, M, C] or None; map_id groups calls."""

    x: np.ndarray
    pos: np.ndarray
    neg: np.ndarray | None
    neg_weight: float | None
    map_id: int


@dataclass
class Scenario:
    name: str
    calls: list[Call]
    taus: tuple[float, ...] = TAUS

    def useful_flop(self) -> float:
        """sum over problems of 2 N J C (distances) + 2 T N J C (drift products), J = N + M + P."""
        total = 0.0
        for c in self.calls:
            lp, n, d = c.x.shape
            j = n + c.pos.shape[1] + (0 if c.neg is None else c.neg.shape[1])
            total += 2.0 * lp * n * j * d * (1 + len(self.taus))
        return total

    def problems(self) -> int:
        return sum(c.x.shape[0] for c in self.calls)

    def kernel_entries(self) -> int:
        """sum over problems of N * J (one [N, J] kernel matrix per problem and temperature)."""
        return sum(c.x.shape[0] * c.x.shape[1] * (c.x.shape[1] + c.pos.shape[1]
                   + (0 if c.neg is None else c.neg.shape[1])) for c in self.calls)


def _groups(fmap: np.ndarray) -> list[np.ndarray]:
    """Feature groups of one map [n, H, W, C] -> list of [L, n, C] (docs/design.md §4)."""
    n, h, w, c = fmap.shape
    out = [fmap.reshape(n, h * w, c), fmap.mean(axis=(1, 2))[:, None], fmap.std(axis=(1, 2))[:, None]]
    for p in PATCHES:
        tiles = fmap.reshape(n, h // p, p, w // p, p, c)
        out += [tiles.mean(axis=(2, 4)).reshape(n, -1, c), tiles.std(axis=(2, 4)).reshape(n, -1, c)]
    return [np.ascontiguousarray(np.swapaxes(g, 0, 1)) for g in out]


def b2_class(width_scale: float, seed: int = 0, n: int = 64, p: int = 128, m: int = 32) -> Scenario:
    rng = np.random.default_rng(seed)
    calls = []
    for map_id, (hw, _, c_full) in enumerate(B2_MAPS):
        c = max(1, round(c_full * width_scale))
        # Post-ReLU-like features with a shared offset; positives shifted a little from the generated.
        # float32 draws: the full-width class is ~1e9 numbers, and the GPU run pays for host time.
        draws = ((rng.standard_normal((k, hw, hw, c), dtype=np.float32), shift)
                 for k, shift in ((n, 0.0), (p, 0.2), (m, 0.1)))
        gx, gp, gn = (_groups(np.maximum(z + shift, 0) + 0.5) for z, shift in draws)
        w = 1.0 * (n - 1) / m  # guidance weight at alpha = 2 (docs/design.md §2, Guidance)
        calls += [Call(x, pp, q, w, map_id) for x, pp, q in zip(gx, gp, gn, strict=True)]
    return Scenario("b2-class", calls)


def toy_large(d: int, n: int = 16384, seed: int = 0) -> Scenario:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(1, n, d))
    pos = rng.normal(size=(1, n, d)) * 0.8 + 0.3
    return Scenario(f"toy-large-{d}d", [Call(x, pos, None, None, 0)])


def cifar_like(seed: int = 0, n: int = 256, p: int = 256, d: int = 2048) -> Scenario:
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.normal(size=(1, n, d)), 0)
    pos = np.maximum(rng.normal(0.1, 1.0, size=(1, p, d)), 0)
    return Scenario("cifar-like", [Call(x, pos, None, None, 0)])


NAMES = ("b2-class", "toy-large-2d", "toy-large-64d", "cifar-like")
ALIASES = {"toy-large": ("toy-large-2d", "toy-large-64d")}


def build(name: str, width_scale: float) -> Scenario:
    if name == "b2-class":
        return b2_class(width_scale)
    if name.startswith("toy-large-"):
        return toy_large(int(name.removeprefix("toy-large-").removesuffix("d")))
    if name == "cifar-like":
        return cifar_like()
    raise ValueError(f"unknown scenario {name!r}; choose from {NAMES} or {tuple(ALIASES)}")
