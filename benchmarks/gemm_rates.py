"""python -m benchmarks.gemm_rates [--repeats 20]

float32 matrix-product rates (GFLOP/s, median of repeats after one warm-up) of each library on this
machine, for the products of one cifar-like step (N = P = 256, D = 2048, three temperatures): the
distance product [256, 2048] @ [2048, 512] and the drift product [768, 512] @ [512, 2048]. They bound
what any exact float32 implementation of that step can reach (useful work 2.15 GFLOP, nearly all in
these two products). For reading, not for RESULTS.md ratios.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks import impls, measure

SHAPES = {"distance [256,2048]@[2048,512]": (256, 2048, 512), "drift [768,512]@[512,2048]": (768, 512, 2048)}


def _median_seconds(fn, repeats: int) -> float:
    times, _ = measure.time_runner(impls.Runner(step=fn, sync=lambda _: None, to_numpy=None), repeats)
    return measure.median(times)


def _shape_rates(m: int, k: int, n: int, repeats: int) -> dict[str, float]:
    """{library: GFLOP/s} of [m, k] @ [k, n] in float32."""
    import jax
    import jax.numpy as jnp
    import torch
    from driftloss.adapters import torch_cpu_products

    rng = np.random.default_rng(0)
    a, b = (rng.normal(size=s).astype(np.float32) for s in ((m, k), (k, n)))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    product = jax.jit(lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST))
    runs = {
        "torch.matmul (MKL)": lambda: torch.matmul(ta, tb),
        "NumPy (OpenBLAS)": lambda: a @ b,
        "JAX (XLA)": lambda: product(ja, jb).block_until_ready(),
    }
    if torch_cpu_products.available():
        runs["oneDNN (torch_cpu_products)"] = lambda: torch_cpu_products._onednn_product(ta, tb)
    return {lib: 2 * m * k * n / _median_seconds(fn, repeats) / 1e9 for lib, fn in runs.items()}


def rates(repeats: int) -> dict[str, dict[str, float]]:
    """{product: {library: GFLOP/s}}."""
    return {name: _shape_rates(*shape, repeats) for name, shape in SHAPES.items()}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gemm_rates", description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    table = rates(args.repeats)
    libs = sorted({lib for row in table.values() for lib in row})
    print("| product | " + " | ".join(libs) + " |")
    print("|---|" + "---|" * len(libs))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{row[lib]:.0f}" if lib in row else "—" for lib in libs) + " |")


if __name__ == "__main__":
    main()
