"""Optional extras: a command whose extra is not installed says which one to install, in one line.

Each case runs `lmspec` in a fresh interpreter where the extra's module cannot be imported
(`sys.modules[name] = None` makes every import of it fail, as on a machine without it).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lmspec.cli.common import EXTRAS, extra_for

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "mimo_v2_flash_tiny.yaml"

_RUN_BLOCKED = """
import sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None
from lmspec.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _lmspec_without(blocked: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", _RUN_BLOCKED, blocked, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.parametrize("blocked", ["hypothesis", "triton", "hypothesis,triton"])
def test_test_kernels_without_its_extra_exits_2_naming_it(blocked):
    proc = _lmspec_without(blocked, "test-kernels", TINY, "--examples", "1")
    missing = " and ".join(m for m in EXTRAS["kernels"] if m in blocked.split(","))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"lmspec: error: test-kernels needs {missing}: install lmspec[kernels]\n"
    assert proc.stdout == ""


def test_the_extras_the_cli_names_are_the_ones_pyproject_declares():
    tomllib = pytest.importorskip("tomllib")  # the standard library's from Python 3.11
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, modules in EXTRAS.items():
        names = {req.split(">")[0].split("=")[0].split("[")[0].strip() for req in declared[extra]}
        assert set(modules) <= names, (extra, declared[extra])


def test_a_missing_optional_module_is_traced_to_the_smallest_extra_that_installs_it():
    assert extra_for("hypothesis") == "kernels"
    assert extra_for("triton.language") == "triton"  # in both extras; the one with only triton
    assert extra_for("numpy") is None and extra_for(None) is None  # a core dependency: a real bug
