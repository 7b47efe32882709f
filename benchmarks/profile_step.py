"""python -m benchmarks.profile_step [--scenario b2-class] [--impl torch] [--width-scale 1]

Where one loss-and-gradient step spends its time: torch.profiler over one warm step, the kernels
sorted by device time (CUDA) or CPU time. For reading, not for RESULTS.md ratios.
"""

from __future__ import annotations

import argparse

from benchmarks import impls, scenarios


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.split("\n")[0])
    p.add_argument("--scenario", default="b2-class")
    p.add_argument("--impl", default="torch")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--width-scale", type=float, default=1.0)
    p.add_argument("--rows", type=int, default=15)
    args = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    scen = scenarios.build(args.scenario, args.width_scale)
    runner, ctx = impls.make(args.impl, scen, args.device)
    with ctx:
        for _ in range(2):  # compile and warm up
            runner.sync(runner.step())
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with profile(activities=activities) as prof:
            runner.sync(runner.step())
    key = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
    print(f"{args.scenario} / {args.impl} on {args.device}")
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))
    del torch


if __name__ == "__main__":
    main()
