"""The bundle manifest (`manifest.json`) and the self-test spec (`selftest/cases.json`) as typed contracts.

    BundleManifest                     manifest.json, as signed
      ├─ (ManifestContent)             what the builder decides; `write_bundle` adds format and files
      │    ├─ io: IoSignature          inputs/outputs: [IoTensor {name, dtype, shape}]
      │    ├─ lineage: Lineage         source model, data, config, profile sha256 and tool versions
      │    ├─ metrics: ManifestMetrics · reference_metrics: ReferenceMetrics · gates: ManifestGates
      │    ├─ envelope: Envelope       what the fleet's gates expect of a device (estimate, output distribution)
      │    └─ tensorrt · edgetpu · io_quantization     present only for their runtime
      ├─ format: "edgepack-bundle/1"
      └─ files: {member: FileEntry {sha256, size}}

    SelftestSpec                       selftest/cases.json: tolerance and cases of member paths

Bytes: a manifest is written as canonical JSON of `to_json_dict()`, which gives the keys the builder
has always written (the runtime sections are left out when absent, never written as null), so a
bundle built from the same inputs stays byte-identical. `schema_version` 1 is the shape every bundle
has carried; a manifest without it is read as version 1. A change of shape bumps it.

Readers get a `BundleManifest` from `edgepack.bundle` (open_bundle, read_manifest_unverified) and read
attributes; `parse_manifest` turns a malformed one into one BundleError line naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer

from edgepack.errors import BundleError, first_validation_error, validation_error_field
from edgepack.report import IoQuantization, Lineage, Precision, TensorRTEngineSpec

MANIFEST_SCHEMA_VERSION = 1
SELFTEST_SCHEMA_VERSION = 1
BUNDLE_FORMAT = "edgepack-bundle/1"

Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="lower-case hex sha256")]
Dimension = Annotated[int | str, Field(description="a size, or a name for a dimension of any size (e.g. 'batch')")]

__all__ = [
    "BUNDLE_FORMAT",
    "MANIFEST_SCHEMA_VERSION",
    "BundleManifest",
    "EdgeTpuPlacement",
    "Envelope",
    "FileEntry",
    "IoSignature",
    "IoTensor",
    "ManifestContent",
    "ManifestGates",
    "ManifestMetrics",
    "ReferenceMetrics",
    "SelftestSpec",
    "parse_manifest",
    "parse_selftest_spec",
]


class _ManifestModel(BaseModel):
    # No NaN or infinity: canonical JSON has no spelling for them (pydantic would write null).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    # Optional fields written only when set: their keys never appeared as null in a manifest.
    omit_when_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _leave_out_absent(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        for key in self.omit_when_none:
            if data.get(key, ...) is None:
                del data[key]
        return data


class IoTensor(_ManifestModel):
    """One model input or output as the ONNX model declares it (every runtime adapter speaks these)."""

    name: str
    dtype: str = Field(description="numpy dtype name: float32, int64 …")
    shape: list[Dimension]


class IoSignature(_ManifestModel):
    inputs: list[IoTensor] = Field(min_length=1)
    outputs: list[IoTensor] = Field(min_length=1)


class ManifestMetrics(_ManifestModel):
    """The selected variant's deterministic measurements (host latencies live in the report, not here)."""

    metric: str
    accuracy: float
    accuracy_delta: float = Field(description="Candidate minus fp32 in the metric's units.")
    agreement: float
    cosine: float
    max_abs_error: float
    mean_abs_error: float
    size_bytes: int
    size_ratio: float
    estimated_target_latency_ms: float
    fallback_nodes: list[str]
    sparsity: float | None


class ReferenceMetrics(_ManifestModel):
    """The fp32 reference the metrics are relative to."""

    accuracy: float
    size_bytes: int


class ManifestGates(_ManifestModel):
    """The gates the build applied (None = not applied)."""

    max_accuracy_drop: float | None
    max_p95_latency_ms: float | None
    max_size_mb: float | None
    min_agreement: float | None


class Envelope(_ManifestModel):
    """What a healthy device running this bundle looks like, for the fleet's gates."""

    estimated_target_latency_ms: float
    latency_note: str
    output_distribution: str = Field(description="member#section holding the reference output quantile bins")


class EdgeTpuOp(_ManifestModel):
    index: int
    op: str
    device: Literal["edgetpu", "cpu"]
    reason: str


class EdgeTpuFirstUnsupported(_ManifestModel):
    index: int
    op: str
    reason: str


class EdgeTpuInt8Only(_ManifestModel):
    ok: bool
    float_tensors: list[str]


class EdgeTpuTensor(_ManifestModel):
    name: str
    dtype: str


class EdgeTpuIo(_ManifestModel):
    inputs: list[EdgeTpuTensor]
    outputs: list[EdgeTpuTensor]


class EdgeTpuPlacement(_ManifestModel):
    """Static Edge TPU op placement from Coral's op table, and how to compile the model (builder.edgetpu)."""

    omit_when_none: ClassVar[frozenset[str]] = frozenset({"compiler_docker_command"})

    source: str
    compiler_version: str
    runtime_version: int
    supported_ops: list[str]
    unsupported_ops: list[str]
    first_unsupported: EdgeTpuFirstUnsupported | None
    tpu_ops: int
    cpu_ops: int
    fully_mapped: bool
    int8_only: EdgeTpuInt8Only
    io: EdgeTpuIo
    placement: list[EdgeTpuOp]
    compiler_command: str
    compiler_docker_command: str | None = Field(default=None, description="Only when the profile names a toolchain image.")
    note: str


class FileEntry(_ManifestModel):
    sha256: Sha256Hex
    size: int = Field(ge=0, strict=True)


class ManifestContent(_ManifestModel):
    """Everything the builder decides about a bundle; `edgepack.bundle.write_bundle` adds `format` and `files`."""

    omit_when_none: ClassVar[frozenset[str]] = frozenset({"tensorrt", "edgetpu", "io_quantization"})

    schema_version: Literal[1] = Field(default=MANIFEST_SCHEMA_VERSION, description="1; a manifest without it is version 1")
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    profile: str = Field(min_length=1, description="The hardware profile the bundle was built for.")
    profile_aliases: list[str]
    runtime: str = Field(min_length=1, description="onnxruntime | tensorrt | openvino | tflite")
    execution_providers: list[str] = Field(description="onnxruntime execution providers in order of preference")
    delegates: list[str] = Field(description="TFLite delegates (xnnpack, edgetpu)")
    devices: list[str] = Field(description="OpenVINO devices (CPU, GPU)")
    precision: Precision
    variant: str
    model: str = Field(description="The member the runtime loads.")
    model_files: list[str]
    model_format: str = Field(description="onnx | openvino-ir | tflite")
    io: IoSignature
    selftest: str = Field(description="The member holding the self-test spec (selftest/cases.json).")
    reference_stats: str = Field(description="The member holding input/output quantile bins for drift detection.")
    sbom: str = Field(description="The member holding the CycloneDX SBOM.")
    lineage: Lineage
    metrics: ManifestMetrics
    reference_metrics: ReferenceMetrics
    gates: ManifestGates
    envelope: Envelope
    quantization: dict[str, Any] | None = Field(description="How the model was quantized; the keys depend on the quantizer.")
    tensorrt: TensorRTEngineSpec | None = None
    edgetpu: EdgeTpuPlacement | None = None
    io_quantization: IoQuantization | None = None
    created_by: str

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON object written to manifest.json (before canonical serialisation)."""
        return self.model_dump(mode="json")


class BundleManifest(ManifestContent):
    """`manifest.json` as signed: the content plus the bundle format and every member's sha256 and size."""

    format: Literal["edgepack-bundle/1"]
    files: dict[str, FileEntry]

    @property
    def content(self) -> ManifestContent:
        """The manifest without format and files, e.g. to re-sign changed members."""
        return ManifestContent.model_validate(self.model_dump(exclude={"format", "files"}))

    def lists(self, member: str) -> bool:
        """Whether `member` is a listed (signed) member of the bundle."""
        return member in self.files


def _refuse(exc: ValidationError, source: str) -> BundleError:
    return BundleError(first_validation_error(exc, source), member="manifest.json", field=validation_error_field(exc))


def parse_manifest(data: Mapping[str, Any], source: str = "manifest.json") -> BundleManifest:
    """A signed manifest's JSON object as a BundleManifest; BundleError with one line naming the field if malformed."""
    try:
        return BundleManifest.model_validate(dict(data))
    except ValidationError as exc:
        raise _refuse(exc, source) from None


def parse_content(data: ManifestContent | Mapping[str, Any], source: str = "manifest") -> ManifestContent:
    """What a writer hands to `write_bundle`: a ManifestContent as is, or a mapping validated into one."""
    if isinstance(data, ManifestContent):
        return data
    try:
        return ManifestContent.model_validate({k: v for k, v in data.items() if k not in ("format", "files")})
    except ValidationError as exc:
        raise _refuse(exc, source) from None


# ---------------------------------------------------------------------------------------------------
# selftest/cases.json


class SelftestTolerance(_ManifestModel):
    """|actual - expected| <= atol + rtol * |expected|, elementwise."""

    omit_when_none: ClassVar[frozenset[str]] = frozenset({"doc"})

    atol: float = Field(ge=0)
    rtol: float = Field(ge=0)
    doc: str | None = None


class SelftestCase(_ManifestModel):
    inputs: dict[str, str] = Field(description="input name -> .npy member")
    outputs: dict[str, str] = Field(description="output name -> .npy member with the expected values")


class SelftestSpec(_ManifestModel):
    """`selftest/cases.json`: a few inputs and the outputs the device must reproduce before it switches."""

    schema_version: Literal[1] = SELFTEST_SCHEMA_VERSION
    runtime: str
    tolerance: SelftestTolerance
    cases: list[SelftestCase]

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def parse_selftest_spec(data: object, source: str = "selftest/cases.json") -> SelftestSpec:
    """A self-test spec; BundleError with one line naming the field if malformed."""
    try:
        return SelftestSpec.model_validate(data)
    except ValidationError as exc:
        raise BundleError(first_validation_error(exc, source), member=source, field=validation_error_field(exc)) from None
