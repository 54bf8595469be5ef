"""Shared test set-up: one Hypothesis profile (no deadline; derandomised in CI)."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "lmspec",
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile("lmspec")
