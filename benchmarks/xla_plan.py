"""python -m benchmarks.xla_plan [--scenario b2-class] [--width-scale 1] [--plan accelerator] [--impls ...]

XLA's memory plan of the JAX step (loss and gradient under jit), compiled on this machine and not run:
the temporaries and outputs of the compiled step, per implementation (benchmarks/impls.py). With
``--plan accelerator`` the fast drift takes its GPU settings (adapters/jax_fast.py: blocks of
ACCELERATOR_BLOCK_ELEMENTS, per-block columns, kept coefficients, stacking runs) and the CPU compiler
schedules for memory, as a GPU's single stream runs one operation at a time; XLA's CPU default overlaps
independent calls and holds their temporaries together (``--plan device`` shows that).
"""

from __future__ import annotations

import argparse
import contextlib
import time

from benchmarks import impls, scenarios

# XLA's CPU scheduler for the accelerator plan: minimize memory rather than maximize concurrency.
MEMORY_SCHEDULE = {"xla_cpu_enable_concurrency_optimized_scheduler": False}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.xla_plan", description=__doc__.split("\n")[2])
    p.add_argument("--scenario", default="b2-class")
    p.add_argument("--width-scale", type=float, default=1.0)
    p.add_argument("--plan", choices=("device", "accelerator"), default="accelerator")
    p.add_argument("--impls", nargs="+", default=["jax", "jax-groups"],
                   choices=[i for i in impls.IMPLS if i.startswith("jax") and i != "jax-tf32x3"])  # GPU only
    args = p.parse_args(argv)
    scen = scenarios.build(args.scenario, args.width_scale)
    accelerator = args.plan == "accelerator"
    inputs = sum(a.nbytes for c in scen.calls for a in (c.x, c.pos, c.neg) if a is not None)
    print(f"{scen.name}, width scale {args.width_scale:g}, {args.plan} plan: inputs {inputs / 2**30:.2f} GiB")
    print("| impl | temporaries | outputs | compile s |\n|---|---|---|---|")
    for impl in args.impls:
        with impls.accelerator_plan() if accelerator else contextlib.nullcontext():
            runner, ctx = impls.make(impl, scen, "cpu")
            started = time.monotonic()
            with ctx:
                temp, outputs = runner.xla_plan(MEMORY_SCHEDULE if accelerator else None)
        print(f"| {impl} | {temp / 2**30:.3f} GiB | {outputs / 2**30:.3f} GiB | "
              f"{time.monotonic() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
