"""Make the checkout's reference_trainers importable (it is not in the wheel, docs/design.md §5).

Appended, not prepended, to sys.path: ``driftloss`` must still come from the installed package,
which maps adapters/ to ``driftloss.adapters``; the checkout's driftloss/ folder alone lacks it.
"""

import sys
from pathlib import Path

import pytest
from conftest import require

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.append(ROOT)

require(("torch", "torchvision", "timm", "diffusers", "torch_fidelity", "PIL"),
        "tests/imagenet (the ImageNet trainers)")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on 2 cores shared with other jobs, 2 threads contend and run up to ~20x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
