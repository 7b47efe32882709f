"""python -m benchmarks.op_count [--scenario b2-class] [--impls paper-literal torch] [--plan cuda]

How many torch operators one loss-and-gradient step dispatches, counted on the CPU (no GPU needed),
and how many bytes they touch: each launching operator's outputs plus the distinct memory its inputs
cover (a broadcast input counts once, an in-place one twice; allocations touch nothing; sums of squares
as on accelerators).
Divided by a GPU's copy rate, that is a floor on the step's device time from memory traffic alone
(products re-read their tiles, caches catch some re-reads: an estimate).
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
from unittest import mock

from benchmarks import impls, scenarios

# Operators that only make views or aliases: no kernel launch on a GPU.
VIEW_OPS = ("view", "slice", "expand", "unsqueeze", "squeeze", "permute", "transpose", "select", "as_strided",
            "alias", "detach", "narrow", "aten.t.", "_reshape_alias", "_unsafe_view")


# docs/design.md §6: the H200's measured copy rate, bytes per second.
H200_COPY_RATE = 4.3e12


def touched_bytes(t) -> int:
    """Bytes of distinct memory a tensor (or view) covers: broadcast (stride-0) dimensions count once."""
    import torch

    if not isinstance(t, torch.Tensor):
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        n *= size if stride else 1
    return n * t.element_size()


def is_view(name: str) -> bool:
    return any(v in name for v in VIEW_OPS)


def count_ops(impl: str, scen: scenarios.Scenario) -> tuple[collections.Counter, collections.Counter]:
    """(operator name -> times dispatched, operator name -> bytes touched) in one warm step of ``impl``
    on the CPU; views touch no memory."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    counts: collections.Counter = collections.Counter()
    moved: collections.Counter = collections.Counter()

    class Counting(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            counts[name] += 1
            out = func(*args, **(kwargs or {}))
            if not is_view(name) and "empty" not in name:  # allocating touches nothing
                tensors = {id(t): t for t in tree_leaves((args, kwargs, out))}  # an out= result once
                moved[name] += sum(map(touched_bytes, tensors.values()))
                if func.__name__.split(".")[0].endswith("_"):  # in place: its first input read and written
                    moved[name] += touched_bytes(args[0])
            return out

    from driftloss.adapters import torch_fast

    runner, ctx = impls.make(impl, scen, "cpu")
    # sums of squares as on accelerators (one vector norm; the CPU keeps a * a for accuracy)
    with ctx, mock.patch.object(torch_fast, "one_pass_squares", lambda a: True):
        runner.sync(runner.step())  # warm-up
        with Counting():
            runner.sync(runner.step())
    return counts, moved


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
    print(f"| impl | operators per step | of which views | launching | GB touched | ms at "
          f"{H200_COPY_RATE / 1e12:g} TB/s |")
    print("|---|---|---|---|---|---|")
    tops = {}
    for impl in args.impls:
        # Planned as on CUDA (impls that say otherwise, e.g. torch-pergroup, win).
        with impls.accelerator_plan() if as_on_cuda else contextlib.nullcontext():
            counts, moved = count_ops(impl, scen)
        total = sum(counts.values())
        views = sum(c for name, c in counts.items() if is_view(name))
        gb = sum(moved.values()) / 1e9
        print(f"| {impl} | {total:,} | {views:,} | {total - views:,} | {gb:.1f} | "
              f"{gb * 1e9 / H200_COPY_RATE * 1e3:.1f} |", flush=True)
        tops[impl] = counts.most_common(args.top), moved.most_common(args.top)
    for impl, (top, heavy) in tops.items():
        print(f"\n{impl}: " + ", ".join(f"{name} {c}" for name, c in top))
        print(f"{impl}, GB touched: " + ", ".join(f"{name} {b / 1e9:.1f}" for name, b in heavy))


if __name__ == "__main__":
    main()
