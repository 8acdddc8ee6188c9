"""The code reads as pyproject.toml's [tool.ruff] says: the linter runs as a test, so that CI holds to it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_code_passes_the_linter():
    pytest.importorskip("ruff", reason="ruff comes with the [test] extra: pip install -e '.[test]'")
    checked = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "easyserve", "tests", "handles",
                              "benchmarks"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_suite_collects_the_same_tests_twice():
    """CI runs the suite in two processes, which each collect it and must find the same test ids: a
    parameter built from the clock (a gzip header's time stamp) or from chance names a test differently
    in each, and the run stops before it starts."""
    def collect():
        listed = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                 "--nbmake", "tests", "notebooks"], cwd=ROOT, capture_output=True, text=True,
                                timeout=120)
        assert listed.returncode == 0, listed.stdout[-2000:] + listed.stderr[-2000:]
        return [line for line in listed.stdout.splitlines() if "::" in line or line.endswith(".ipynb")]

    first = collect()
    time.sleep(1.1)  # past a second's boundary, where time stamps change
    assert collect() == first
