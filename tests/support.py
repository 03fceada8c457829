"""Helpers for tests (importable as `tests.support`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None):
    """Run `python -m edgepack ARGS` as a real process; returns CompletedProcess with text output."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "edgepack", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=900)
