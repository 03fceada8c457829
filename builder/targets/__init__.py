"""Targets: per runtime a profile lists, the variants to build for it.

A target turns the fp32 reference ONNX into `Candidate`s (built through the builder's cached pass
runner) in its own format; the pipeline then verifies and times every candidate in the candidate's
runtime (`builder.runtimes`), applies the gates and selects. A profile's `runtimes` list decides
which targets run; a candidate whose runtime or precision the profile cannot run is never selected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
from pathlib import Path
from typing import Any, ClassVar


@dataclasses.dataclass
class Candidate:
    """One built variant: its model files and the facts the report needs."""

    name: str  # unique in a build: fp32, int8, ov-int8, tflite-full-int8 …
    precision: str  # fp32 | fp16 | int8
    runtime: str  # onnxruntime | tensorrt | openvino | tflite
    format: str  # onnx | openvino-ir | tflite
    model_path: Path  # the main file: model.onnx, model.xml, model.tflite
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Bundle members for the model: member path → file. Default: model/<main file name>.
    files: dict[str, Path] = dataclasses.field(default_factory=dict)
    float_nodes: frozenset[str] = frozenset()
    # Files to publish next to the report (e.g. a converter log): output name → file.
    artifacts: dict[str, Path] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.files:
            suffix = self.model_path.suffix
            self.files = {f"model/model{suffix}": self.model_path}

    @property
    def model_member(self) -> str:
        return next(m for m, p in self.files.items() if p == self.model_path)

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files.values())

    def sha256(self) -> str:
        """One hash over every model file (an IR's .xml and .bin both matter)."""
        digest = hashlib.sha256()
        for member in sorted(self.files):
            digest.update(member.encode())
            digest.update(hashlib.sha256(self.files[member].read_bytes()).digest())
        return digest.hexdigest()


class Target:
    """Base of a runtime's target; concrete targets set `runtime` and implement `candidates`."""

    runtime: ClassVar[str] = ""
    extra: ClassVar[str] = "builder"

    def validate(self, builder: Any) -> None:
        """Check this target's settings before any pass runs (raise ConfigError)."""

    def candidates(self, builder: Any, base: Path) -> list[Candidate]:  # pragma: no cover - abstract
        raise NotImplementedError


_TARGETS = {
    "onnxruntime": ("builder.targets.onnx", "OnnxRuntimeTarget"),
    "tensorrt": ("builder.targets.onnx", "TensorRTTarget"),
    "openvino": ("builder.targets.openvino", "OpenVinoTarget"),
    "tflite": ("builder.targets.tflite", "TfliteTarget"),
}


def get_target(runtime: str) -> Target | None:
    """The target for a runtime name, or None when edgepack builds nothing for it."""
    entry = _TARGETS.get(runtime)
    if entry is None:
        return None
    module_name, class_name = entry
    return getattr(importlib.import_module(module_name), class_name)()
