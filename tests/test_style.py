"""The code reads as pyproject.toml's [tool.ruff] says: the linter runs as a test, so that CI holds to it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_code_passes_the_linter():
    pytest.importorskip("ruff", reason="ruff comes with the [test] extra: pip install -e '.[test]'")
    checked = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "easyserve", "tests", "handles",
                              "benchmarks"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
