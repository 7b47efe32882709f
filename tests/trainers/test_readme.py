"""The README's examples run as documented.

Every ```python block of README.md whose first line is ``# example: NAME ...`` is a complete program: it runs
here as a user would paste it (a fresh interpreter, outside the checkout, at the step count it states) and
must print what the README says it prints: at least 7 of the 8 modes covered and most samples in the modes.
Blocks without the marker (the feature-space sketch needs timm and a generator of your own) are not run.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = re.compile(r"# example: ([\w-]+)")
OUTCOME = re.compile(r"modes covered: (\d+)/8, in modes: (\d+)%")
EXAMPLES = {"torch-8-gaussians": "torch", "jax-8-gaussians": "optax"}  # name -> the package it needs


def readme_examples() -> dict[str, str]:
    """{name: source} of the marked ```python blocks of README.md."""
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)
    marked = {}
    for block in blocks:
        match = MARKER.match(block)
        if match:
            marked[match.group(1)] = block
    return marked


def test_the_readme_marks_its_runnable_examples():
    assert set(readme_examples()) == set(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_readme_example_learns_the_8_gaussians(name, tmp_path):
    pytest.importorskip(EXAMPLES[name])
    script = tmp_path / f"{name.replace('-', '_')}.py"
    script.write_text(readme_examples()[name], encoding="utf-8")
    # run from tmp_path: the checkout's driftloss/ folder must not shadow the installed package
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = OUTCOME.search(done.stdout)
    assert outcome, done.stdout
    covered, in_modes = map(int, outcome.groups())
    assert covered >= 7 and in_modes >= 60, done.stdout
