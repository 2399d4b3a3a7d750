"""mypy, with its default settings and the project's mypy.ini, finds no error in the modules
(the same check as `python -m mypy *.py`, so the README's test command covers it)."""
from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT


def test_mypy_reports_no_error() -> None:
    modules = sorted(p.name for p in ROOT.glob("*.py"))
    run = subprocess.run([sys.executable, "-m", "mypy", *modules], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
