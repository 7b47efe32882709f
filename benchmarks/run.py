"""python -m benchmarks.run [--scenarios ...] [--impls ...] [--device cpu|cuda] [--repeats K]

Times one loss-and-gradient evaluation per implementation and scenario (median of K after a
warm-up, device-synchronized), measures peak memory in a fresh process, compares loss and gradient
with a float64 reference, prints a Markdown table and appends it to benchmarks/RESULTS_LOG.md with the
machine, library versions, date and the exact command.

GPU (one call meant to fit in 5 minutes; every scenario at full width, the table printed last;
the NumPy implementation is left out there because it runs on the host CPU):
    python -m benchmarks.run --device cuda --impls paper-literal torch torch-core jax --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import sys
import time

from benchmarks import impls, measure, scenarios

BASELINE = "paper-literal"
CORE_LIKE = ("paper-literal", "numpy-core", "torch-core", "jax-core")  # hold several [problems, N, J] arrays
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS_LOG.md")


def estimated_peak_bytes(impl: str, scen: scenarios.Scenario) -> float:
    """Rough peak of the kernel temporaries, to skip runs that cannot fit (not a measurement)."""
    entries = scen.kernel_entries()
    if impl in CORE_LIKE:
        return 12 * 4 * entries
    if impl in ("reference", "reference-cuda"):
        return 12 * 8 * entries
    return 0.0  # blocked: bounded by the block size


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--scenarios", nargs="+", default=["b2-class", "toy-large", "cifar-like"])
    p.add_argument("--impls", nargs="+", default=list(impls.IMPLS))
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--width-scale", type=float, default=None,
                   help="multiply the b2-class widths C (default 1 on cuda, 0.025 on cpu: C = 16..128)")
    p.add_argument("--memory-limit-gb", type=float, default=None,
                   help="skip runs estimated above this (default 4 on cpu, 70 on cuda)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS_LOG.md")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no new row after this many seconds of the run (data generation and references "
                        "included); later rows are listed as skipped, and the table still prints")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="CPU timings with glibc keeping freed memory for reuse (as jemalloc/tcmalloc or "
                        "MALLOC_MMAP_THRESHOLD_ would): large temporaries are not page-faulted afresh")
    p.add_argument("--plan", "--torch-plan", dest="plan", choices=("device", "accelerator"), default="device",
                   help="accelerator: torch's and JAX's blocked paths planned as on a GPU whatever the "
                        "device (their memory measured on the CPU; benchmarks.xla_plan gives JAX's plan "
                        "without running it); device: as the device plans it")
    p.add_argument("--probe-memory", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.width_scale is None:
        args.width_scale = 1.0 if args.device == "cuda" else 0.025
    if args.memory_limit_gb is None:
        args.memory_limit_gb = 70.0 if args.device == "cuda" else 4.0
    names = []
    for s in args.scenarios:
        names += list(scenarios.ALIASES.get(s, (s,)))
    args.scenarios = names
    return args


def _fmt_bytes(b):
    return "—" if b is None else f"{b / 2**20:,.0f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def run_one(impl, scen, args, ref):
    row = {"scenario": scen.name, "impl": impl}
    need = estimated_peak_bytes(impl, scen)
    if need > args.memory_limit_gb * 2**30:
        row["skipped"] = f"needs ~{need / 2**30:.0f} GiB > {args.memory_limit_gb:g} GiB limit"
        return row
    runner, ctx = impls.make(impl, scen, args.device)
    with ctx:
        times, out = measure.time_runner(runner, args.repeats)
        result = runner.to_numpy(out)
    row["times"] = times
    row["median"] = measure.median(times)
    row["tflops"] = scen.useful_flop() / row["median"] / 1e12
    if ref is not None:
        row["err_loss"], row["err_grad"] = measure.relative_errors(result, ref)
    if not args.no_memory and args.device == "cuda":  # device allocator statistics: no fresh process needed
        with impls.context(impl):
            mem = measure.probe_peak_memory(runner, args.device, impl)
        row["peak"] = mem.get("peak")
        row["grad_bytes"] = 4 * sum(c.x.size for c in scen.calls)  # float32 x.grad, held by every impl
    elif not args.no_memory:
        del runner, out, result  # the fresh process needs the memory (full-width b2-class: ~10 GB each)
        _free_device_memory(args.device)
        mem = measure.peak_memory_subprocess(scen.name, impl, args.device, args.width_scale,
                                             ["--plan", args.plan])
        row["peak"] = mem.get("peak")
        row["tracemalloc_peak"] = mem.get("tracemalloc_peak")
        row["rss_peak"] = mem.get("rss_peak")
        if "error" in mem:
            row["memory_error"] = mem["error"]
    return row


def table(rows):
    head = ("| scenario | impl | median s (min–max) | vs paper-literal | useful TFLOP/s | peak memory "
            "| rel. err loss | rel. err grad |\n|---|---|---|---|---|---|---|---|")
    base = {r["scenario"]: r["median"] for r in rows if r["impl"] == BASELINE and "median" in r}
    lines = [head]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['scenario']} | {r['impl']} | skipped: {r['skipped']} | | | | | |")
            continue
        t = r["times"]
        speed = f"{base[r['scenario']] / r['median']:.2f}×" if r["scenario"] in base else "—"
        mem = _fmt_bytes(r.get("peak"))
        if r.get("peak") is not None and r.get("grad_bytes"):
            mem += f" ({_fmt_bytes(max(0, r['peak'] - r['grad_bytes']))} besides the gradient)"
        if r.get("tracemalloc_peak"):
            mem += f" (tracemalloc {_fmt_bytes(r['tracemalloc_peak'])})"
        if r.get("rss_peak") is not None:
            mem += f" (XLA plan; resident set growth {_fmt_bytes(r['rss_peak'])})"
        err = (f"{r['err_loss']:.1e} | {r['err_grad']:.1e}" if "err_loss" in r else "— | —")
        timing = f"{r['median']:.4f} ({min(t):.4f}–{max(t):.4f})"
        lines.append(f"| {r['scenario']} | {r['impl']} | {timing} | {speed} | {r['tflops']:.4f} | {mem} "
                     f"| {err} |")
    return "\n".join(lines)


def header(args, info, scens):
    cmd = "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    v = info["versions"]
    lines = [
        f"## {datetime.datetime.now().astimezone().isoformat(timespec='seconds')} — {args.device}",
        "",
        f"- command: `{cmd}`",
        f"- machine: {info['cpu']}, {info['cores']} cores available, GPU: {info['gpu']}; "
        f"1-min load average at start {info.get('load_avg_1m', '?')}",
        f"- versions: python {info['python']}, numpy {v['numpy']}, torch {v['torch']}, jax {v['jax']}, "
        f"driftloss {v['driftloss']}",
        f"- repeats: median of {args.repeats} after one warm-up; b2-class width scale {args.width_scale:g}",
        "- plan: " + ("as on a GPU (--plan accelerator: torch's blocks of CUDA_BLOCK_ELEMENTS, JAX's of "
                      "ACCELERATOR_BLOCK_ELEMENTS, the groups of one shape in one evaluation)"
                      if args.plan == "accelerator" else "the device's"),
        "- allocator: " + ("glibc keeping freed memory (mallopt: mmap threshold 256 MiB, trim threshold "
                           "1 GiB)" if args.keep_freed_memory else "glibc defaults"),
        "- useful FLOP = sum over problems of 2·N·J·C·(1 + T), J = N + M + P, T = 3 (distance product + "
        "one drift product per τ; = 8·N·J·C): " + ", ".join(f"{s.name} {s.useful_flop() / 1e9:.1f} GFLOP "
                                                            f"({s.problems()} problems)" for s in scens),
        "- peak memory: CPU = growth of the resident set during one warm step in a fresh process "
        "(glibc mmap threshold pinned at 128 KiB, VmHWM reset via /proc/self/clear_refs), JAX: XLA's plan of "
        "the compiled step (temporaries + outputs), whose temporaries are mapped afresh each step; "
        "CUDA = torch.cuda.max_memory_allocated above the inputs during one step, which includes the "
        "float32 gradient of x (shown apart) / JAX peak_bytes_in_use (process-wide, inputs included)",
        "- errors: relative to the core in float64 on " + ("torch CUDA" if args.device == "cuda" else "NumPy")
        + " (toy-large: the blocked fast drift in float64 there)",
    ]
    return "\n".join(lines)


def _free_device_memory(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def main(argv=None):
    args = parse(argv)
    started = time.monotonic()
    with impls.accelerator_plan() if args.plan == "accelerator" else contextlib.nullcontext():
        _run(args, started)


def _run(args, started):
    if args.probe_memory:
        scen = scenarios.build(args.scenarios[0], args.width_scale)
        runner, ctx = impls.make(args.impls[0], scen, args.device)
        with ctx:
            print(json.dumps(measure.probe_peak_memory(runner, args.device, args.impls[0])))
        return
    if args.keep_freed_memory:
        measure.keep_freed_memory()
    info = measure.machine(args.device)
    rows, scens = [], []

    def over_budget(scenario: str, impl: str) -> bool:
        """True (and a skipped row) once the run has spent its --time-budget."""
        spent = time.monotonic() - started
        if args.time_budget is None or spent <= args.time_budget:
            return False
        rows.append({"scenario": scenario, "impl": impl,
                     "skipped": f"time budget of {args.time_budget:g} s spent ({spent:.0f} s)"})
        return True

    for name in args.scenarios:
        if over_budget(name, args.impls[0]):  # not even the scenario's data and reference
            rows += [dict(rows[-1], impl=impl) for impl in args.impls[1:]]
            continue
        scen = scenarios.build(name, args.width_scale)
        scens.append(scen)
        fits = estimated_peak_bytes("reference", scen) <= args.memory_limit_gb * 2**30
        if args.device == "cuda":  # float64 on the GPU: the host's NumPy would take minutes
            ref_impl = "reference-cuda" if fits else "reference-cuda-blocked"
        else:
            ref_impl = "reference" if fits else "reference-blocked"
        ref_runner, ref_ctx = impls.make(ref_impl, scen, args.device)
        with ref_ctx:
            ref = ref_runner.to_numpy(ref_runner.step())
        del ref_runner
        print(json.dumps({"scenario": scen.name, "reference": ref_impl}), file=sys.stderr, flush=True)
        for impl in args.impls:
            if over_budget(scen.name, impl):
                continue
            try:
                row = run_one(impl, scen, args, ref)
            except Exception as e:  # one failing implementation must not cost the others' figures
                why = f"failed: {type(e).__name__}: {e}"[:300]
                row = {"scenario": scen.name, "impl": impl, "skipped": why}
                _free_device_memory(args.device)
            _free_device_memory(args.device)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "times"}), file=sys.stderr, flush=True)
    text = header(args, info, scens) + "\n\n" + table(rows) + "\n"
    if not args.no_append:
        new = not os.path.exists(RESULTS)
        with open(RESULTS, "a") as f:
            if new:
                f.write("# Benchmark log\n\nAppended by `python -m benchmarks.run`.\n\n")
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
