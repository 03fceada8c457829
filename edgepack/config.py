"""The build config (`edgepack.yaml`), validated in full before any pass runs.

Relative paths in the file are resolved against the file's folder, so a project can be built from
anywhere. Every problem is a `ConfigError` with one line naming the file and the field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgepack.errors import ConfigError, first_validation_error, validation_error_field
from edgepack.yamlfile import read_yaml_mapping

Precision = Literal["fp32", "fp16", "int8"]
CalibrationMethod = Literal["auto", "minmax", "entropy", "percentile"]
BUILTIN_METRICS = ("top1", "agreement", "cosine", "mae")
_VERSION = re.compile(r"^[0-9]+(\.[0-9]+){0,2}([-+][0-9A-Za-z.-]+)?$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    calibration: Path | None = Field(default=None, description="`.npz` with one array per model input, first axis = samples.")
    validation: Path | None = Field(default=None, description="`.npz` with the inputs plus optional labels.")
    labels_key: str = Field(default="labels", description="Key of the labels array in the validation file.")


class GatesConfig(_Strict):
    max_accuracy_drop: float | None = Field(default=None, ge=0, description="Largest allowed drop vs. fp32 in metric units (top1: 0.01 = one point).")
    max_p95_latency_ms: float | None = Field(default=None, gt=0, description="Largest allowed p95 latency on the target (measured on host when the host is the target, else estimated).")
    max_size_mb: float | None = Field(default=None, gt=0, description="Largest allowed model file size in MB (1e6 bytes).")
    min_agreement: float | None = Field(default=None, ge=0, le=1, description="Smallest allowed top-1 agreement with fp32 (for a [N, T, C] sequence output: every position's top-1).")


class PruneConfig(_Strict):
    sparsity: float = Field(default=0.5, gt=0, lt=1, description="Fraction of weights set to zero (unstructured).")
    pattern: Literal["unstructured", "2:4"] = Field(default="unstructured", description="`2:4` keeps the two largest of every four weights.")
    op_types: tuple[str, ...] = Field(default=("Conv", "Gemm", "MatMul"), description="Ops whose weights are pruned.")

    @model_validator(mode="after")
    def _pattern_fixes_sparsity(self) -> "PruneConfig":
        if self.pattern == "2:4" and abs(self.sparsity - 0.5) > 1e-9:
            raise ValueError("pattern '2:4' always gives sparsity 0.5; drop sparsity or set it to 0.5")
        return self


class CalibrationConfig(_Strict):
    method: CalibrationMethod = Field(default="auto", description="How activation ranges are chosen. auto: minmax, and "
                                      "where that misses the accuracy budget percentile and entropy too, keeping the one "
                                      "that loses least on the validation data (the fallback search starts from it).")
    samples: int = Field(default=256, gt=0, description="Calibration samples used at most.")
    percentile: float = Field(default=99.999, gt=90, le=100, description="Percentile for method=percentile.")


class Int8Config(_Strict):
    per_channel: bool = Field(default=True, description="Quantize weights per output channel.")
    dynamic: Literal["auto", "always", "never"] = Field(default="auto", description="Also try dynamic INT8: auto = when MatMul/Gemm dominate.")
    op_types: tuple[str, ...] | None = Field(default=None, description="Ops to quantize; default = the ones that run faster in INT8 on the target.")
    fallback: bool = Field(default=True, description="Keep the most sensitive nodes in float until the accuracy gate holds.")
    max_fallback_nodes: int = Field(default=16, ge=0, description="Give up after this many float nodes.")


class OptimizeConfig(_Strict):
    precisions: tuple[Precision, ...] = Field(default=("fp32", "fp16", "int8"), min_length=1, description="Variants to try.")
    prune: PruneConfig | None = Field(default=None, description="Also try a pruned variant.")
    calibration: CalibrationConfig = CalibrationConfig()
    int8: Int8Config = Int8Config()
    simplify: bool = Field(default=True, description="Fold constants and drop redundant nodes before quantizing.")

    @field_validator("precisions")
    @classmethod
    def _fp32_first(cls, precisions: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(precisions)) != len(precisions):
            raise ValueError("precisions must not repeat")
        return precisions


class VerifyConfig(_Strict):
    max_samples: int = Field(default=2000, gt=0, description="Validation samples used at most.")
    selftest_samples: int = Field(default=4, gt=0, le=64, description="Inputs stored in the bundle's self-test.")


class BenchmarkConfig(_Strict):
    warmup: int = Field(default=10, ge=0, description="Runs discarded before timing.")
    runs: int = Field(default=100, gt=0, description="Timed runs for p50/p95.")
    threads: int = Field(default=1, ge=0, description="Intra-op threads (0 = runtime default).")


class BuildConfig(_Strict):
    name: str = Field(description="Model name, lower case, used in bundle file names.")
    version: str = Field(description="Model version, e.g. 1.0.0.")
    model: Path = Field(description="Path to the float ONNX model.")
    inputs: dict[str, tuple[int, ...]] | None = Field(default=None, description="Static input shapes by input name.")
    data: DataConfig = DataConfig()
    metric: str = Field(default="top1", description="top1 | agreement | cosine | mae | 'module:function'.")
    gates: GatesConfig = GatesConfig()
    optimize: OptimizeConfig = OptimizeConfig()
    verify: VerifyConfig = VerifyConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()
    base_dir: Path = Field(default=Path("."), exclude=True, description="Folder relative paths are resolved against.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("must be lower case letters, digits, '.', '_' or '-' (at most 64)")
        return value

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        if not _VERSION.match(value):
            raise ValueError("must look like 1.0.0")
        return value

    @field_validator("metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        if value not in BUILTIN_METRICS and not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", value):
            raise ValueError(f"must be one of {', '.join(BUILTIN_METRICS)} or 'module:function'")
        return value

    @field_validator("inputs")
    @classmethod
    def _shapes(cls, value: dict[str, tuple[int, ...]] | None) -> dict[str, tuple[int, ...]] | None:
        for name, shape in (value or {}).items():
            if any(d <= 0 for d in shape):
                raise ValueError(f"input {name!r}: every dimension must be positive, got {list(shape)}")
        return value

    def resolve(self, path: Path | None) -> Path | None:
        if path is None:
            return None
        return path if path.is_absolute() else (self.base_dir / path)

    @property
    def model_path(self) -> Path:
        return self.resolve(self.model)  # type: ignore[return-value]

    @property
    def calibration_path(self) -> Path | None:
        return self.resolve(self.data.calibration)

    @property
    def validation_path(self) -> Path | None:
        return self.resolve(self.data.validation)


def load_build_config(path: Path, overrides: dict | None = None) -> BuildConfig:
    """Read, validate and resolve `edgepack.yaml`. `overrides` replace top-level keys (e.g. model from --model)."""
    data = read_yaml_mapping(path, "config", missing_hint=" (pass --config PATH)")
    if "base_dir" in data:
        raise ConfigError(f"{path}: base_dir: unknown field")
    data.update(overrides or {})
    data["base_dir"] = path.resolve().parent
    try:
        return BuildConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(first_validation_error(exc, str(path)), field=validation_error_field(exc)) from None
