"""python -m benchmarks.op_count [--scenario b2-class] [--impls paper-literal torch] [--plan cuda]

How many torch operators one loss-and-gradient step dispatches, counted on the CPU (no GPU needed).
On a GPU every operator that is not a view is (at least) one kernel launch, and eager PyTorch spends
host time on each: a step of many small operators is bound by the host, not the device. ``--plan
cuda`` runs the blocked path as on CUDA (few, large blocks; the groups of one shape share one
evaluation); ``--plan cpu`` as on the CPU (cache-sized blocks, one evaluation per group). Counts
depend on the widths through the block plan (the drift's [problems, T, rows, C] blocks are held to
the budget too): ``--width-scale 1`` gives the full-width count.
For reading, not for RESULTS.md ratios.
"""

from __future__ import annotations

import argparse
import collections
import contextlib

from benchmarks import impls, scenarios

# Operators that only make views or aliases: no kernel launch on a GPU.
VIEW_OPS = ("view", "slice", "expand", "unsqueeze", "squeeze", "permute", "transpose", "select", "as_strided",
            "alias", "detach", "narrow", "aten.t.", "_reshape_alias", "_unsafe_view")


def count_ops(impl: str, scen: scenarios.Scenario) -> collections.Counter:
    """Operator name -> times dispatched during one warm step of ``impl`` on the CPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: collections.Counter = collections.Counter()

    class Counting(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[str(func)] += 1
            return func(*args, **(kwargs or {}))

    runner, ctx = impls.make(impl, scen, "cpu")
    with ctx:
        runner.sync(runner.step())  # warm-up
        with Counting():
            runner.sync(runner.step())
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.op_count", description=__doc__.split("\n")[0])
    p.add_argument("--scenario", default="b2-class")
    p.add_argument("--impls", nargs="+", default=["paper-literal", "torch"])
    p.add_argument("--plan", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--width-scale", type=float, default=1.0, help="b2-class widths (1: full; about a minute)")
    p.add_argument("--top", type=int, default=8, help="also list the most frequent operators")
    args = p.parse_args(argv)

    as_on_cuda = args.plan == "cuda"
    scen = scenarios.build(args.scenario, args.width_scale)
    print(f"{args.scenario} ({len(scen.calls)} loss calls), block plan: {args.plan}")
    print("| impl | operators per step | of which views | launching |")
    print("|---|---|---|---|")
    tops = {}
    for impl in args.impls:
        # Planned as on CUDA (impls that say otherwise, e.g. torch-pergroup, win).
        with impls.accelerator_plan() if as_on_cuda else contextlib.nullcontext():
            counts = count_ops(impl, scen)
        total = sum(counts.values())
        views = sum(c for name, c in counts.items() if any(v in name for v in VIEW_OPS))
        print(f"| {impl} | {total:,} | {views:,} | {total - views:,} |")
        tops[impl] = counts.most_common(args.top)
    for impl, top in tops.items():
        print(f"\n{impl}: " + ", ".join(f"{name} {c}" for name, c in top))


if __name__ == "__main__":
    main()
