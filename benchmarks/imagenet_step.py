"""python -m benchmarks.imagenet_step [--presets ...] [--device cpu|cuda] [--steps 3] [--classes K]
                                    [--dry-run] [--write]

Times the ImageNet trainers' training step (reference_trainers/imagenet) on one device and turns it into the
device-hours of each Table 8 row. Per preset, in a fresh process (clean allocator, clean peak, a timeout):
the generator (fp32 parameters), the frozen feature encoders with RANDOM weights (the MAE ResNet; +
ConvNeXt-V2 for pixel presets), FeatureObjective, AdamW and the EMAs are built as train.py builds them;
synthetic positives / unconditional samples of the preset's shapes sit on the host (pinned on CUDA) and are
copied to the device each step; each step is train.train_step: train.draw_inputs, train.drifting_step
(timed by train.StepTimer), check_finite, the learning rate, backward, gradient clipping, AdamW, the EMA
updates. One warm-up step, then the median of --steps. A step takes K classes (--classes; default the
per-GPU share at 8 GPUs, n_classes / 8, for the Table 8 presets, and n_classes for the tiny ones); where K
classes do not fit (CUDA out of memory) the step is retried with K/2, down to 1 class.

Reported: generated images per second on this device (K * N_neg per step), seconds per step, its split
(data / generator / encoder / loss / backward / optimizer, StepTimer's parts), peak memory (CUDA:
torch.cuda.max_memory_allocated over the run, weights and optimizer state included; CPU: growth of the
resident set during one warm step in a fresh process, as benchmarks/measure.py), and the device-hours of the
preset's whole run (steps * N_c * N_neg / img/s) with the wall-clock hours on 8-64 devices under an ASSUMED
linear scaling.

--dry-run (CPU, seconds, nothing timed): shapes and FLOP counts per step from meta-device models, and the
GPU-hour table from an assumed sustained rate, labelled ESTIMATE.

GPU (one call, <= 5 minutes on one H100/H200): bash benchmarks/imagenet_gpu.sh, i.e.
    python -m benchmarks.imagenet_step --device cuda --presets ablation latent-b2 latent-l2 pixel-b16 \\
        pixel-l16 --steps 3 --time-budget 270 --write
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
import warnings

import torch
from torch import nn

from benchmarks import measure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "RESULTS_LOG.md")
HEADING = "ImageNet training step"
PARTS = ("data", "generator", "encoder", "loss", "backward", "optimizer")
DEVICES_PER_RUN = 8                  # the default K is the per-device share of a run on this many devices
SCALING = (8, 16, 32, 64)            # wall-clock hours shown for these device counts (linear scaling)
MEASURED_COLUMNS = 7 + len(PARTS) + len(SCALING)
# --dry-run's assumed rates (stated in its output):
H100_BF16_DENSE = 989e12             # FLOP/s, H100 SXM (H200: the same compute)
NETWORK_UTILIZATION = 0.40           # of that, sustained by the generator and the encoders under bf16
LOSS_RATE = 3.42e12                  # useful FLOP/s of torch's drifting_loss_groups on b2-class, H200
                                     # (RESULTS_LOG.md, 2026-11-26, run 3: torch-blocked 144 ms, 493.5 GFLOP)


def is_tiny(name: str) -> bool:
    return name.endswith("-tiny")


def default_classes(preset) -> int:
    """Classes per step on one device: the per-GPU share at 8 GPUs (Table 8 presets), all of them (tiny)."""
    return preset.n_classes if is_tiny(preset.name) else max(1, preset.n_classes // DEVICES_PER_RUN)


def default_presets(dry_run: bool, device: str) -> list[str]:
    from reference_trainers.imagenet.presets import SYSTEM_PRESETS

    if dry_run or device == "cuda":
        return ["ablation", *SYSTEM_PRESETS]
    return ["latent-tiny", "pixel-tiny"]


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.imagenet_step", description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=None,
                   help="default: ablation + the Table 8 presets (cuda, --dry-run), the tiny ones (cpu)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up (median reported)")
    p.add_argument("--classes", type=int, default=None, metavar="K",
                   help="classes per step on this device (default: n_classes / 8; tiny presets: n_classes)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="as train.py: auto = bf16 autocast on CUDA, fp32 on the CPU")
    p.add_argument("--dry-run", action="store_true", help="shapes, FLOP counts and an ESTIMATED GPU-hour "
                                                          "table (CPU, meta device, nothing timed)")
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS_LOG.md")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="whole run: each preset's process gets the time left divided by the presets left")
    p.add_argument("--preset-timeout", type=float, default=900.0, metavar="SECONDS",
                   help="hard limit of one preset's process (default 900)")
    p.add_argument("--no-memory", action="store_true", help="CPU: skip the resident-set probe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)           # measure one preset, JSON lines
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # seconds, child only
    p.add_argument("--probe-memory", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.presets is None:
        args.presets = default_presets(args.dry_run, args.device)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.classes is not None and args.classes < 1:
        p.error("--classes must be >= 1")
    return args


# ------------------------------------------------------------------------------------------------------------
# FLOP counts (--dry-run)
# ------------------------------------------------------------------------------------------------------------

def generator_flops(preset) -> dict:
    """Forward FLOP per sample of the generator, from its layers' shapes (a meta-device model).

    Every nn.Linear counts 2 * rows * in * out for the rows it is applied to (recorded by forward hooks on
    one meta sample: the blocks' qkv / proj / SwiGLU on the R + T tokens, the patch embedding and the output
    layer on the T patch tokens, the adaLN, condition and context layers once per sample); attention adds
    QK^T and AV, 4 * n^2 * D per block (n = R + T). Embedding lookups and norms count 0.
    "naive" is 2 * parameters * n + attention, the usual transformer rule, which counts adaLN-zero's
    6 D^2 per block (a third of the parameters) once per token instead of once per sample.
    """
    from reference_trainers.imagenet.generator import build_generator, count_parameters

    model = build_generator(preset, "meta")
    n = preset.tokens + preset.register_tokens
    linear = [0]

    def hook(module, inputs, output):
        x = inputs[0]
        linear[0] += 2 * (x.numel() // module.in_features) * module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            model(torch.empty(1, preset.channels, preset.size, preset.size, device="meta"),
                  torch.zeros(1, dtype=torch.long, device="meta"), torch.ones(1, device="meta"),
                  torch.zeros(1, preset.style_tokens, dtype=torch.long, device="meta"))
    finally:
        for h in handles:
            h.remove()
    attention = 4 * n * n * preset.hidden * preset.depth
    params = count_parameters(model)
    return {"forward": linear[0] + attention, "linear": linear[0], "attention": attention, "params": params,
            "tokens": n, "patch_tokens": preset.tokens, "naive": 2 * params * n + attention}


_ENCODER_CACHE: dict[tuple, dict] = {}


def encoder_plan(preset) -> dict:
    """Tapped maps, feature groups and FLOP per sample of the preset's feature encoders (meta device).

    FLOP: torch.utils.flop_counter over one meta sample (convolutions, matrix products): "forward" through
    FeatureObjective.groups, "backward" of a sum of every group, which is what the generated samples' pass
    costs on top of its forward. The encoders are frozen, so their backward makes input gradients only,
    about 1x the forward (not the 2x of a trained network).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from reference_trainers.imagenet.convnext import ConvNeXtFeatures
    from reference_trainers.imagenet.encoder import build_encoder, parameter_count
    from reference_trainers.imagenet.objective import FeatureObjective

    key = (preset.space, preset.channels, preset.size, preset.encoder_width, preset.encoder_blocks,
           preset.encoder_block, preset.encoder_patch, preset.convnext)
    if key in _ENCODER_CACHE:
        return _ENCODER_CACHE[key]
    encoders = {"resnet": build_encoder(preset, "meta")}
    if preset.convnext:
        with torch.device("meta"):
            encoders["convnext"] = ConvNeXtFeatures(preset.convnext)
    objective = FeatureObjective(encoders, preset.taus)
    x = torch.empty(1, 1, preset.channels, preset.size, preset.size, device="meta", requires_grad=True)
    maps = {}
    with torch.no_grad():
        for name, taps in objective.taps.items():
            maps.update({f"{name}.{k}": tuple(v.shape[1:]) for k, v in taps(x[0]).items()})
    with FlopCounterMode(display=False) as counter:
        groups = objective.groups(x)
        forward = counter.get_total_flops()
        sum(g.sum() for g in groups.values()).backward()
        backward = counter.get_total_flops() - forward
    plan = {"maps": maps, "groups": {k: tuple(v.shape[-2:]) for k, v in groups.items()},
            "forward": forward, "backward": backward,
            "params": {k: parameter_count(v) for k, v in encoders.items()}}
    _ENCODER_CACHE[key] = plan
    return plan


def loss_flops(groups: dict[str, tuple[int, int]], classes: int, n: int, m: int, p: int, taus: int) -> int:
    """Useful FLOP of the drifting loss for ``classes`` class problems, as benchmarks.run counts it:
    per group 2 * G * L * N * J * C * (1 + T) with J = N + M + P (x are negatives too): the distance product
    and one drift product per temperature. The gradient is -2V/(s * size): no matrix work in the backward.
    The blocked path recomputes distances in its passes; the assumed rate (LOSS_RATE, measured) covers it."""
    j = n + m + p
    return sum(2 * classes * L * n * j * C * (1 + taus) for L, C in groups.values())


def estimate(preset, classes: int) -> dict:
    """FLOP per device step at ``classes`` classes, and the hours of the preset's run at the assumed rates."""
    gen, enc = generator_flops(preset), encoder_plan(preset)
    k, n, p, m = classes, preset.n_neg, preset.n_pos, preset.n_unc
    f_gen = 3 * gen["forward"] * k * n                                  # forward + backward (2x: weights)
    f_enc = enc["forward"] * k * (n + p + m) + enc["backward"] * k * n  # real samples: forward only
    f_loss = loss_flops(enc["groups"], k, n, m, p, len(preset.taus))
    rate = NETWORK_UTILIZATION * H100_BF16_DENSE
    seconds = (f_gen + f_enc) / rate + f_loss / LOSS_RATE
    img_s = k * n / seconds
    device_hours = preset.steps * preset.batch_size / img_s / 3600
    # objective.groups keeps every group in float32: the real samples' (no grad), the generated samples' and
    # their gradient, all alive at once around the loss
    group_bytes = 4 * sum(L * C for L, C in enc["groups"].values()) * k * (2 * n + p + m)
    return {"preset": preset.name, "classes": k, "gen": gen, "enc": enc, "f_gen": f_gen, "f_enc": f_enc,
            "f_loss": f_loss, "seconds": seconds, "img_s": img_s, "device_hours": device_hours,
            "group_bytes": group_bytes}


def _shape_lines(preset, est: dict, same_as: str | None) -> list[str]:
    gen, enc, k = est["gen"], est["enc"], est["classes"]
    lines = [f"- {preset.name}: generator {gen['params'] / 1e6:.1f} M parameters, "
             f"{gen['patch_tokens']} patch + {preset.register_tokens} register tokens of width "
             f"{preset.hidden}, depth {preset.depth}; forward {gen['forward'] / 1e9:.2f} GFLOP/sample "
             f"(linear layers {gen['linear'] / 1e9:.2f} + attention "
             f"{gen['attention'] / 1e9:.2f}; the rule 2·params·tokens + attention would give "
             f"{gen['naive'] / 1e9:.2f}); encoders "
             + ", ".join(f"{name} {c / 1e6:.1f} M" for name, c in enc["params"].items())
             + f" parameters, forward {enc['forward'] / 1e9:.1f} GFLOP/sample, input-gradient backward "
             f"{enc['backward'] / 1e9:.1f}"]
    if same_as:
        lines.append(f"  - tapped maps and feature groups: as {same_as}")
        return lines
    groups = enc["groups"]
    total = sum(L * C for L, C in groups.values())
    lines.append(f"  - {len(groups)} feature groups [G, n, L, C] (G = {k} classes per device, n = N "
                 f"{preset.n_neg} / P {preset.n_pos} / M {preset.n_unc}), ΣL·C = {total / 1e6:.2f} M per "
                 "sample:")
    for tap, shape in enc["maps"].items():
        mine = {name[len(tap) + 1:]: v for name, v in groups.items() if name.startswith(tap + ".")}
        parts = ", ".join(f"{'/'.join(sorted(names))} [{k}, n, {L}, {C}]"
                          for (L, C), names in _by_shape(mine).items())
        lines.append(f"    - {tap} {list(shape)}: {parts}")
    for name in ("input", "global"):
        if name in groups:
            L, C = groups[name]
            lines.append(f"    - {name}: [{k}, n, {L}, {C}]")
    return lines


def _by_shape(groups: dict[str, tuple[int, int]]) -> dict[tuple[int, int], list[str]]:
    out: dict[tuple[int, int], list[str]] = {}
    for name, shape in groups.items():
        out.setdefault(shape, []).append(name)
    return dict(sorted(out.items(), key=lambda kv: -kv[0][0]))


def dry_run_rows(names: list[str], classes: int | None = None) -> list[dict]:
    from reference_trainers.imagenet.presets import get_preset

    rows = []
    for name in names:
        preset = get_preset(name)
        rows.append(estimate(preset, classes or default_classes(preset)))
    return rows


def dry_run_table(rows: list[dict]) -> str:
    from reference_trainers.imagenet.presets import get_preset

    head = ("| preset | classes / device (share) | generator TFLOP | encoders TFLOP | loss TFLOP (useful) "
            "| feature groups GiB | est. s / step | est. img/s / device | steps × batch | device-hours | "
            + " | ".join(f"wall h @ {d}" for d in SCALING) + " |\n|" + "---|" * (10 + len(SCALING)))
    lines = [head]
    for r in rows:
        p = get_preset(r["preset"])
        lines.append(
            f"| {r['preset']} | {r['classes']} of {p.n_classes} ({r['classes'] / p.n_classes:.3g}) "
            f"| {r['f_gen'] / 1e12:.1f} | {r['f_enc'] / 1e12:.1f} | {r['f_loss'] / 1e12:.1f} "
            f"| {r['group_bytes'] / 2**30:.0f} | {r['seconds']:.2f} | {r['img_s']:,.0f} "
            f"| {p.steps:,} × {p.batch_size:,} "
            f"| {_hours(r['device_hours'])} | "
            + " | ".join(_hours(r["device_hours"] / d) for d in SCALING) + " |")
    return "\n".join(lines)


def dry_run(args) -> tuple[list[dict], str]:
    from reference_trainers.imagenet.presets import get_preset

    rows = dry_run_rows(args.presets, args.classes)
    seen: dict[tuple, str] = {}
    shapes = []
    for r in rows:
        preset = get_preset(r["preset"])
        key = (preset.space, preset.size, preset.encoder_width, preset.encoder_blocks, preset.encoder_block,
               preset.convnext, r["classes"])
        shapes += _shape_lines(preset, r, seen.get(key))
        seen.setdefault(key, preset.name)
    rate = NETWORK_UTILIZATION * H100_BF16_DENSE
    text = "\n".join([
        f"## {HEADING} — ESTIMATE (FLOP-based), not measured — {_now()}",
        "",
        f"- command: `{_command(args)}`",
        f"- ESTIMATE (FLOP-based), not measured: networks (generator, encoders; bf16) at an assumed "
        f"{NETWORK_UTILIZATION:.0%} of the H100's {H100_BF16_DENSE / 1e12:.0f} TFLOP/s bf16 dense = "
        f"{rate / 1e12:.0f} TFLOP/s sustained; the drifting loss (float32) at {LOSS_RATE / 1e12:.2f} TFLOP/s "
        "useful, the rate measured for torch's drifting_loss_groups on b2-class on an H200 (2026-11-26 "
        "above, torch-blocked); data loading, the optimizer, EMAs and communication not counted",
        "- FLOP per device step at K classes (N = N_neg generated, P = N_pos, M = N_unc per class): "
        "generator 3 × forward × K·N (backward 2× forward); encoders forward × K·(N + P + M) + "
        "input-gradient backward × K·N (frozen: ≈ 1× forward, counted by torch.utils.flop_counter on "
        "meta-device models); loss Σ_groups 2·K·L·N·J·C·(1 + T), J = N + M + P, T = 3 temperatures "
        "(benchmarks.run's useful FLOP)",
        "- device-hours = steps × N_c·N_neg ÷ (est. img/s per device); wall h @ D devices = device-hours / "
        "D ASSUMING linear scaling (per-device batch n_classes / D; all-reduce and smaller batches not "
        "counted)",
        "- feature groups GiB: the float32 groups objective.groups makes, alive together at the loss: "
        "ΣL·C × K·(2N + P + M) × 4 bytes (real samples', generated samples' and their gradient); encoder "
        "activations, weights and optimizer state come on top",
        "- shapes:",
        *shapes,
        "",
        dry_run_table(rows),
    ])
    return rows, text


# ------------------------------------------------------------------------------------------------------------
# the timed step (one preset per process)
# ------------------------------------------------------------------------------------------------------------

def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


class _Setup:
    """The networks, optimizer and synthetic host batches of one preset, built as train.train builds them."""

    def __init__(self, preset, device: torch.device, classes: int, seed: int):
        import copy

        from reference_trainers.imagenet.generator import Generator
        from reference_trainers.imagenet.networks import load_feature_encoders
        from reference_trainers.imagenet.objective import FeatureObjective

        torch.manual_seed(seed)
        self.preset, self.device = preset, device
        self.model = Generator(preset).to(device)
        self.emas = [copy.deepcopy(self.model).requires_grad_(False).eval() for _ in preset.ema_decays]
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=preset.lr, betas=tuple(preset.betas),
                                     weight_decay=preset.weight_decay)
        with warnings.catch_warnings():  # "RANDOM encoder" warnings: random weights are the point here
            warnings.simplefilter("ignore")
            encoders = load_feature_encoders(preset, "", "", device)
        self.objective = FeatureObjective(encoders, preset.taus)
        shape = (preset.channels, preset.size, preset.size)
        pin = device.type == "cuda"
        g = torch.Generator().manual_seed(seed)

        def host(n):
            t = torch.empty(classes, n, *shape, pin_memory=pin)
            return t.uniform_(-1, 1, generator=g) if preset.space == "pixel" else t.normal_(generator=g)

        self.pos, self.uncond = host(preset.n_pos), host(preset.n_unc)


def train_step(s: _Setup, classes: torch.Tensor, step: int, autocast: bool, seed: int, timer) -> dict:
    """One train.train_step on K = len(classes) classes (host batches copied in); StepTimer's parts (s)."""
    from reference_trainers.imagenet.sampling import step_generator
    from reference_trainers.imagenet.train import train_step as one_step

    k = classes.shape[0]
    timer.start()
    pos, uncond = (t[:k].to(s.device, non_blocking=True) for t in (s.pos, s.uncond))
    timer.mark("data")
    gen = step_generator(s.device, seed, 0, step)
    one_step(s.model, s.model, s.emas, s.opt, s.objective, s.preset, step, classes, pos, uncond, gen,
             autocast, timer)
    return dict(timer.parts)


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in text or "ALLOC_FAILED" in text)


def _classes(preset, k: int, device: torch.device) -> torch.Tensor:
    return torch.arange(k, device=device) * max(1, preset.num_classes // k)


def child(args) -> None:
    """Measure one preset; JSON lines on stdout (events, one per step, then the result)."""
    from reference_trainers.imagenet.presets import get_preset
    from reference_trainers.imagenet.train import StepTimer, use_bf16

    started = time.monotonic()
    deadline = args.deadline or math.inf
    preset = get_preset(args.child)
    device = torch.device(args.device)
    autocast = use_bf16(args.precision, device)
    k = args.classes or default_classes(preset)
    info = {"event": "start", "preset": preset.name, "classes": k, "autocast_bf16": autocast}
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        info.update(gpu=prop.name, gpu_memory=prop.total_memory)
    _emit(info)
    s = _Setup(preset, device, k, args.seed)
    build_s = time.monotonic() - started
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        held = torch.cuda.memory_allocated(device)
        _emit({"event": "built", "seconds": build_s, "held": held})
    else:
        _emit({"event": "built", "seconds": build_s})
    timer = StepTimer(device)
    did_not_fit = []
    while True:
        oom = False
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            classes = _classes(preset, k, device)
            if args.probe_memory:
                train_step(s, classes, 1, autocast, args.seed, timer)     # warm-up
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                base = measure._status_kib("VmRSS")
                train_step(s, classes, 2, autocast, args.seed, timer)
                _emit({"event": "memory", "classes": k, "peak": (measure._status_kib("VmHWM") - base) * 1024})
                return
            t0 = time.monotonic()
            warm = train_step(s, classes, 1, autocast, args.seed, timer)
            _emit({"event": "warmup", "classes": k, "seconds": time.monotonic() - t0, "parts": warm})
            steps, cpu = [], []
            for i in range(args.steps):
                last = sum(steps[-1].values()) if steps else sum(warm.values())
                if time.monotonic() - started + 1.3 * last > deadline:
                    break  # the next step would not finish before the deadline
                cpu0 = time.process_time()
                steps.append(train_step(s, classes, 2 + i, autocast, args.seed, timer))
                cpu.append(time.process_time() - cpu0)
                _emit({"event": "step", "classes": k, "parts": steps[-1], "cpu": cpu[-1]})
        except Exception as e:  # only out-of-memory is retried
            if not _is_oom(e):
                raise
            oom = True
        if not oom:
            break
        s.opt.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        did_not_fit.append(k)
        print(f"{preset.name}: does not fit at {k} classes", file=sys.stderr, flush=True)
        _emit({"event": "oom", "classes": k})
        if k == 1 or time.monotonic() - started > deadline:
            _emit({"event": "result", "preset": preset.name, "did_not_fit": did_not_fit,
                   "error": f"does not fit at {k} classes"})
            return
        k = max(1, k // 2)
    result = {"event": "result", "preset": preset.name, "classes": k, "did_not_fit": did_not_fit,
              "steps": steps, "warmup": warm}
    if device.type == "cuda":
        result["peak"] = torch.cuda.max_memory_allocated(device)
        result["held"] = held
    _emit(result)


def _run_child(name: str, args, timeout: float, probe_memory: bool = False) -> dict:
    """Run one preset in a fresh process; the row from its JSON lines (partial ones if it timed out)."""
    cmd = [sys.executable, "-m", "benchmarks.imagenet_step", "--child", name, "--device", args.device,
           "--steps", str(args.steps), "--precision", args.precision, "--seed", str(args.seed),
           "--deadline", str(max(1.0, timeout - 10))]
    if args.classes:
        cmd += ["--classes", str(args.classes)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if probe_memory:
        cmd.append("--probe-memory")
        env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")  # as measure.py
    row: dict = {"preset": name}
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT, timeout=timeout)
        out, rc = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc, row["timed_out"] = None, timeout
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    steps = []
    for ev in events:
        kind = ev.get("event")
        if kind == "start":
            row.update(gpu=ev.get("gpu"), gpu_memory=ev.get("gpu_memory"), classes=ev["classes"])
        elif kind == "built":
            row.update(build_seconds=ev["seconds"], held=ev.get("held"))
        elif kind == "oom":
            row.setdefault("did_not_fit", []).append(ev["classes"])
        elif kind == "warmup":
            row.update(classes=ev["classes"], warmup=ev["parts"], cpu=[])
            steps = []
        elif kind == "step":
            steps.append(ev["parts"])
            row.setdefault("cpu", []).append(ev.get("cpu"))
        elif kind == "memory":
            row["peak"] = ev["peak"]
        elif kind == "result":
            row.update({k: v for k, v in ev.items() if k not in ("event", "steps")})
            steps = ev.get("steps", steps)
    row["steps"] = steps
    if rc not in (0, None) and "error" not in row:
        row["error"] = f"exit status {rc}"
    return row


def summarize(row: dict, preset) -> dict:
    """Median seconds per step and per part, img/s, device-hours of the preset's run (adds to ``row``)."""
    steps = row.get("steps") or []
    if not steps and row.get("warmup"):  # no timed step fitted in the time left: the warm-up is all there is
        steps = row["steps"] = [row["warmup"]]
        row["warmup_only"] = True
    if not steps:
        return row
    totals = [sum(p.values()) for p in steps]
    row["seconds"] = statistics.median(totals)
    row["parts"] = {k: statistics.median(p.get(k, 0.0) for p in steps) for k in PARTS}
    row["img_s"] = row["classes"] * preset.n_neg / row["seconds"]
    row["device_hours"] = preset.steps * preset.batch_size / row["img_s"] / 3600
    return row


def _hours(h: float) -> str:
    return f"{h:,.0f}" if h >= 100 else f"{h:.1f}" if h >= 1 else f"{h:.2g}"


def _fmt_bytes(b) -> str:
    if b is None:
        return "—"
    return f"{b / 2**20:,.0f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def measured_table(rows: list[dict], device: str) -> str:
    from reference_trainers.imagenet.presets import get_preset

    head = ("| preset | classes / device (share of the global batch) | img/s | s / step (min–max) | "
            + " | ".join(PARTS) + " | peak memory | steps × batch | device-hours | "
            + " | ".join(f"wall h @ {d}" for d in SCALING) + " |\n|" + "---|" * MEASURED_COLUMNS)
    lines = [head]
    for r in rows:
        p = get_preset(r["preset"])
        k = r.get("classes")
        share = f"{k} of {p.n_classes} ({k / p.n_classes:.3g})" if k else "—"
        if r.get("did_not_fit"):
            share += "; did not fit at " + ", ".join(map(str, r["did_not_fit"]))
        if "seconds" not in r:
            why = r.get("error") or (f"timed out after {r['timed_out']:.0f} s" if r.get("timed_out") else
                                     "no step finished")
            if r.get("timed_out") and r.get("warmup"):
                why += f" (warm-up step {sum(r['warmup'].values()):.1f} s)"
            lines.append(f"| {r['preset']} | {share} | {why} |" + " |" * (MEASURED_COLUMNS - 3))
            continue
        totals = [sum(s.values()) for s in r["steps"]]
        notes = []
        if r.get("warmup_only"):
            notes.append("the warm-up step only (one-time costs included): no timed step fitted in time")
        elif len(totals) != r.get("want_steps", len(totals)):
            notes.append(f"{len(totals)} steps")
        if r.get("timed_out"):
            notes.append(f"stopped at the {r['timed_out']:.0f}-s limit")
        if device == "cpu" and r.get("cpu") and r.get("cores") and not r.get("warmup_only"):
            share = sum(r["cpu"]) / sum(totals)
            notes.append(f"the process ran on {share:.2f} of the {r['cores']} cores on average")
        n_steps = f" [{'; '.join(notes)}]" if notes else ""
        mem = _fmt_bytes(r.get("peak"))
        if device == "cuda" and r.get("held") is not None:
            mem += f" ({_fmt_bytes(r['held'])} held before the first step)"
        lines.append(
            f"| {r['preset']} | {share} | {r['img_s']:,.1f} | {r['seconds']:.3f} ({min(totals):.3f}–"
            f"{max(totals):.3f}){n_steps} | " + " | ".join(f"{r['parts'][k]:.3f}" for k in PARTS)
            + f" | {mem} | {p.steps:,} × {p.batch_size:,} | {_hours(r['device_hours'])} | "
            + " | ".join(_hours(r["device_hours"] / d) for d in SCALING) + " |")
    return "\n".join(lines)


def measured(args) -> tuple[list[dict], str]:
    from reference_trainers.imagenet.presets import get_preset

    started = time.monotonic()
    info = measure.machine("cpu")   # host and nvidia-smi; CUDA is initialised in the children only
    rows = []
    for i, name in enumerate(args.presets):
        preset = get_preset(name)
        timeout = args.preset_timeout
        if args.time_budget is not None:
            left = args.time_budget - (time.monotonic() - started)
            timeout = min(timeout, left / (len(args.presets) - i))
            if timeout < 20:
                rows.append({"preset": name, "steps": [],
                             "error": f"time budget of {args.time_budget:g} s spent"})
                continue
        row = _run_child(name, args, timeout)
        row["want_steps"], row["cores"] = args.steps, info["cores"]
        if args.device == "cpu" and not args.no_memory and row.get("steps"):
            row["peak"] = _run_child(name, args, args.preset_timeout, probe_memory=True).get("peak")
        rows.append(summarize(row, preset))
        print(json.dumps({k: v for k, v in row.items() if k not in ("steps", "warmup")}), file=sys.stderr,
              flush=True)
    gpu = next((r["gpu"] for r in rows if r.get("gpu")), None)
    gpu_mem = next((r["gpu_memory"] for r in rows if r.get("gpu_memory")), None)
    v = info["versions"]
    try:
        import timm

        timm_version = timm.__version__
    except ImportError:
        timm_version = "not installed"
    machine = (f"{gpu} ({gpu_mem / 2**30:.0f} GiB), host {info['cpu']} with {info['cores']} cores"
               if gpu else f"{info['cpu']}, {info['cores']} cores available, GPU: {info['gpu']}")
    precision = "bf16 autocast" if (args.precision == "bf16" or (args.precision == "auto" and
                                                                 args.device == "cuda")) else "fp32"
    text = "\n".join([
        f"## {HEADING} — {_now()} — {args.device}" + (f": {gpu}" if gpu else ""),
        "",
        f"- command: `{_command(args)}`",
        f"- machine: {machine}; 1-min load average at start {info.get('load_avg_1m', '?')}",
        f"- versions: python {info['python']}, torch {v['torch']}, timm {timm_version}, "
        f"driftloss {v['driftloss']}",
        "- step: train.train_step (train.draw_inputs, train.drifting_step timed by train.StepTimer, "
        "check_finite, backward, clipping at the preset's grad_clip, AdamW, the EMA updates) on K classes of "
        f"the preset's N_neg generated, N_pos positives and N_unc unconditional samples; networks in "
        f"{precision}, fp32 parameters, the loss in float32; encoders with RANDOM weights (same cost as "
        "trained ones); "
        "synthetic batches copied host → device each step (the sample queue's CPU work not included); "
        f"one warm-up step, then the median of {args.steps}",
        "- columns: img/s = generated images per second on this device (K·N_neg per step); data … optimizer "
        "= median seconds of StepTimer's parts; peak memory: " + (
            "torch.cuda.max_memory_allocated over the warm-up and timed steps (weights, optimizer state, "
            "EMAs and encoders included)" if args.device == "cuda" else
            "growth of the resident set during one warm step in a fresh process (glibc mmap threshold "
            "pinned at 128 KiB, VmHWM reset via /proc/self/clear_refs; benchmarks/measure.py)"),
        "- device-hours = steps × N_c·N_neg ÷ img/s, at this device's rate for K classes; wall h @ D devices "
        "= device-hours / D, ASSUMING linear scaling (the per-device batch then shrinks to n_classes / D "
        "classes; the all-reduce of the gradients and the drifting statistics is not counted)",
        "",
        measured_table(rows, args.device),
    ])
    return rows, text


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _command(args) -> str:
    return "python -m benchmarks.imagenet_step " + shlex.join(args.argv)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    args.argv = argv
    if args.child:
        child(args)
        return None
    if args.dry_run:
        rows, text = dry_run(args)
    else:
        rows, text = measured(args)
    if args.write:
        with open(RESULTS, "a") as f:
            f.write("\n" + text + "\n")
    print(text)
    return rows, text


if __name__ == "__main__":
    main()
