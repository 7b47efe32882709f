"""Hypothesis profiles: derandomized under CI (CI set) so a submission never fails by chance; a plain
checkout without the package installed stops with what to install."""

import importlib.util
import os

import pytest
from hypothesis import HealthCheck, settings


def require(modules: tuple[str, ...], what: str) -> None:
    """Stop the run with a usage error (not a skip) when a module the tests need cannot be imported."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise pytest.UsageError(f"{what} need {', '.join(missing)}, which this environment lacks. {INSTALL}")


INSTALL = ('From the checkout: pip install -e ".[test]" (adds driftloss.adapters, which a plain checkout '
           'lacks), plus ".[torch]", ".[jax]", ".[trainers]" or ".[imagenet]" for those tests; or run tox, '
           "which builds one environment per backend.")
if importlib.util.find_spec("driftloss") is None or importlib.util.find_spec("driftloss.adapters") is None:
    raise pytest.UsageError(f"driftloss is not installed in this environment. {INSTALL}")

settings.register_profile(
    "ci", derandomize=True, max_examples=40, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=60, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))
