"""The project's own checks, run with the suite: generated code fresh, ruff and mypy clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )


def test_generated_protobuf_code_is_fresh() -> None:
    result = _run("scripts/gen_proto.py", "--check")
    assert result.returncode == 0, result.stderr


@pytest.mark.timeout(600)
def test_ruff_lint_is_clean() -> None:
    result = _run("-m", "ruff", "check", "authority", "attestors", "tests", "scripts")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(600)
def test_ruff_format_is_clean() -> None:
    result = _run("-m", "ruff", "format", "--check", "authority", "attestors", "tests", "scripts")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(900)
def test_mypy_strict_is_clean() -> None:
    result = _run("-m", "mypy")
    assert result.returncode == 0, result.stdout + result.stderr
