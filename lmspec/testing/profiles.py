"""Hypothesis profiles for kernel property tests.

``lmspec`` (default): no deadline (the Triton interpreter is slow and its first call compiles nothing but
parses the kernel), no database writes to the repository. ``lmspec-ci`` (chosen when the ``CI`` environment
variable is set): the same, derandomised, so a CI run is reproducible. Example counts are set per test.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    "print_blob": True,
}


def register_profiles() -> str:
    """Register ``lmspec`` and ``lmspec-ci`` and load the one for this environment; returns its name."""
    settings.register_profile("lmspec", **_COMMON)
    settings.register_profile("lmspec-ci", derandomize=True, database=None, **_COMMON)
    name = "lmspec-ci" if os.environ.get("CI") else "lmspec"
    settings.load_profile(name)
    return name
