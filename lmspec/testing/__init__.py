"""Property testing of kernels against float64 references, for lmspec's own kernels and users' specs.

- ``compare``: ``TOLERANCES`` (the one tolerance table), ``assert_matches_reference``, ``poisoned_allocations``.
- ``strategies``: Hypothesis strategies drawing kernel cases from a spec's kernel variants.
- ``checks``: one forward+backward check per kernel family.
- ``suite``: ``run_kernel_suite(variants, examples) -> list[KernelRow]`` and ``print_kernel_table``,
  behind ``lmspec test-kernels``.

Importing this package registers the Hypothesis profiles ``lmspec`` and ``lmspec-ci`` (the one for a ``CI``
environment); ``register_profiles(load=True)`` also loads it (tests/conftest.py does).
"""

from lmspec.testing.compare import (
    TOLERANCES,
    ReferenceMismatch,
    assert_matches_reference,
    poisoned_allocations,
    relative_error,
    tolerance,
)
from lmspec.testing.profiles import profile_name, register_profiles
from lmspec.testing.suite import KernelRow, print_kernel_table, run_kernel_suite

PROFILE = register_profiles()

__all__ = [
    "PROFILE",
    "TOLERANCES",
    "KernelRow",
    "ReferenceMismatch",
    "assert_matches_reference",
    "poisoned_allocations",
    "print_kernel_table",
    "profile_name",
    "register_profiles",
    "relative_error",
    "run_kernel_suite",
    "tolerance",
]
