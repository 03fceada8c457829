"""The hardware profile schema: a frozen pydantic model that refuses unknown fields.

A profile describes one kind of edge device: what the CPU can do, which accelerators and runtimes it
has (in order of preference), which precisions and opsets it supports, its memory and storage budget,
a simple roofline performance model used to estimate latency on the target, and default gates.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Precision = Literal["fp32", "fp16", "int8"]
RuntimeName = Literal["onnxruntime", "openvino", "tflite", "tensorrt"]
Arch = Literal["aarch64", "x86_64", "armv7l"]

# CPU features the builder reasons about; anything else is a typo caught at load time.
KNOWN_CPU_FEATURES = frozenset(
    {
        # x86
        "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
        "avx_vnni", "amx_int8", "amx_bf16",
        # arm
        "neon", "asimd", "fp16", "asimdhp", "dotprod", "i8mm", "bf16", "sve", "sve2", "crc32", "aes",
    }
)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CpuSpec(_Frozen):
    model: str = Field(description="CPU cores, e.g. '4x Cortex-A76 @ 2.4 GHz'.")
    cores: int = Field(gt=0, description="Number of CPU cores available to the application.")
    max_freq_ghz: float = Field(gt=0, description="Maximum sustained clock in GHz.")
    features: tuple[str, ...] = Field(description="ISA features, e.g. neon, dotprod, avx2, avx512_vnni.")

    @field_validator("features")
    @classmethod
    def _known_features(cls, features: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(features) - KNOWN_CPU_FEATURES)
        if unknown:
            raise ValueError(f"unknown CPU feature(s) {unknown}; known: {sorted(KNOWN_CPU_FEATURES)}")
        return features


class Accelerator(_Frozen):
    kind: Literal["gpu", "igpu", "npu", "tpu", "dla", "vpu"] = Field(description="Kind of accelerator.")
    name: str = Field(description="Product name of the accelerator.")
    int8_tops: float | None = Field(default=None, ge=0, description="Peak dense INT8 tera-ops per second.")
    fp16_tflops: float | None = Field(default=None, ge=0, description="Peak FP16 tera-FLOPs per second.")
    fp32_tflops: float | None = Field(default=None, ge=0, description="Peak FP32 tera-FLOPs per second.")
    sparse_int8_tops: float | None = Field(default=None, ge=0, description="Peak INT8 TOPS with 2:4 sparsity.")


class RuntimeSpec(_Frozen):
    name: RuntimeName = Field(description="Runtime that executes the model on the device.")
    execution_providers: tuple[str, ...] = Field(default=(), description="onnxruntime execution providers, in order.")
    delegates: tuple[str, ...] = Field(default=(), description="TFLite delegates, e.g. edgetpu, xnnpack.")
    devices: tuple[str, ...] = Field(default=(), description="OpenVINO devices, e.g. CPU, GPU.")
    precisions: tuple[Precision, ...] = Field(default=(), description="Precisions this runtime runs well here; empty = the profile's.")


class OpsetRange(_Frozen):
    min: int = Field(ge=1, description="Lowest ONNX opset the target runtime accepts.")
    max: int = Field(ge=1, description="Highest ONNX opset the target runtime accepts.")

    @model_validator(mode="after")
    def _ordered(self) -> "OpsetRange":
        if self.min > self.max:
            raise ValueError(f"opset.min ({self.min}) is greater than opset.max ({self.max})")
        return self


class MemoryBudget(_Frozen):
    ram_mb: int = Field(gt=0, description="RAM of the device in MiB.")
    storage_mb: int = Field(gt=0, description="Storage of the device in MiB.")
    model_ram_budget_mb: int = Field(gt=0, description="RAM a model may use at run time, in MiB.")
    model_storage_budget_mb: int = Field(gt=0, description="Storage a bundle may use, in MiB.")


class PerformanceModel(_Frozen):
    """A roofline model: per node, time = max(ops / (peak * efficiency), bytes / bandwidth) + overhead."""

    peak_ops_per_s: dict[Precision, float] = Field(description="Peak ops/s (1 MAC = 2 ops) per precision on the device the runtime uses.")
    memory_bandwidth_gb_s: float = Field(gt=0, description="Peak DRAM bandwidth in GB/s.")
    efficiency: float = Field(default=0.3, gt=0, le=1, description="Fraction of peak a real runtime reaches on small models.")
    per_node_overhead_us: float = Field(default=5.0, ge=0, description="Fixed cost per executed node in microseconds.")


class DefaultGates(_Frozen):
    max_accuracy_drop: float | None = Field(default=None, ge=0, description="Largest allowed accuracy drop vs. fp32, in metric units.")
    max_p95_latency_ms: float | None = Field(default=None, gt=0, description="Largest allowed p95 latency in milliseconds.")
    max_size_mb: float | None = Field(default=None, gt=0, description="Largest allowed model size in MB.")


class HardwareProfile(_Frozen):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", description="Unique profile name.")
    aliases: tuple[str, ...] = Field(default=(), description="Other names, e.g. 'jetson'.")
    description: str = Field(description="One line saying what device this is.")
    arch: Arch = Field(description="CPU architecture as `uname -m` prints it.")
    cpu: CpuSpec
    accelerators: tuple[Accelerator, ...] = Field(default=(), description="Accelerators on the board.")
    runtimes: tuple[RuntimeSpec, ...] = Field(min_length=1, description="Runtimes in order of preference.")
    precisions: tuple[Precision, ...] = Field(min_length=1, description="Precisions the target can run.")
    opset: OpsetRange
    memory: MemoryBudget
    performance: PerformanceModel
    default_gates: DefaultGates = DefaultGates()
    toolchains: dict[str, str] = Field(default_factory=dict, description="Container image per vendor step, e.g. edgetpu_compiler.")
    sources: tuple[str, ...] = Field(default=(), description="Where the figures come from (datasheets, vendor pages).")

    @model_validator(mode="after")
    def _performance_covers_precisions(self) -> "HardwareProfile":
        missing = [p for p in self.precisions if p not in self.performance.peak_ops_per_s]
        if missing:
            raise ValueError(f"performance.peak_ops_per_s has no figure for precision(s) {missing}")
        return self

    @property
    def all_names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def runtime(self, name: str) -> RuntimeSpec | None:
        """The runtime entry called `name`, or None when the profile does not list it."""
        return next((r for r in self.runtimes if r.name == name), None)

    def has_feature(self, feature: str) -> bool:
        return feature in self.cpu.features
