"""Timing, peak memory, errors and machine description for the benchmark table."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import tracemalloc

import numpy as np

from benchmarks import impls


def time_runner(runner: impls.Runner, repeats: int, warmup: int = 1) -> tuple[list[float], object]:
    """Wall times of ``repeats`` device-synchronized steps after ``warmup`` steps (compilation)."""
    out = None
    for _ in range(warmup):
        out = runner.step()
        runner.sync(out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = runner.step()
        runner.sync(out)
        times.append(time.perf_counter() - t0)
    return times, out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def relative_errors(result: tuple[float, list[np.ndarray]], ref: tuple[float, list[np.ndarray]]):
    """(|loss - ref| / |ref|, ||grad - ref|| / ||ref|| over all calls' gradients)."""
    loss, grads = result
    loss_ref, grads_ref = ref
    g = np.concatenate([a.ravel() for a in grads])
    g_ref = np.concatenate([a.ravel() for a in grads_ref])
    return abs(loss - loss_ref) / abs(loss_ref), float(np.linalg.norm(g - g_ref) / np.linalg.norm(g_ref))


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1))


def keep_freed_memory() -> None:
    """Have glibc keep freed memory for reuse in this process: large blocks from the heap, not fresh
    mmaps (M_MMAP_THRESHOLD 256 MiB), and no trimming below 1 GiB (M_TRIM_THRESHOLD), as
    MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ or a caching allocator (jemalloc, tcmalloc) do.
    With glibc's defaults a large temporary is a fresh mapping, page-faulted on every op."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError) as e:
        raise SystemExit(f"--keep-freed-memory needs glibc (libc.so.6 with mallopt): {e}") from e
    m_trim_threshold, m_mmap_threshold = -1, -3  # from malloc.h
    if not (mallopt(m_mmap_threshold, 256 << 20) and mallopt(m_trim_threshold, 1 << 30)):
        raise SystemExit("--keep-freed-memory: mallopt refused the thresholds")


def probe_peak_memory(runner: impls.Runner, device: str, impl: str) -> dict:
    """Peak memory of one warm step in this (fresh) process, in bytes.

    CUDA: torch.cuda.max_memory_allocated above what was allocated before the step (torch impls);
    JAX on GPU: the device's peak_bytes_in_use, process-wide so far (includes the inputs).
    A runner that sets its memory aside at setup (a CUDA graph's pool) reports that instead.
    CPU: peak resident set growth during the step (VmHWM reset through /proc/self/clear_refs, minus
    VmRSS before), in a process started with glibc's mmap threshold pinned at 128 KiB so that freed
    buffers leave the resident set; NumPy also gets tracemalloc's peak as a cross-check of that method.
    JAX on the CPU: XLA's plan of the compiled step (its temporaries and outputs), with the resident set
    growth beside it ("rss_peak"). XLA maps a step's temporaries afresh and may unmap the previous
    step's only after the step has returned, so the resident set at the start of a step can still hold
    them and its growth understate the step (b2-class at width 0.025: 11 MiB against a plan of 527 MiB
    of temporaries, all of them page-faulted in every step).
    """
    if runner.peak_bytes is not None:
        return {"peak": runner.peak_bytes}
    out = runner.step()  # warm-up: compilation, lazy initialisation
    runner.sync(out)
    del out
    res: dict = {}
    if device == "cpu" and runner.xla_plan is not None:
        temp, outputs = runner.xla_plan(None)
        return {"peak": temp + outputs, "rss_peak": _resident_growth(runner)}
    if device == "cuda" and not impl.startswith("jax"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        runner.sync(runner.step())
        res["peak"] = torch.cuda.max_memory_allocated() - base
        return res
    if device == "cuda":
        import jax

        runner.sync(runner.step())
        res["peak"] = jax.devices()[0].memory_stats()["peak_bytes_in_use"]
        return res
    if impl in ("numpy", "reference", "reference-blocked"):
        tracemalloc.start()
    res["peak"] = _resident_growth(runner)
    if tracemalloc.is_tracing():
        res["tracemalloc_peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return res


def _resident_growth(runner: impls.Runner) -> int:
    """Peak resident set growth during one step, in bytes (VmHWM reset through /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    runner.sync(runner.step())
    return (_status_kib("VmHWM") - base) * 1024


def peak_memory_subprocess(scenario: str, impl: str, device: str, width_scale: float,
                           extra: list[str] = ()) -> dict:
    """Run ``probe_peak_memory`` in a fresh interpreter (clean allocator state, clean peak); ``extra``:
    more benchmarks.run arguments for it."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    cmd = [sys.executable, "-m", "benchmarks.run", "--probe-memory", "--scenarios", scenario, "--impls", impl,
           "--device", device, "--width-scale", str(width_scale), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)
    return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]}


def machine(device: str) -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"model name\s*:\s*(.*)", f.read())
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    info["cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    versions = {"numpy": np.__version__}
    for mod in ("torch", "jax", "driftloss"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = "not installed"
    info["versions"] = versions
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
    else:
        try:
            gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            gpu = ""
        info["gpu"] = gpu or "none"
    return info
