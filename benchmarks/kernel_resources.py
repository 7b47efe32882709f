"""python -m benchmarks.kernel_resources [--warps 8] [--stages 1] [--bc 32] [--arch 90]

Registers, spills and shared memory of the fused path's Triton kernels (b2-class tile sizes:
N = 64, M = 32, P = 128, 3 temperatures), compiled for an NVIDIA target without a GPU: Triton
builds the PTX, the ptxas that ships with Triton reports the resources. Spills were what limited
these kernels on an H200 (benchmarks/RESULTS.md), so this is the check to run before a GPU session.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile


def resources(fn, signature: dict, constexprs: dict, warps: int, stages: int, arch: int) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": warps, "num_stages": stages})
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", f.name, "-o", os.devnull],
                         capture_output=True, text=True)
    os.unlink(f.name)
    text = out.stderr + out.stdout
    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    stores, loads = spills[0] if spills else ("?", "?")
    return (f"{regs[0] if regs else '?'} registers, spill stores {stores} B, spill loads {loads} B, "
            f"shared memory {kernel.metadata.shared} B")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_resources",
                                description=__doc__.split("\n")[0])
    p.add_argument("--warps", type=int, default=8)
    p.add_argument("--stages", type=int, default=1)
    p.add_argument("--bc", type=int, default=32, help="channels per step")
    p.add_argument("--prec", default="tf32x3")
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200), 80 (A100)")
    args = p.parse_args(argv)
    from driftloss.adapters import torch_triton as K

    ptr, i32 = "*fp32", "i32"
    shapes = dict(NX=64, MX=32, PX=128, HAS_NEG=True, BC=args.bc, PREC=args.prec, WHILE=False)
    dist_sig = {"tab_ptr": "*i64", "w_ptr": ptr, "d_ptr": ptr, "mu_ptr": ptr, "spart_ptr": ptr,
                "N": i32, "M": i32, "P": i32, **{k: "constexpr" for k in shapes}}
    drift_consts = dict(shapes, T=3, HAS_FLOOR=False)
    drift_sig = {"tab_ptr": "*i64", "work_ptr": "*i64", "w_ptr": ptr, "d_ptr": ptr, "mu_ptr": ptr,
                 "unit_ptr": ptr, "rate_ptr": ptr, "tcoef_ptr": ptr, "gcoef_ptr": ptr, "part_ptr": ptr,
                 "N": i32, "M": i32, "P": i32, "floor_sqrt": "fp32",
                 **{k: "constexpr" for k in (*drift_consts, "FINAL")}}
    launch = (args.warps, args.stages, args.arch)
    print(f"sm_{args.arch}a, {args.warps} warps, {args.stages} stage(s), {args.bc} channels per step, "
          f"{args.prec}")
    print("distances_kernel     ", resources(K.distances_kernel, dist_sig, shapes, *launch))
    for final in (False, True):
        name = "drift_kernel final  " if final else "drift_kernel lambda "
        print(name, resources(K.drift_kernel, drift_sig, dict(drift_consts, FINAL=final), *launch))


if __name__ == "__main__":
    main()
