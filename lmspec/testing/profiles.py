"""Hypothesis profiles for kernel property tests.

``lmspec-kernels``: no deadline (the Triton interpreter is slow and uneven), slow-data health checks off.
``lmspec-kernels-ci``: the same, derandomised and without an example database, so a CI run (``CI`` set)
is reproducible. Example counts are set per test, not here.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    "print_blob": True,
}


def profile_name() -> str:
    """The profile for this environment: the CI one when the ``CI`` environment variable is set."""
    return "lmspec-kernels-ci" if os.environ.get("CI") else "lmspec-kernels"


def register_profiles(*, load: bool = False) -> str:
    """Register both profiles; with ``load=True`` also load the one for this environment. Returns its name."""
    settings.register_profile("lmspec-kernels", **_COMMON)
    settings.register_profile("lmspec-kernels-ci", derandomize=True, database=None, **_COMMON)
    name = profile_name()
    if load:
        settings.load_profile(name)
    return name
