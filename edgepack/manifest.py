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

from pydantic import ConfigDict, Field, ValidationError

from edgepack.contract import ContractModel
from edgepack.errors import BundleError, first_validation_error, validation_error_field
from edgepack.report import IoQuantization, Lineage, Precision, TensorRTEngineSpec

MANIFEST_SCHEMA_VERSION = 1
SELFTEST_SCHEMA_VERSION = 1
BUNDLE_FORMAT = "edgepack-bundle/1"

Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="lower-case hex sha256")]
# ONNX dims are a size, a symbolic name, or neither (an unnamed dynamic dim, as Silero VAD's inputs have): null.
Dimension = Annotated[int | str | None, Field(description="a size, a name for a dimension of any size (e.g. 'batch'), "
                                                          "or null for an unnamed dimension of any size")]

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


class _ManifestModel(ContractModel):
    # No NaN or infinity: canonical JSON has no spelling for them (pydantic would write null).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class IoTensor(_ManifestModel):
    """One model input or output as the ONNX model declares it (every runtime adapter speaks these)."""

    name: str = Field(description="The ONNX input or output name; requests and responses use it.")
    dtype: str = Field(description="numpy dtype name: float32, int64 …")
    shape: list[Dimension] = Field(description="The ONNX shape; a string names a dimension of any size (e.g. 'batch'), "
                                               "null is a dimension of any size without a name.")


class IoSignature(_ManifestModel):
    inputs: list[IoTensor] = Field(min_length=1, description="The model's inputs, in ONNX order.")
    outputs: list[IoTensor] = Field(min_length=1, description="The model's outputs, in ONNX order.")


class ManifestMetrics(_ManifestModel):
    """The selected variant's deterministic measurements (host latencies live in the report, not here)."""

    metric: str = Field(description="The task metric accuracy is in: top1, agreement, cosine, mae or a user's module:function.")
    accuracy: float = Field(description="The metric's value on the build's validation set (higher is better except for mae).")
    accuracy_delta: float = Field(description="Candidate minus fp32 in the metric's units.")
    agreement: float = Field(description="Share of validation samples whose top-1 matches fp32.")
    cosine: float = Field(description="Mean cosine similarity of the outputs with fp32's.")
    max_abs_error: float = Field(description="Largest absolute difference from fp32's outputs over the validation set.")
    mean_abs_error: float = Field(description="Mean absolute difference from fp32's outputs over the validation set.")
    size_bytes: int = Field(description="Bytes of the model files together.")
    size_ratio: float = Field(description="size_bytes / the fp32 reference's.")
    estimated_target_latency_ms: float = Field(description="One inference on the target per the profile's roofline performance "
                                                           "model, ms.")
    fallback_nodes: list[str] = Field(description="Nodes left in float in a quantized model, sorted; empty for a float one.")
    sparsity: float | None = Field(description="Share of zeros in the pruned weight tensors; None when the model is not pruned.")


class ReferenceMetrics(_ManifestModel):
    """The fp32 reference the metrics are relative to."""

    accuracy: float = Field(description="The fp32 reference's metric value on the validation set.")
    size_bytes: int = Field(description="Size of the fp32 reference model, bytes.")


class ManifestGates(_ManifestModel):
    """The gates the build applied (None = not applied)."""

    max_accuracy_drop: float | None = Field(description="Largest drop of the metric from fp32 a variant could show, in the "
                                                        "metric's units (top1: a share, 0.01 = 1 point); None: not applied.")
    max_p95_latency_ms: float | None = Field(description="Largest p95 latency on the target a variant could show, ms; None: not "
                                                         "applied.")
    max_size_mb: float | None = Field(description="Largest model size a variant could have, MB (10^6 bytes); None: not applied.")
    min_agreement: float | None = Field(description="Smallest share of validation samples whose top-1 had to match fp32's; "
                                                    "None: not applied.")


class Envelope(_ManifestModel):
    """What a healthy device running this bundle looks like, for the fleet's gates."""

    estimated_target_latency_ms: float = Field(description="The roofline latency estimate on the target, ms "
                                                           "(metrics.estimated_target_latency_ms).")
    latency_note: str = Field(description="Says the latency is an estimate and that the fleet's gates compare devices with a "
                                          "control cohort.")
    output_distribution: str = Field(description="member#section holding the reference output quantile bins")


class EdgeTpuOp(_ManifestModel):
    index: int = Field(description="The op's index in the .tflite execution order.")
    op: str = Field(description="Coral's name for the op (the TFLite builtin name where Coral lists none).")
    device: Literal["edgetpu", "cpu"] = Field(description="Where the compiler is predicted to run it.")
    reason: str = Field(description="supported (with any limitation to confirm), or what the Edge TPU cannot run.")


class EdgeTpuFirstUnsupported(_ManifestModel):
    index: int = Field(description="Its index in the .tflite execution order.")
    op: str = Field(description="Coral's name for the op.")
    reason: str = Field(description="What the Edge TPU cannot run in it.")


class EdgeTpuInt8Only(_ManifestModel):
    ok: bool = Field(description="Whether every tensor is 8-bit (or an int32/int64 index tensor), as the Edge TPU needs.")
    float_tensors: list[str] = Field(description="Names of the tensors that are not (the first 20).")


class EdgeTpuTensor(_ManifestModel):
    name: str = Field(description="The .tflite tensor's name.")
    dtype: str = Field(description="Its numpy dtype (int8, uint8, float32 …).")


class EdgeTpuIo(_ManifestModel):
    inputs: list[EdgeTpuTensor] = Field(description="The .tflite model's inputs.")
    outputs: list[EdgeTpuTensor] = Field(description="The .tflite model's outputs.")


class EdgeTpuPlacement(_ManifestModel):
    """Static Edge TPU op placement from Coral's op table, and how to compile the model (builder.edgetpu)."""

    omit_when_none: ClassVar[frozenset[str]] = frozenset({"compiler_docker_command"})

    source: str = Field(description="Where the op table comes from (Coral's published list of supported operations).")
    compiler_version: str = Field(description="The Edge TPU compiler version the op table describes.")
    runtime_version: int = Field(description="The Edge TPU runtime version that compiler targets; an op that needs a newer one "
                                             "is unsupported.")
    supported_ops: list[str] = Field(description="The model's op types (Coral names) the Edge TPU runs.")
    unsupported_ops: list[str] = Field(description="The model's op types placed on the CPU for a reason of their own (not only "
                                                   "for following one).")
    first_unsupported: EdgeTpuFirstUnsupported | None = Field(description="The first op the Edge TPU cannot run, from which on "
                                                                          "everything runs on the CPU; None when every op maps.")
    tpu_ops: int = Field(description="Ops predicted to run on the Edge TPU.")
    cpu_ops: int = Field(description="Ops predicted to run on the CPU.")
    fully_mapped: bool = Field(description="Whether every op maps to the Edge TPU.")
    int8_only: EdgeTpuInt8Only = Field(description="Whether every tensor is 8-bit, as the Edge TPU needs.")
    io: EdgeTpuIo = Field(description="The .tflite model's input and output tensors and their dtypes.")
    placement: list[EdgeTpuOp] = Field(description="Every op in execution order with its predicted device and why.")
    compiler_command: str = Field(description="The edgetpu_compiler command that compiles the bundle's model (x86-64 Linux "
                                              "only).")
    compiler_docker_command: str | None = Field(default=None, description="Only when the profile names a toolchain image.")
    note: str = Field(description="What this prediction is, and how to compile and run the model on an Edge TPU.")


class FileEntry(_ManifestModel):
    sha256: Sha256Hex
    size: int = Field(ge=0, strict=True, description="The member's size in bytes.")


class ManifestContent(_ManifestModel):
    """Everything the builder decides about a bundle; `edgepack.bundle.write_bundle` adds `format` and `files`."""

    omit_when_none: ClassVar[frozenset[str]] = frozenset({"tensorrt", "edgetpu", "io_quantization"})

    schema_version: Literal[1] = Field(default=MANIFEST_SCHEMA_VERSION, description="1; a manifest without it is version 1")
    name: str = Field(min_length=1, description="The model's name from the build config.")
    version: str = Field(min_length=1,
                         description="The model's version from the build config; the agent refuses a lower one of the same name "
                                     "unless the fleet rolls back.")
    profile: str = Field(min_length=1, description="The hardware profile the bundle was built for.")
    profile_aliases: list[str] = Field(description="Other names of that profile; a device whose profile is one of them takes "
                                                   "the bundle too.")
    runtime: str = Field(min_length=1, description="onnxruntime | tensorrt | openvino | tflite")
    execution_providers: list[str] = Field(description="onnxruntime execution providers in order of preference")
    delegates: list[str] = Field(description="TFLite delegates (xnnpack, edgetpu)")
    devices: list[str] = Field(description="OpenVINO devices (CPU, GPU)")
    precision: Precision = Field(description="Numeric precision of the bundled model's compute.")
    variant: str = Field(description="The selected variant's name in the build report.")
    model: str = Field(description="The member the runtime loads.")
    model_files: list[str] = Field(description="Every member holding the model (an IR's .xml and .bin), sorted.")
    model_format: str = Field(description="onnx | openvino-ir | tflite")
    io: IoSignature = Field(description="The inputs and outputs as the ONNX model declares them; every runtime adapter takes "
                                        "and returns these.")
    selftest: str = Field(description="The member holding the self-test spec (selftest/cases.json).")
    reference_stats: str = Field(description="The member holding input/output quantile bins for drift detection.")
    sbom: str = Field(description="The member holding the CycloneDX SBOM.")
    lineage: Lineage = Field(description="Hashes of the source model, data, config and profile, and the tool versions (as in "
                                         "the report).")
    metrics: ManifestMetrics = Field(description="The selected variant's deterministic measurements (host latencies stay in the "
                                                 "report).")
    reference_metrics: ReferenceMetrics = Field(description="The fp32 reference the metrics are relative to.")
    gates: ManifestGates = Field(description="The gates the build applied.")
    envelope: Envelope = Field(description="What a healthy device running this bundle looks like, for the fleet's gates.")
    quantization: dict[str, Any] | None = Field(description="How the model was quantized; the keys depend on the quantizer.")
    tensorrt: TensorRTEngineSpec | None = Field(default=None,
                                                description="How the device builds its TensorRT engine; only in tensorrt "
                                                            "bundles.")
    edgetpu: EdgeTpuPlacement | None = Field(default=None,
                                             description="Static Edge TPU op placement; only in tflite bundles for a profile "
                                                         "with the edgetpu delegate.")
    io_quantization: IoQuantization | None = Field(
        default=None,
        description="How the ONNX inputs and outputs map to the .tflite tensors; only in tflite bundles.")
    created_by: str = Field(description="The builder that wrote it: edgepack VERSION.")

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON object written to manifest.json (before canonical serialisation)."""
        return self.model_dump(mode="json")


class BundleManifest(ManifestContent):
    """`manifest.json` as signed: the content plus the bundle format and every member's sha256 and size."""

    format: Literal["edgepack-bundle/1"] = Field(description="The bundle format; a reader refuses any other.")
    files: dict[str, FileEntry] = Field(description="Every member but manifest.json and manifest.sig, with its sha256 and size; "
                                                    "the signature covers this table.")

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

    atol: float = Field(ge=0, description="Absolute tolerance: rtol times the largest |expected| value, at least 1e-5.")
    rtol: float = Field(ge=0, description="Relative tolerance, by precision: fp32 1e-3, fp16 2e-2, int8 8e-2.")
    doc: str | None = Field(default=None, description="The comparison rule in words.")


class SelftestCase(_ManifestModel):
    inputs: dict[str, str] = Field(description="input name -> .npy member")
    outputs: dict[str, str] = Field(description="output name -> .npy member with the expected values")


class SelftestSpec(_ManifestModel):
    """`selftest/cases.json`: a few inputs and the outputs the device must reproduce before it switches."""

    schema_version: Literal[1] = Field(default=SELFTEST_SCHEMA_VERSION, description="1; the shape every bundle has carried.")
    runtime: str = Field(description="The runtime the cases run in (the bundle's runtime).")
    tolerance: SelftestTolerance = Field(description="How close the device's outputs must come to the expected ones.")
    cases: list[SelftestCase] = Field(description="The first validation samples (verify.selftest_samples) with the selected "
                                                  "model's outputs on the build host.")

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def parse_selftest_spec(data: object, source: str = "selftest/cases.json") -> SelftestSpec:
    """A self-test spec; BundleError with one line naming the field if malformed."""
    try:
        return SelftestSpec.model_validate(data)
    except ValidationError as exc:
        raise BundleError(first_validation_error(exc, source), member=source, field=validation_error_field(exc)) from None
