"""python -m benchmarks.memory_timeline [--scenario b2-class] [--impl torch] [--torch-plan accelerator]

Where in the code one warm step reaches its peak memory on the CPU: a thread samples the resident set
(VmRSS) every 2 ms together with the line the step is running (innermost driftloss / adapters /
benchmarks frames), and the lines are listed by the highest resident set seen while they ran, above the
resident set before the step. Run it with glibc returning freed memory at once, as the peak probe of
benchmarks.run does:

    MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072 python -m benchmarks.memory_timeline

For reading (what holds the peak), not for RESULTS.md figures.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import threading
import time

from benchmarks import impls, scenarios

SOURCES = ("driftloss", "adapters", "benchmarks")


def _rss() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) * 1024


def _running_line(thread_id: int, depth: int) -> str:
    """The innermost ``depth`` frames of the thread in our sources, as file:line < caller ..."""
    frame, lines = sys._current_frames().get(thread_id), []
    while frame is not None and len(lines) < depth:
        name = frame.f_code.co_filename
        if any(f"{os.sep}{s}{os.sep}" in name for s in SOURCES):
            lines.append(f"{os.path.basename(name)}:{frame.f_lineno}")
        frame = frame.f_back
    return " < ".join(lines)


def timeline(runner: impls.Runner, interval: float = 0.002,
             depth: int = 4) -> tuple[int, list[tuple[int, str]]]:
    """(resident set before the step, [(resident set, running line)] sampled during one step)."""
    out = runner.step()  # warm-up
    runner.sync(out)
    del out
    main_thread, samples, done = threading.get_ident(), [], threading.Event()

    def sample():
        while not done.is_set():
            samples.append((_rss(), _running_line(main_thread, depth)))
            time.sleep(interval)

    base = _rss()
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        runner.sync(runner.step())
    finally:
        done.set()
        sampler.join()
    return base, samples


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory_timeline",
                                description=__doc__.split("\n")[0])
    p.add_argument("--scenario", default="b2-class")
    p.add_argument("--impl", default="torch")
    p.add_argument("--width-scale", type=float, default=1.0)
    p.add_argument("--torch-plan", choices=("device", "accelerator"), default="accelerator")
    p.add_argument("--rows", type=int, default=15)
    args = p.parse_args(argv)

    runner, ctx = impls.make(args.impl, scenarios.build(args.scenario, args.width_scale), "cpu")
    plan = impls.accelerator_plan() if args.torch_plan == "accelerator" else contextlib.nullcontext()
    with plan, ctx:
        base, samples = timeline(runner)
    highest: dict[str, int] = {}
    for rss, line in samples:
        highest[line] = max(rss, highest.get(line, 0))
    peak = max(rss for rss, _ in samples)
    print(f"{args.scenario} / {args.impl} ({args.torch_plan} plan): {len(samples)} samples, "
          f"peak {(peak - base) / 2**30:.2f} GiB above the {base / 2**30:.2f} GiB before the step")
    for line, rss in sorted(highest.items(), key=lambda kv: -kv[1])[:args.rows]:
        print(f"{(rss - base) / 2**30:6.2f} GiB  {line}")


if __name__ == "__main__":
    main()
