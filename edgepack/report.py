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

from pydantic import ConfigDict, Field

from edgepack.contract import ContractModel

REPORT_SCHEMA_VERSION = 1
MATRIX_SCHEMA_VERSION = 1

Precision = Literal["fp32", "fp16", "int8"]
LatencySource = Literal["host", "estimate"]


class _ReportModel(ContractModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)


class LatencyStats(_ReportModel):
    """Host latency of single-sample inference after warm-up, in milliseconds."""

    p50: float = Field(description="Median of the timed runs, ms.")
    p95: float = Field(description="95th percentile of the timed runs, ms.")
    mean: float = Field(description="Mean of the timed runs, ms.")
    runs: int = Field(description="Timed single-sample runs after the warm-up (benchmark.runs).")
    threads: int = Field(description="Intra-op threads the runtime was given (benchmark.threads; 0 = the runtime's default).")


class FailedGate(_ReportModel):
    """One gate a variant misses: the measured value, the threshold and a sentence."""

    gate: Literal["max_accuracy_drop", "min_agreement", "max_p95_latency_ms", "max_size_mb"] = Field(
        description="The gate missed (a key of the config's gates).")
    value: float = Field(description="The variant's value: accuracy drop in the metric's units, agreement share, p95 on the "
                                     "target in ms, or size in MB.")
    threshold: float = Field(description="The gate's limit, in the unit of value.")
    message: str = Field(description="One sentence saying how the variant misses the gate.")


class TensorRTEngineSpec(_ReportModel):
    """How the device builds its TensorRT engine from the bundled ONNX (engines are device-specific)."""

    build_on_device: bool = Field(description="Always true: the engine depends on the device's GPU and TensorRT version, so the "
                                              "device builds it.")
    explicit_quantization: bool = Field(description="True for int8: TensorRT takes the scales from the model's Q/DQ nodes "
                                                    "instead of calibrating.")
    sparse_tensor_cores: bool = Field(description="Whether the engine uses 2:4 structured sparsity (a 2:4-pruned model on a "
                                                  "board with sparse tensor cores).")
    trtexec: str = Field(description="The trtexec command line that builds the same engine by hand.")
    doc: str = Field(description="Who builds and caches the engine on the device.")


class IoTensorQuantization(_ReportModel):
    """One ONNX input or output and the .tflite tensor it maps to."""

    name: str = Field(description="The ONNX input or output name (the name requests and responses use).")
    tflite_name: str = Field(description="The .tflite tensor it maps to.")
    dtype: str = Field(description="The .tflite tensor's numpy dtype: int8/uint8 for integer IO, float32 otherwise.")
    scale: float | None = Field(description="Quantization scale of an integer tensor (real = (q - zero_point) * scale); None "
                                            "for a float one.")
    zero_point: int | None = Field(description="Quantization zero point of an integer tensor; None for a float one.")
    shape: list[int] = Field(description="The .tflite tensor's shape (channel-last where the converter moved the channels).")
    transpose: list[int] | None = Field(description="Axis permutation from the ONNX layout to the .tflite tensor (input) or "
                                                    "back (output); None when the layouts agree.")


class IoQuantization(_ReportModel):
    inputs: list[IoTensorQuantization] = Field(description="One entry per ONNX input, in ONNX order.")
    outputs: list[IoTensorQuantization] = Field(description="One entry per ONNX output, in ONNX order.")
    doc: str = Field(description="How to read the entries: the dequantization formula and the direction of transpose.")


class VariantMeasurement(_ReportModel):
    """What verification and benchmarking found for one candidate, before it is judged against fp32."""

    omit_when_none: ClassVar[frozenset[str]] = frozenset({"tensorrt", "edgetpu", "io_quantization", "converter", "dropped_reason"})

    name: str = Field(description="Unique in a build: fp32, int8, ov-int8, tflite-full-int8 …")
    precision: Precision = Field(description="Numeric precision of the variant's compute: fp32, fp16 or int8.")
    format: str = Field(description="onnx | openvino-ir | tflite")
    runtime: str = Field(description="The runtime the bundle declares: onnxruntime | tensorrt | openvino | tflite")
    verified_in: str = Field(description="The runtime the accuracy and latency were measured in.")
    size_bytes: int = Field(description="Bytes of the variant's model files together (an IR's .xml and .bin both count).")
    model_sha256: str = Field(description="One sha256 over the variant's model files (member names and file hashes), the "
                                          "latency cache's key.")
    metric: str = Field(description="The task metric accuracy is in: top1, agreement, cosine, mae or a user's module:function.")
    accuracy: float = Field(description="The metric's value on the validation set, run in verified_in (higher is better except "
                                        "for mae).")
    agreement: float = Field(description="Share of samples whose top-1 matches fp32.")
    cosine: float = Field(description="Mean cosine similarity of the outputs with fp32's (per sample, averaged over outputs).")
    max_abs_error: float = Field(description="Largest absolute difference from fp32's outputs over the validation set.")
    mean_abs_error: float = Field(description="Mean absolute difference from fp32's outputs over the validation set (averaged "
                                              "over outputs).")
    latency_ms: LatencyStats = Field(description="Host latency measured in verified_in on the build machine.")
    latency_cached: bool = Field(description="Whether latency_ms came from the build cache (same runtime, model, benchmark "
                                             "settings and CPU) instead of a new run.")
    estimated_target_latency_ms: float = Field(description="One inference on the target per the profile's roofline performance "
                                                           "model, ms.")
    target_latency_ms: float = Field(description="p50 on the target: the host's measurement where the host is the target, else the estimate.")
    target_latency_p95_ms: float = Field(description="p95 on the target: the host's p95 where the host is the target, else the "
                                                     "estimate; the max_p95_latency_ms gate reads it.")
    target_latency_source: LatencySource = Field(description="host: measured on the build machine, which stands for the target; "
                                                             "estimate: the roofline estimate.")
    fallback_nodes: list[str] = Field(description="Nodes left in float in a quantized variant (by the accuracy fallback or the "
                                                  "quantizer), sorted; empty for float variants.")
    sparsity: float | None = Field(description="Share of zeros in the pruned weight tensors (prune pass); None when the variant "
                                               "is not pruned.")
    quantization: dict[str, Any] | None = Field(description="How the variant was quantized; the keys depend on the quantizer.")
    runnable: bool = Field(description="Whether the profile can run this precision in this runtime.")
    notes: list[str] = Field(description="Sentences about this variant: accuracy fallback, INT8 that does not pay on this host …")
    tensorrt: TensorRTEngineSpec | None = Field(default=None,
                                                description="How the device builds its TensorRT engine; only for tensorrt "
                                                            "variants.")
    edgetpu: dict[str, Any] | None = Field(default=None, description="Static Edge TPU op placement (builder.edgetpu).")
    io_quantization: IoQuantization | None = Field(
        default=None,
        description="How each ONNX input and output maps to the .tflite tensors; only for tflite variants.")
    converter: dict[str, Any] | None = Field(default=None, description="The converter and its settings (TFLite).")
    dropped_reason: str | None = Field(default=None,
                                       description="Why the build ruled the variant out before the gates (nothing quantized, "
                                                   "its target refused it, the profile cannot run it); absent otherwise.")


class ModelFamily(_ReportModel):
    """What kind of network the builder found (builder.family), and the INT8 recipe it started from."""

    name: Literal["transformer", "recurrent", "embedding", "conv", "other"] = Field(description="The family.")
    reason: str = Field(description="What in the graph says so.")
    embedding_share: float = Field(ge=0, le=1, description="Weight tables an integer input indexes, as a share of all weights.")
    int8_recipe: dict[str, Any] | str = Field(description="The static INT8 settings the family starts from, or `default`.")


class FailedVariant(_ReportModel):
    """A variant the build tried and could not make or run: the build went on without it."""

    name: str = Field(description="The variant it would have been (int8, ov-fp16, tflite-full-int8 …).")
    runtime: str = Field(description="The runtime it was for.")
    precision: Precision = Field(description="Numeric precision it would have had.")
    stage: Literal["build", "verify"] = Field(description="build: a pass or converter raised; verify: its runtime could "
                                                          "not load or run it.")
    reason: str = Field(description="What went wrong, in one line (the exception's type and first line).")

    def line(self) -> str:
        """The failure as one sentence, as the CLI and the progress display say it."""
        return (f"{self.name} ({self.runtime}, {self.precision}) could not be "
                f"{'built' if self.stage == 'build' else 'run'}: {self.reason}")


class Variant(VariantMeasurement):
    """A candidate judged against the fp32 reference and the gates, with the build's decision about it."""

    accuracy_delta: float = Field(description="Candidate minus fp32 in the metric's units.")
    size_ratio: float = Field(description="size_bytes / the fp32 reference's size_bytes.")
    latency_ratio: float | None = Field(description="Host p50 / the fp32 reference's host p50; None when that is 0.")
    failed_gates: list[FailedGate] = Field(description="Every gate the variant misses; empty when it meets them all.")
    passed: bool = Field(description="Whether the variant meets every gate, was not dropped and runs on the profile.")
    decision: str = Field(default="", description="selected | dropped: why | kept as a candidate (set by selection).")


class GateThresholds(_ReportModel):
    """The gates a build applies: the config's over the profile's defaults (None = not applied)."""

    max_accuracy_drop: float | None = Field(default=None,
                                            description="Largest drop of the metric from fp32 a variant may show, in the "
                                                        "metric's units (top1: a share, 0.01 = 1 point); None: not applied.")
    max_p95_latency_ms: float | None = Field(default=None,
                                             description="Largest p95 latency on the target (target_latency_p95_ms) a variant "
                                                         "may show, ms; None: not applied.")
    max_size_mb: float | None = Field(default=None,
                                      description="Largest model size a variant may have, MB (10^6 bytes); None: not applied.")
    min_agreement: float | None = Field(default=None,
                                        description="Smallest share of validation samples whose top-1 must match fp32's; None: "
                                                    "not applied.")


class Gates(GateThresholds):
    passed: bool = Field(description="Whether a variant passed every gate (and was selected).")


class HostInfo(_ReportModel):
    machine: str = Field(description="The build machine's architecture (x86_64, aarch64).")
    cpu: str = Field(description="The build machine's CPU model name.")
    cpu_features: list[str] = Field(description="The build CPU's feature flags (from /proc/cpuinfo), sorted.")
    is_target: bool = Field(description="Whether host measurements stand for the target (same ISA, no accelerator).")
    reason: str = Field(description="One sentence saying why the host does or does not stand for the target.")


class ReferenceSummary(_ReportModel):
    name: str = Field(description="fp32: the reference model every variant is compared with.")
    accuracy: float = Field(description="The fp32 reference's metric value on the validation set.")
    size_bytes: int = Field(description="Size of the fp32 reference model, bytes.")
    validation_samples: int = Field(description="Validation samples every variant was verified on.")


class PassRecord(_ReportModel):
    name: str = Field(description="The step's label (a pass may run several times, e.g. int8-sparse).")
    pass_name: str = Field(alias="pass", description="The registered pass that ran (check, opset-upgrade, int8-static …).")
    seconds: float = Field(description="Wall-clock seconds the step took, a cache hit's lookup included.")
    cached: bool = Field(description="Whether the output came from the build cache.")


class SensitivityEntry(_ReportModel):
    """How much quantizing one node alone moves the outputs away from fp32 (higher = more harmful)."""

    node: str = Field(description="The ONNX node's name.")
    op_type: str = Field(description="Its ONNX op type (Conv, MatMul, Gemm …).")
    macs: int = Field(description="Multiply-accumulates of the node, counted from the statically shaped graph.")
    score: float = Field(description="Mean relative absolute error of the outputs against fp32 with only this node quantized.")


class Lineage(_ReportModel):
    source_model_sha256: str = Field(description="sha256 of the source ONNX file the build read.")
    calibration_sha256: str | None = Field(description="sha256 of the calibration data file; None without calibration data.")
    validation_sha256: str | None = Field(description="sha256 of the validation data file; None without validation data.")
    config_sha256: str = Field(description="sha256 of the validated build config as canonical JSON (not of the file's bytes).")
    profile_sha256: str = Field(description="sha256 of the validated hardware profile as canonical JSON.")
    tools: dict[str, str] = Field(description="Versions of the tools that decide the output (edgepack, onnx, onnxruntime, "
                                              "numpy).")


class SourceModel(_ReportModel):
    path: str = Field(description="The source ONNX file the build read (the config's model, or --model).")
    sha256: str = Field(description="sha256 of that file.")
    opset: int | None = Field(description="The source model's opset before the upgrade pass.")


class BundleInfo(_ReportModel):
    path: str = Field(description="Where the .edgepack file was written (in the output folder).")
    sha256: str = Field(description="sha256 of the whole .edgepack file.")
    size_bytes: int = Field(description="Size of the .edgepack file, bytes.")


class ToolchainStep(_ReportModel):
    """A vendor-toolchain step (edgetpu_compiler, trtexec) for the selected variant."""

    step: str = Field(description="The step's name (edgetpu_compiler, trtexec).")
    image: str = Field(description="The container image the profile names for the step.")
    command: str = Field(description="The command line run in the container.")
    status: Literal["ran", "skipped", "failed"] = Field(description="ran; skipped (no --toolchain docker, no Docker engine or "
                                                                    "SDK, or nothing to do for this candidate); failed.")
    message: str = Field(description="One line on what became of the step.")


class CacheStats(_ReportModel):
    hits: int = Field(description="Build-cache lookups this build answered from the cache (pass outputs and results).")
    misses: int = Field(description="Build-cache lookups that found nothing.")
    enabled: bool = Field(description="False with --no-cache.")


class BuildReport(_ReportModel):
    """`<name>-<version>-<profile>.report.json`."""

    omit_when_none: ClassVar[frozenset[str]] = frozenset({"toolchain"})

    schema_version: int = Field(default=REPORT_SCHEMA_VERSION, description="Shape of this document; 1 so far.")
    name: str = Field(description="The model's name from the build config.")
    version: str = Field(description="The model's version from the build config.")
    profile: str = Field(description="The hardware profile built for.")
    profile_description: str = Field(description="The profile's description.")
    runtime: str = Field(description="The selected variant's runtime, else the profile's preferred one.")
    runtimes: list[str] = Field(description="The profile's runtimes in order of preference.")
    created_by: str = Field(description="The builder that wrote it: edgepack VERSION.")
    host: HostInfo = Field(description="The build machine, and whether its measurements stand for the target.")
    metric: str = Field(description="The task metric from the build config (top1, agreement, cosine, mae or module:function).")
    selected: str | None = Field(description="The variant in the bundle; None when none passed (the build exits 1).")
    selection_reason: str = Field(description="One sentence on why that variant was selected, or why none was.")
    gates: Gates = Field(description="The gates applied (the config's over the profile's defaults), and whether a variant "
                                     "passed.")
    reference: ReferenceSummary = Field(description="The fp32 reference every variant is compared with.")
    variants: list[Variant] = Field(description="Every candidate built, in build order, with its measurements and decision.")
    failed_variants: list[FailedVariant] = Field(default=[], description="Variants that could not be built or run, with "
                                                 "why; the build selected among the rest.")
    model_family: ModelFamily | None = Field(default=None, description="The kind of network found, and the INT8 recipe it "
                                                                       "started from.")
    notes: list[str] = Field(description="Sentences about the whole build (skipped precisions or runtimes, dynamic shapes, "
                                         "estimate caveats …).")
    passes: list[PassRecord] = Field(description="Every pass step the build ran, in order.")
    sensitivity: dict[str, list[SensitivityEntry]] = Field(description="Per variant that needed the INT8 fallback: nodes ranked by harm.")
    estimate_label: str = Field(description="How the target latency estimate is made.")
    lineage: Lineage = Field(description="Hashes of every input and the tool versions (the manifest carries the same).")
    source_model: SourceModel = Field(description="The ONNX model the build started from.")
    bundle: BundleInfo | None = Field(description="The signed bundle written; None when no variant was selected.")
    toolchain: list[ToolchainStep] | None = Field(default=None, description="Only when a variant was selected.")
    cache: CacheStats = Field(description="Build-cache use of this build.")
    duration_s: float = Field(description="Wall-clock seconds the build took.")
    time_budget_s: float | None = Field(default=None, description="The build's time budget (--time-budget); None: none.")
    cut_short: list[str] = Field(default=[], description="Optional steps not run because the time budget was spent "
                                                          "(accuracy fallback builds, OpenVINO accuracy control).")

    @property
    def selected_variant(self) -> Variant | None:
        return next((v for v in self.variants if v.name == self.selected), None)

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    def to_json(self) -> str:
        """The report file's text (the key order readers have always seen)."""
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"


class MatrixVariant(_ReportModel):
    name: str = Field(description="The variant's name, as in the profile's report.")
    runtime: str = Field(description="The runtime the bundle would declare: onnxruntime | tensorrt | openvino | tflite")
    format: str = Field(description="onnx | openvino-ir | tflite")
    precision: Precision = Field(description="Numeric precision of the variant's compute.")
    accuracy: float | None = Field(description="The task metric's value on the validation set.")
    accuracy_delta: float | None = Field(description="Candidate minus fp32 in the metric's units.")
    size_bytes: int = Field(description="Bytes of the variant's model files.")
    host_p50_ms: float = Field(description="Median latency measured on the build machine (the report's latency_ms.p50), ms.")
    estimated_target_latency_ms: float = Field(description="The profile's roofline estimate on the target, ms.")
    target_latency_ms: float = Field(description="p50 on the target (the host's measurement or the estimate, per "
                                                 "target_latency_source), ms.")
    target_latency_source: LatencySource = Field(description="host: measured on the build machine, which stands for the target; "
                                                             "estimate: the roofline estimate.")
    passed: bool = Field(description="Whether the variant met every gate, was not dropped and runs on the profile.")
    verified_in: str | None = Field(description="The runtime the accuracy and latency were measured in.")
    why_not: str | None = Field(description="Why the variant was dropped, or None when it passed.")


class MatrixProfile(_ReportModel):
    """One profile of a multi-profile build; `error` set (and no variants) when its build stopped early."""

    profile: str = Field(description="The hardware profile.")
    exit_code: int = Field(description="This profile's build exit code: 0 a variant selected, 1 none passed the gates, 2 bad "
                                       "input.")
    error: str | None = Field(description="The one line that stopped this profile's build; None when it finished.")
    selected: str | None = Field(description="The variant in this profile's bundle; None when none.")
    selection_reason: str | None = Field(default=None,
                                         description="Why (the profile report's selection_reason); None when the build stopped "
                                                     "early.")
    runtime: str | None = Field(default=None,
                                description="The selected variant's runtime, else the profile's preferred one; None when the "
                                            "build stopped early.")
    bundle: BundleInfo | None = Field(default=None, description="The profile's bundle; None when none was written.")
    variants: list[MatrixVariant] = Field(description="Every candidate of the profile's build; empty when it stopped early.")
    notes: list[str] = Field(default=[], description="The profile report's notes.")

    @property
    def selected_variant(self) -> MatrixVariant | None:
        return next((v for v in self.variants if v.name == self.selected), None)


class BuildMatrix(_ReportModel):
    """`<name>-<version>.matrix.json`: profiles × variants."""

    schema_version: int = Field(default=MATRIX_SCHEMA_VERSION, description="Shape of this document; 1 so far.")
    name: str = Field(description="The model's name from the build config.")
    version: str = Field(description="The model's version from the build config.")
    metric: str | None = Field(description="The task metric from the build config.")
    profiles: list[MatrixProfile] = Field(description="One entry per profile, in build order.")
    exit_code: int = Field(description="The highest exit code of the profiles: the command's exit code.")

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"
