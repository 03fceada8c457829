"""The build report: what a build tried, measured, decided and wrote, as one typed contract.

    BuildReport                        <name>-<version>-<profile>.report.json
      ├─ host: HostInfo                where the build ran, and whether it stands for the target
      ├─ gates: Gates                  the thresholds applied, and whether anything passed them
      ├─ reference: ReferenceSummary   the fp32 model every variant is compared with
      ├─ variants: [Variant]           one per candidate: measurements, gate results, decision
      │    ├─ latency_ms: LatencyStats
      │    ├─ failed_gates: [FailedGate]
      │    └─ tensorrt · io_quantization · edgetpu · converter   (present only for their runtime)
      ├─ passes: [PassRecord] · sensitivity: {variant: [SensitivityEntry]} · toolchain: [ToolchainStep]
      └─ lineage: Lineage · source_model: SourceModel · bundle: BundleInfo | None · cache: CacheStats

    BuildMatrix                        <name>-<version>.matrix.json (a multi-profile build)
      └─ profiles: [MatrixProfile] → variants: [MatrixVariant]

The JSON keeps the keys and their order the builder has always written: sections that belong to one
runtime (`tensorrt`, `edgetpu`, …), a variant's `dropped_reason` and the report's `toolchain` are left
out when absent rather than written as null, so older readers see the same documents. `schema_version`
says which shape a document has; readers use attributes, never keys.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

REPORT_SCHEMA_VERSION = 1
MATRIX_SCHEMA_VERSION = 1

Precision = Literal["fp32", "fp16", "int8"]
LatencySource = Literal["host", "estimate"]


class _ReportModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)

    # Optional fields written only when set (their keys never appeared as null in a report).
    omit_when_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _leave_out_absent(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        for key in self.omit_when_none:
            if data.get(key, ...) is None:
                del data[key]
        return data


class LatencyStats(_ReportModel):
    """Host latency of single-sample inference after warm-up, in milliseconds."""

    p50: float
    p95: float
    mean: float
    runs: int
    threads: int


class FailedGate(_ReportModel):
    """One gate a variant misses: the measured value, the threshold and a sentence."""

    gate: Literal["max_accuracy_drop", "min_agreement", "max_p95_latency_ms", "max_size_mb"]
    value: float
    threshold: float
    message: str


class TensorRTEngineSpec(_ReportModel):
    """How the device builds its TensorRT engine from the bundled ONNX (engines are device-specific)."""

    build_on_device: bool
    explicit_quantization: bool
    sparse_tensor_cores: bool
    trtexec: str
    doc: str


class IoTensorQuantization(_ReportModel):
    """One ONNX input or output and the .tflite tensor it maps to."""

    name: str
    tflite_name: str
    dtype: str
    scale: float | None
    zero_point: int | None
    shape: list[int]
    transpose: list[int] | None


class IoQuantization(_ReportModel):
    inputs: list[IoTensorQuantization]
    outputs: list[IoTensorQuantization]
    doc: str


class VariantMeasurement(_ReportModel):
    """What verification and benchmarking found for one candidate, before it is judged against fp32."""

    omit_when_none: ClassVar[frozenset[str]] = frozenset({"tensorrt", "edgetpu", "io_quantization", "converter", "dropped_reason"})

    name: str = Field(description="Unique in a build: fp32, int8, ov-int8, tflite-full-int8 …")
    precision: Precision
    format: str = Field(description="onnx | openvino-ir | tflite")
    runtime: str = Field(description="The runtime the bundle declares: onnxruntime | tensorrt | openvino | tflite")
    verified_in: str = Field(description="The runtime the accuracy and latency were measured in.")
    size_bytes: int
    model_sha256: str
    metric: str
    accuracy: float
    agreement: float = Field(description="Share of samples whose top-1 matches fp32.")
    cosine: float
    max_abs_error: float
    mean_abs_error: float
    latency_ms: LatencyStats
    latency_cached: bool
    estimated_target_latency_ms: float
    target_latency_ms: float = Field(description="p50 on the target: the host's measurement where the host is the target, else the estimate.")
    target_latency_p95_ms: float
    target_latency_source: LatencySource
    fallback_nodes: list[str]
    sparsity: float | None
    quantization: dict[str, Any] | None = Field(description="How the variant was quantized; the keys depend on the quantizer.")
    runnable: bool = Field(description="Whether the profile can run this precision in this runtime.")
    notes: list[str]
    tensorrt: TensorRTEngineSpec | None = None
    edgetpu: dict[str, Any] | None = Field(default=None, description="Static Edge TPU op placement (builder.edgetpu).")
    io_quantization: IoQuantization | None = None
    converter: dict[str, Any] | None = Field(default=None, description="The converter and its settings (TFLite).")
    dropped_reason: str | None = None


class Variant(VariantMeasurement):
    """A candidate judged against the fp32 reference and the gates, with the build's decision about it."""

    accuracy_delta: float = Field(description="Candidate minus fp32 in the metric's units.")
    size_ratio: float
    latency_ratio: float | None
    failed_gates: list[FailedGate]
    passed: bool
    decision: str = Field(default="", description="selected | dropped: why | kept as a candidate (set by selection).")


class GateThresholds(_ReportModel):
    """The gates a build applies: the config's over the profile's defaults (None = not applied)."""

    max_accuracy_drop: float | None = None
    max_p95_latency_ms: float | None = None
    max_size_mb: float | None = None
    min_agreement: float | None = None


class Gates(GateThresholds):
    passed: bool = Field(description="Whether a variant passed every gate (and was selected).")


class HostInfo(_ReportModel):
    machine: str
    cpu: str
    cpu_features: list[str]
    is_target: bool = Field(description="Whether host measurements stand for the target (same ISA, no accelerator).")
    reason: str


class ReferenceSummary(_ReportModel):
    name: str
    accuracy: float
    size_bytes: int
    validation_samples: int


class PassRecord(_ReportModel):
    name: str = Field(description="The step's label (a pass may run several times, e.g. int8-sparse).")
    pass_name: str = Field(alias="pass")
    seconds: float
    cached: bool


class SensitivityEntry(_ReportModel):
    """How much quantizing one node alone moves the outputs away from fp32 (higher = more harmful)."""

    node: str
    op_type: str
    macs: int
    score: float


class Lineage(_ReportModel):
    source_model_sha256: str
    calibration_sha256: str | None
    validation_sha256: str | None
    config_sha256: str
    profile_sha256: str
    tools: dict[str, str]


class SourceModel(_ReportModel):
    path: str
    sha256: str
    opset: int | None = Field(description="The source model's opset before the upgrade pass.")


class BundleInfo(_ReportModel):
    path: str
    sha256: str
    size_bytes: int


class ToolchainStep(_ReportModel):
    """A vendor-toolchain step (edgetpu_compiler, trtexec) for the selected variant."""

    step: str
    image: str
    command: str
    status: Literal["ran", "skipped", "failed"]
    message: str


class CacheStats(_ReportModel):
    hits: int
    misses: int
    enabled: bool


class BuildReport(_ReportModel):
    """`<name>-<version>-<profile>.report.json`."""

    omit_when_none: ClassVar[frozenset[str]] = frozenset({"toolchain"})

    schema_version: int = REPORT_SCHEMA_VERSION
    name: str
    version: str
    profile: str
    profile_description: str
    runtime: str = Field(description="The selected variant's runtime, else the profile's preferred one.")
    runtimes: list[str]
    created_by: str
    host: HostInfo
    metric: str
    selected: str | None
    selection_reason: str
    gates: Gates
    reference: ReferenceSummary
    variants: list[Variant]
    notes: list[str]
    passes: list[PassRecord]
    sensitivity: dict[str, list[SensitivityEntry]] = Field(description="Per variant that needed the INT8 fallback: nodes ranked by harm.")
    estimate_label: str
    lineage: Lineage
    source_model: SourceModel
    bundle: BundleInfo | None
    toolchain: list[ToolchainStep] | None = Field(default=None, description="Only when a variant was selected.")
    cache: CacheStats
    duration_s: float

    @property
    def selected_variant(self) -> Variant | None:
        return next((v for v in self.variants if v.name == self.selected), None)

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    def to_json(self) -> str:
        """The report file's text (the key order readers have always seen)."""
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"


class MatrixVariant(_ReportModel):
    name: str
    runtime: str
    format: str
    precision: Precision
    accuracy: float | None
    accuracy_delta: float | None
    size_bytes: int
    host_p50_ms: float
    estimated_target_latency_ms: float
    target_latency_ms: float
    target_latency_source: LatencySource
    passed: bool
    verified_in: str | None
    why_not: str | None = Field(description="Why the variant was dropped, or None when it passed.")


class MatrixProfile(_ReportModel):
    """One profile of a multi-profile build; `error` set (and no variants) when its build stopped early."""

    profile: str
    exit_code: int
    error: str | None
    selected: str | None
    selection_reason: str | None = None
    runtime: str | None = None
    bundle: BundleInfo | None = None
    variants: list[MatrixVariant]
    notes: list[str] = []

    @property
    def selected_variant(self) -> MatrixVariant | None:
        return next((v for v in self.variants if v.name == self.selected), None)


class BuildMatrix(_ReportModel):
    """`<name>-<version>.matrix.json`: profiles × variants."""

    schema_version: int = MATRIX_SCHEMA_VERSION
    name: str
    version: str
    metric: str | None
    profiles: list[MatrixProfile]
    exit_code: int

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"
