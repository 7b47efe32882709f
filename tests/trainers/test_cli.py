"""The trainers' command lines: --help documents every flag, bad values are usage errors, not tracebacks.

The entry points are the ``python -m reference_trainers....`` commands of README.md's "Reference trainers"
table, so a renamed module fails here too.
"""

import dataclasses
import importlib
import re
import sys
import types
from pathlib import Path

import pytest

from reference_trainers.common.config_cli import config_with_resume
from reference_trainers.digits.config import DigitsConfig
from reference_trainers.digits.config import build_parser as digits_parser
from reference_trainers.toy.config import ToyConfig
from reference_trainers.toy.config import build_parser as toy_parser

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_entry_points() -> list[str]:
    section = README.read_text(encoding="utf-8").split("## Reference trainers", 1)[1].split("\n## ", 1)[0]
    return sorted(set(re.findall(r"`python -m (reference_trainers\.[\w.]+)", section)))


ENTRY_POINTS = readme_entry_points()
CONFIGS = {"toy": ToyConfig, "digits": DigitsConfig}


def entry_main(module: str):
    if module.endswith("_jax"):
        pytest.importorskip("equinox")
    return importlib.import_module(module).main


def run_cli(module: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``python -m module *argv`` when it exits while parsing."""
    with pytest.raises(SystemExit) as exit_info:
        entry_main(module)(argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def flat(text: str) -> str:
    return " ".join(text.split())


def test_the_readme_lists_the_five_entry_points():
    assert ENTRY_POINTS == ["reference_trainers.digits.compare", "reference_trainers.digits.train",
                            "reference_trainers.toy.ablations", "reference_trainers.toy.toy2d",
                            "reference_trainers.toy.toy2d_jax"]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_documents_every_flag_with_its_choices_and_default(module, capsys):
    code, out, _ = run_cli(module, ["--help"], capsys)
    assert code == 0
    text = flat(out)
    config = CONFIGS[module.split(".")[1]]
    skipped = {"method", "resume"} if module.endswith("compare") else set()
    for field in dataclasses.fields(config):
        if field.name in skipped:
            assert "--" + field.name.replace("_", "-") + " " not in text
            continue
        assert "--" + field.name.replace("_", "-") in text
        assert flat(field.metadata["help"]) in text, field.name
        if field.metadata["choices"]:
            assert "{" + ",".join(field.metadata["choices"]) + "}" in text
    assert "(default: " in text and text.count("(default: ") >= len(dataclasses.fields(config)) - 3
    # the description: the first line of the module's docstring
    doc = importlib.import_module(module).__doc__
    assert flat(doc.split("\n")[0]) in text


def test_help_shows_the_ablation_flags_and_its_own_defaults(capsys):
    _, out, _ = run_cli("reference_trainers.toy.ablations", ["--help"], capsys)
    text = flat(out)
    assert "--which {acceptance,alloc,frameworks,table1,table11,taus}" in text
    assert "--seeds" in text and "--workers" in text and "--results" in text
    assert "--steps STEPS optimizer steps (default: 800)" in text       # the ablations' base, not ToyConfig's
    assert "(default: --no-plots)" in text


BAD_TOY = [
    (["--steps", "0"], "--steps", "≥ 1"),
    (["--steps", "-5"], "--steps", "≥ 1"),
    (["--steps", "ten"], "--steps", "invalid int"),
    (["--n-gen", "1"], "--n-gen", "≥ 2"),
    (["--lr", "-0.001"], "--lr", "> 0"),
    (["--taus", "0.1", "0"], "--taus", "> 0"),
    (["--ema-decay", "1"], "--ema-decay", "< 1"),
    (["--stop-at", "-1"], "--stop-at", "≥ 0"),
    (["--steps", "30", "--stop-at", "40"], "--stop-at", "≤ --steps (30)"),
    (["--target", "moons"], "--target", "invalid choice"),
    (["--init", "nowhere"], "--init", "invalid choice"),
    (["--kernel", "x"], "--kernel", "invalid choice"),
    (["--lr-schedule", "linear"], "--lr-schedule", "invalid choice"),
]


@pytest.mark.parametrize("argv, flag, why", BAD_TOY)
@pytest.mark.parametrize("module", ["reference_trainers.toy.toy2d", "reference_trainers.toy.toy2d_jax"])
def test_bad_toy_values_are_usage_errors(module, argv, flag, why, capsys):
    code, out, err = run_cli(module, argv, capsys)
    assert code == 2 and out == ""
    assert f"error: argument {flag}: " in err and why in err
    assert "Traceback" not in err


BAD_DIGITS = [
    (["--steps", "0"], "--steps", "≥ 1"),
    (["--method", "vae"], "--method", "invalid choice"),
    (["--classes-per-step", "11"], "--classes-per-step", "≤ 10"),
    (["--n-gen", "1"], "--n-gen", "≥ 2"),
    (["--eval-alphas", "1", "0.5"], "--eval-alphas", "≥ 1"),
    (["--eval-per-class", "20", "--grid-columns", "30"], "--grid-columns", "≤ --eval-per-class (20)"),
    (["--mmd-kernel", "cauchy"], "--mmd-kernel", "invalid choice"),
    (["--steps", "10", "--stop-at", "11"], "--stop-at", "≤ --steps (10)"),
]


@pytest.mark.parametrize("argv, flag, why", BAD_DIGITS)
def test_bad_digits_values_are_usage_errors(argv, flag, why, capsys):
    code, _, err = run_cli("reference_trainers.digits.train", argv, capsys)
    assert code == 2 and f"error: argument {flag}: " in err and why in err


@pytest.mark.parametrize("module, argv, message", [
    ("reference_trainers.toy.ablations", ["--steps", "5"], "required: --which"),
    ("reference_trainers.toy.ablations", ["--which", "table2"], "argument --which: invalid choice"),
    ("reference_trainers.toy.ablations", ["--which", "taus", "--seeds", "0"], "--seeds: must be ≥ 1"),
    ("reference_trainers.toy.ablations", ["--which", "taus", "--stop-at", "900"], "≤ --steps (800)"),
    ("reference_trainers.digits.compare", ["--method", "gan"], "unrecognized arguments: --method"),
    ("reference_trainers.digits.compare", ["--lr", "0"], "argument --lr: must be > 0"),
])
def test_ablations_and_compare_refuse_bad_flags(module, argv, message, capsys):
    code, _, err = run_cli(module, argv, capsys)
    assert code == 2 and message in err


@pytest.mark.parametrize("module", ["reference_trainers.toy.toy2d", "reference_trainers.digits.train"])
def test_steps_zero_is_refused_before_any_output(module, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(module, ["--steps", "0", "--out", str(out)], capsys)
    assert code == 2 and "argument --steps" in err
    assert not out.exists()


def test_configs_built_in_code_are_checked_too():
    with pytest.raises(ValueError, match="steps"):
        ToyConfig(steps=0)
    with pytest.raises(ValueError, match="stop_at"):
        ToyConfig(steps=10, stop_at=20)
    with pytest.raises(ValueError, match="target"):
        ToyConfig(target="moons")
    with pytest.raises(ValueError, match="classes_per_step"):
        DigitsConfig(classes_per_step=0)


def test_resumed_config_made_invalid_by_the_flags_is_a_usage_error(capsys):
    checkpoint = dataclasses.asdict(ToyConfig(steps=30))
    cfg = config_with_resume(ToyConfig, {"resume": "ckpt", "steps": 60}, lambda path: checkpoint)
    assert cfg.steps == 60 and cfg.stop_at == 0
    with pytest.raises(SystemExit) as exit_info:
        config_with_resume(ToyConfig, {"resume": "ckpt", "stop_at": 40}, lambda path: checkpoint)
    assert exit_info.value.code == 2
    assert "argument --stop-at: must be ≤ --steps (30)" in capsys.readouterr().err


@pytest.mark.parametrize("build, module", [(toy_parser, "reference_trainers.toy.toy2d"),
                                           (digits_parser, "reference_trainers.digits.train")])
def test_usage_names_the_module_it_was_started_as(build, module, monkeypatch):
    main = types.ModuleType("__main__")
    main.__spec__ = types.SimpleNamespace(name=module)           # what `python -m module` sets
    monkeypatch.setitem(sys.modules, "__main__", main)
    assert build("").format_usage().startswith(f"usage: python -m {module} [options]")
