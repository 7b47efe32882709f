"""Make the checkout's reference_trainers importable (it is not in the wheel, docs/design.md §5).

Appended, not prepended, to sys.path: ``driftloss`` must still come from the installed package,
which maps adapters/ to ``driftloss.adapters``; the checkout's driftloss/ folder alone lacks it.
"""

import sys
from pathlib import Path

from conftest import require

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.append(ROOT)

require(("torch", "matplotlib", "sklearn", "tqdm"), "tests/trainers (the reference trainers)")
