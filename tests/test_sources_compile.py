"""Every Python file in the repository compiles: modules imported lazily (the simulated fleet, benchmarks,
example scripts) would otherwise hide a syntax error until someone runs them."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tracked_python_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
        return [ROOT / line for line in listed.stdout.splitlines() if line]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every .py outside hidden folders
        return [p for p in ROOT.rglob("*.py") if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]


def test_every_tracked_python_file_compiles():
    files = _tracked_python_files()
    assert len(files) > 50  # the package, the fleet, the agent, the tests
    errors = []
    for path in files:
        try:
            compile(path.read_text(encoding="utf-8"), str(path), "exec")
        except SyntaxError as exc:
            errors.append(f"{path.relative_to(ROOT)}:{exc.lineno}: {exc.msg}")
    assert errors == []
