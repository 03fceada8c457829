"""Build passes: small registered classes, one per file.

Each concrete pass declares a `name`, a pydantic `Config` (validated in full before the pipeline
starts) and `run(input_model, ctx) -> PassOutput`. Subclasses register themselves through
`__init_subclass__`, so adding a pass is adding one file under `builder/passes/<backend>/`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from edgepack.errors import ConfigError, first_validation_error

PASS_REGISTRY: dict[str, type["Pass"]] = {}


class PassConfig(BaseModel):
    """Base of every pass config: frozen, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclasses.dataclass
class PassContext:
    """What a pass may use besides its input model: the profile, the data, a scratch folder."""

    work_dir: Path
    profile: Any  # hardware_profiles.HardwareProfile
    build: Any  # edgepack.config.BuildConfig
    data: Any  # builder.data.BuildData
    cache_dir: Path | None = None

    def scratch(self, name: str) -> Path:
        path = self.work_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


@dataclasses.dataclass
class PassOutput:
    """A pass's result: the output model file and facts for the report (JSON-serialisable)."""

    model_path: Path
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Files that belong to the model and must travel with it (an OpenVINO IR's .bin beside its .xml).
    sidecars: list[Path] = dataclasses.field(default_factory=list)


class Pass:
    """Base class; concrete passes set `name`, `Config`, `description` and implement `run`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Config: ClassVar[type[PassConfig]] = PassConfig
    # Extra cache-key material beyond the input model and config (e.g. the calibration data hash).
    uses_calibration_data: ClassVar[bool] = False
    # Validation data (e.g. accuracy-controlled quantization) is part of the key too.
    uses_validation_data: ClassVar[bool] = False
    # Whether the profile changes the output (False for converters shared by several profiles).
    uses_profile: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            if cls.name in PASS_REGISTRY and PASS_REGISTRY[cls.name] is not cls:
                raise RuntimeError(f"pass name {cls.name!r} registered twice")
            PASS_REGISTRY[cls.name] = cls

    def __init__(self, config: PassConfig) -> None:
        self.config = config

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None = None) -> "Pass":
        """Validate a config dict and build the pass; a bad value is a one-line ConfigError."""
        try:
            config = cls.Config.model_validate(data or {})
        except ValidationError as exc:
            raise ConfigError(first_validation_error(exc, f"pass {cls.name}"), pass_name=cls.name) from None
        return cls(config)

    def config_json(self) -> str:
        return json.dumps(self.config.model_dump(mode="json"), sort_keys=True)

    @classmethod
    def code_sha256(cls) -> str:
        """Hash of the pass's source file: a changed pass never reuses results of the old code."""
        import inspect

        from edgepack.files import file_sha256

        source = inspect.getsourcefile(cls)
        return file_sha256(Path(source)) if source else ""

    def run(self, input_model: Path, ctx: PassContext) -> PassOutput:  # pragma: no cover - abstract
        raise NotImplementedError


def load_all_passes() -> dict[str, type[Pass]]:
    """Import every pass module so the registry is complete."""
    import importlib
    import pkgutil

    import builder.passes as passes_pkg

    for module in pkgutil.walk_packages(passes_pkg.__path__, prefix="builder.passes."):
        importlib.import_module(module.name)
    return dict(PASS_REGISTRY)
