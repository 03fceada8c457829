"""Targets: per runtime a profile lists, the variants to build for it.

A target turns the fp32 reference ONNX into `Candidate`s (built through the context's cached pass
runner, `BuildContext.run_pass`) in its own format; the pipeline then verifies and times every
candidate in the candidate's runtime (`builder.runtimes`), applies the gates and selects. A profile's
`runtimes` list decides which targets run; a candidate whose runtime or precision the profile cannot
run is never selected.

Each target is one sub-package, `builder/targets/<name>/`, whose `Target` subclasses register
themselves by their `runtime` when the package is imported; `load_all_targets` imports every
sub-package, so adding a runtime is adding a folder here (and its passes under `builder/passes/`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import pkgutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from edgepack.files import file_sha256

if TYPE_CHECKING:
    from builder.context import BuildContext, ReferenceModel
    from hardware_profiles.schema import RuntimeSpec

TARGET_REGISTRY: dict[str, type["Target"]] = {}


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
            digest.update(bytes.fromhex(file_sha256(self.files[member])))
        return digest.hexdigest()


class Target:
    """Base of a runtime's target; concrete targets set `runtime` and implement `candidates`."""

    runtime: ClassVar[str] = ""
    extra: ClassVar[str] = "builder"  # the pip extra that installs this runtime on the build host
    # "module:Class" of the `builder.runtimes.RuntimeAdapter` that verifies and times this runtime's
    # candidates on the host (a new target may keep its adapter in its own folder).
    adapter: ClassVar[str] = "builder.runtimes.onnxruntime:OnnxRuntimeAdapter"
    # The runtime needs every input shape fixed (TensorRT engines, TFLite tensors), not only the config's.
    needs_static_shapes: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.runtime:
            TARGET_REGISTRY[cls.runtime] = cls

    def validate(self, ctx: BuildContext) -> None:
        """Check this target's settings before any pass runs (raise ConfigError)."""

    def candidates(self, ctx: BuildContext, reference: ReferenceModel) -> list[Candidate]:  # pragma: no cover - abstract
        raise NotImplementedError

    def drives_accelerator(self, spec: RuntimeSpec) -> bool:
        """Whether this runtime, listed first, runs on the board's accelerator (so the profile's
        performance model describes the accelerator rather than the CPU)."""
        return False

    def on_accelerator(self, candidate: Candidate) -> bool:
        """Whether this candidate runs on the accelerator when the runtime drives one."""
        return True

    def requantized(self, ctx: BuildContext, candidate: Candidate) -> Candidate:
        """A candidate the INT8 fallback rebuilt with nodes in float: add what this runtime derives from it."""
        return candidate

    def recovers_accuracy(self, candidate: Candidate) -> bool:
        """Whether `recover_accuracy` can rebuild this candidate when it misses an accuracy gate."""
        return False

    def recover_accuracy(self, ctx: BuildContext, candidate: Candidate, built: Sequence[Candidate]) -> Candidate | None:
        """The runtime's own accuracy recovery for a candidate that missed an accuracy gate (`built`: every
        candidate measured so far); None leaves it as it was. Called after every variant was measured, and
        only when no variant that passes is already as fast and as small (builder.pipeline.apply_fallback)."""
        return None


def load_all_targets() -> dict[str, type[Target]]:
    """Import every target sub-package (each registers its targets) and return the registry."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return TARGET_REGISTRY


def target_class(runtime: str) -> type[Target] | None:
    return load_all_targets().get(runtime)


def get_target(runtime: str) -> Target | None:
    """A fresh target for a runtime name (targets keep per-build state), or None when edgepack builds nothing for it."""
    cls = target_class(runtime)
    return cls() if cls is not None else None
