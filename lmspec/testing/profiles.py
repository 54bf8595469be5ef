"""The Hypothesis profiles: one system for lmspec's own tests and for `lmspec test-kernels`.

``lmspec``: no deadline (the Triton interpreter is slow and uneven, and a first call compiles), and the
health checks that only say "this is slow or filters a lot" off. ``lmspec-ci``: the same, derandomised
and without an example database, so a CI run (``CI`` set) is reproducible. Example counts are set per
test, not here. tests/conftest.py loads the one for its environment.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

__all__ = ["PROFILES", "profile_name", "register_profiles"]

PROFILES = ("lmspec", "lmspec-ci")

_COMMON = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    "print_blob": True,
}


def profile_name() -> str:
    """The profile for this environment: the CI one when the ``CI`` environment variable is set."""
    return "lmspec-ci" if os.environ.get("CI") else "lmspec"


def register_profiles(*, load: bool = False) -> str:
    """Register both profiles; with ``load=True`` also load the one for this environment. Returns its name."""
    settings.register_profile("lmspec", **_COMMON)
    settings.register_profile("lmspec-ci", derandomize=True, database=None, **_COMMON)
    name = profile_name()
    if load:
        settings.load_profile(name)
    return name
