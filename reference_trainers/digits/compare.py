"""Drifting vs an MMD generator vs a non-saturating GAN on the 8x8 digits: same generator, data and budget.

    python -m reference_trainers.digits.compare --out runs/digits-compare
    python -m reference_trainers.digits.compare --out runs/digits-compare --steps 300   # any digits flag

Trains each method with ``reference_trainers.digits.train`` (outputs in --out/<method>/), then writes
--out/comparison.md (one row per method: FD-digits and accuracy at alpha = 1 and at the best alpha of the
curve, throughput) with the guidance table of the drifting run (FD and accuracy per alpha), --out/
comparison.json and --out/fd_vs_alpha.png (every method's curve; only drifting is trained with alpha).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys

import torch

from reference_trainers.common.config_cli import config_from_args
from reference_trainers.digits.config import METHODS, DigitsConfig, build_parser
from reference_trainers.digits.evaluate import plot_fd_vs_alpha
from reference_trainers.digits.train import run


def comparison_table(results: dict[str, dict]) -> str:
    """Markdown: one row per method, plus the real-data reference row."""
    rows = ["| method | FD-digits α=1 | accuracy α=1 | best α | FD-digits at best α | accuracy at best α "
            "| ED α=1 | train wall s | train CPU s | samples/s |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for method, m in results.items():
        one, best = m["alphas"][1.0], m["alphas"][m["best_alpha"]]
        rows.append(f"| {method} | {one['fd']:.3f} | {one['accuracy']:.3f} | {m['best_alpha']:g} "
                    f"| {best['fd']:.3f} | {best['accuracy']:.3f} | {one['ed']:.3f} "
                    f"| {m['train_seconds']:.0f} | {m['train_cpu_seconds']:.0f} | {m['samples_per_s']:.0f} |")
    real = next(iter(results.values()))["real_train"]
    rows.append(f"| real train digits (reference) | {real['fd']:.3f} | {real['accuracy']:.3f} | – | – | – "
                f"| {real['ed']:.3f} | – | – | – |")
    return "\n".join(rows)


def guidance_table(metrics: dict) -> str:
    """Markdown: FD-digits, accuracy and energy distance at each sampling alpha of one run."""
    rows = ["| α | FD-digits | accuracy | ED |", "|---|---|---|---|"]
    for alpha, m in sorted(metrics["alphas"].items()):
        rows.append(f"| {alpha:g} | {m['fd']:.3f} | {m['accuracy']:.3f} | {m['ed']:.3f} |")
    return "\n".join(rows)


def describe(cfg: DigitsConfig, results: dict[str, dict]) -> str:
    """The whole comparison.md text."""
    m = next(iter(results.values()))
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores visible, torch {torch.__version__}, " \
              f"{cfg.threads} torch threads"
    return "\n\n".join([
        f"Digits comparison: {cfg.steps} steps, {cfg.classes_per_step} classes x {cfg.n_gen} generated "
        f"(+ {cfg.n_pos} real, {cfg.n_uncond} unconditional) per step; FD-digits on {m['n_generated']} "
        f"generated vs {m['n_reference']} held-out digits (evaluation classifier's held-out accuracy "
        f"{m['classifier_held_out_accuracy']:.3f}). Machine: {machine}.",
        comparison_table(results),
        "Drifting, guidance scale α at sampling:",
        guidance_table(results["drifting"]) if "drifting" in results else "(drifting not run)",
    ]) + "\n"


def build_compare_parser() -> argparse.ArgumentParser:
    """Every DigitsConfig flag but --method (all three run) and --resume; --out defaults to
    runs/digits-compare."""
    parser = build_parser(__doc__, skip=("method", "resume"))
    parser.set_defaults(out="runs/digits-compare")
    return parser


def main(argv: list[str] | None = None) -> dict:
    base = config_from_args(DigitsConfig, vars(build_compare_parser().parse_args(argv)))
    results = {}
    for method in METHODS:
        cfg = dataclasses.replace(base, method=method, out=os.path.join(base.out, method))
        results[method] = run(cfg)
    plot_fd_vs_alpha({k: v["alphas"] for k, v in results.items()}, os.path.join(base.out, "fd_vs_alpha.png"),
                     results["drifting"]["real_train"]["fd"])
    text = describe(base, results)
    with open(os.path.join(base.out, "comparison.md"), "w") as f:
        f.write(text)
    with open(os.path.join(base.out, "comparison.json"), "w") as f:
        json.dump({k: {kk: vv for kk, vv in v.items() if kk != "config"} for k, v in results.items()}, f,
                  indent=2)
    print(text)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
