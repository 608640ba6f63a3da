"""The style and typing CI holds the code to: ``ruff check`` over the repository; ``ruff format``
and ``mypy`` over the core packages (``[tool.mypy] files`` in pyproject.toml names them once).
Fast; no models."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["files"]


@pytest.mark.parametrize(
    "cmd", [["ruff", "check", "."], ["ruff", "format", "--check", *CORE], ["mypy"]], ids=lambda c: " ".join(c[:3])
)
def test_clean(cmd):
    exe = Path(sys.executable).parent / cmd[0]  # the dev extra installs both into the venv
    done = subprocess.run([str(exe), *cmd[1:]], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(cmd)} is not clean:\n{done.stdout[-6000:]}{done.stderr[-2000:]}"
