"""tflite target (being built: see issue 3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from builder.runtimes import RuntimeUnavailable
from builder.targets import Candidate, Target


class TfliteTarget(Target):
    runtime = "tflite"

    def candidates(self, builder: Any, base: Path) -> list[Candidate]:
        raise RuntimeUnavailable("tflite variants are not built yet", runtime="tflite")
