"""Shared fixtures for the spec-stage tests: the example specs and a CLI runner."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmspec.cli import main
from lmspec.spec import Spec, load_spec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MIMO = EXAMPLES / "mimo_v2_flash.yaml"
TINY = EXAMPLES / "mimo_v2_flash_tiny.yaml"


@pytest.fixture(scope="session")
def mimo() -> Spec:
    return load_spec(MIMO)


@pytest.fixture(scope="session")
def tiny() -> Spec:
    return load_spec(TINY)


@pytest.fixture
def run_cli(capsys):
    """Run `lmspec ARGS...` in-process; return (exit status, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's own errors
            code = int(e.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return run
