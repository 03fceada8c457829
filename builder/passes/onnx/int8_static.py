"""Static INT8 in Q/DQ form, calibrated on the user's data, with per-channel weights.

Activation signedness, `reduce_range` and symmetry come from the profile (`builder.int8_scheme`)
unless the config forces them. The calibration ranges are cached per (model, data, method), so the
accuracy-fallback loop re-quantizes with more float nodes without calibrating again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from builder.int8_scheme import choose_int8_scheme
from builder.passes.base import Pass, PassConfig, PassContext, PassOutput
from edgepack.errors import DataError, PassError
from edgepack.files import file_sha256

# Compute ops plus the ops onnxruntime keeps in INT8 between them (QLinear fusions), so activations
# stay quantized along a chain. Element-wise ops outside this list (HardSigmoid, Mul, Div in squeeze-
# excitation blocks) are left float: quantizing them only adds Q/DQ pairs that cost more than they save
# (measured on the PP-OCR classifier, 1 thread: every-op quantize_static 2.9x slower than fp32).
COMPUTE_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")
DEFAULT_OP_TYPES = COMPUTE_OP_TYPES + ("MaxPool", "AveragePool", "GlobalAveragePool", "Relu", "Clip", "Add", "Concat", "Flatten", "Reshape")


class Int8StaticConfig(PassConfig):
    calibration_method: Literal["minmax", "entropy", "percentile"] = Field(default="minmax", description="How activation ranges are chosen.")
    percentile: float = Field(default=99.999, gt=90, le=100, description="Percentile for calibration_method=percentile.")
    calibration_samples: int = Field(default=256, gt=0, description="Calibration samples used at most.")
    per_channel: bool = Field(default=True, description="Per-output-channel weight scales.")
    activation_type: Literal["auto", "int8", "uint8"] = Field(default="auto", description="auto = from the profile's CPU features.")
    reduce_range: Literal["auto", True, False] = Field(default="auto", description="7-bit weights; auto = from the profile.")
    op_types: tuple[str, ...] | None = Field(default=None, description="Ops to quantize (default: compute ops and the ops onnxruntime keeps in INT8 between them).")
    matmul_const_b_only: bool = Field(default=False, description="Quantize only MatMuls whose second input is a weight (the transformer recipe: attention's activation-by-activation MatMuls stay float).")
    nodes_to_exclude: tuple[str, ...] = Field(default=(), description="Nodes kept in float (the accuracy fallback).")
    only_nodes: tuple[str, ...] | None = Field(default=None, description="Quantize only these nodes (sensitivity analysis).")
    depthwise: Literal["auto", "quantize", "float"] = Field(
        default="auto", description="Depthwise convs: auto = keep them float on x86 CPU targets, where onnxruntime's INT8 depthwise kernels lose to float.")

    @model_validator(mode="after")
    def _exclusive(self) -> "Int8StaticConfig":
        if self.only_nodes is not None and self.nodes_to_exclude:
            raise ValueError("only_nodes and nodes_to_exclude cannot be combined")
        return self


class _Reader:
    """onnxruntime CalibrationDataReader over the calibration split."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = feeds
        self._iter = iter(feeds)

    def get_next(self):
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self._feeds)


class Int8Static(Pass):
    name = "int8-static"
    description = "Static INT8 quantization in Q/DQ form with calibration on the user's data."
    Config = Int8StaticConfig
    uses_calibration_data = True

    def scheme(self, profile) -> dict:
        scheme = dict(choose_int8_scheme(profile))
        if self.config.activation_type != "auto":
            scheme["activation_type"] = self.config.activation_type
            scheme["reason"] = f"forced by config (profile rule would be: {scheme['reason']})"
        if self.config.reduce_range != "auto":
            scheme["reduce_range"] = bool(self.config.reduce_range)
        return scheme

    def run(self, input_model: Path, ctx: PassContext) -> PassOutput:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        if ctx.data is None or ctx.data.calibration is None:
            raise DataError("int8 needs calibration data: set data.calibration in edgepack.yaml (or drop int8 from optimize.precisions)")
        scheme = self.scheme(ctx.profile)
        method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[self.config.calibration_method]
        extra_options = {
            "ActivationSymmetric": scheme["symmetric_activations"],
            "WeightSymmetric": scheme["symmetric_weights"],
        }
        if self.config.calibration_method == "percentile":
            extra_options["CalibPercentile"] = self.config.percentile
        if self.config.matmul_const_b_only:
            extra_options["MatMulConstBOnly"] = True
        feeds = list(ctx.data.feeds("calibration", limit=self.config.calibration_samples))
        # Calibration ranges depend on the model, the data and the method only: share them between runs.
        range_key = hashlib.sha256(
            "|".join(
                [file_sha256(input_model), ctx.data.calibration.sha256, self.config.calibration_method,
                 str(self.config.percentile), str(len(feeds)), str(scheme["symmetric_activations"]),
                 ",".join(sorted(self.config.op_types or DEFAULT_OP_TYPES))]
            ).encode()
        ).hexdigest()[:32]
        cache_root = ctx.cache_dir if ctx.cache_dir is not None else ctx.work_dir
        calibration_cache = cache_root / "calibration" / f"{range_key}.json"
        calibration_cache.parent.mkdir(parents=True, exist_ok=True)
        output = ctx.scratch("int8.onnx")
        qtype = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
        nodes_to_quantize = list(self.config.only_nodes) if self.config.only_nodes is not None else None
        nodes_to_exclude = list(self.config.nodes_to_exclude)
        depthwise = _depthwise_convs(input_model)
        keep_depthwise_float = self.config.depthwise == "float" or (
            self.config.depthwise == "auto" and ctx.profile.arch == "x86_64" and ctx.profile.runtimes[0].name == "onnxruntime"
        )
        if keep_depthwise_float and depthwise and nodes_to_quantize is None:
            nodes_to_exclude += [name for name in depthwise if name not in nodes_to_exclude]
        try:
            quantize_static(
                str(input_model),
                str(output),
                calibration_data_reader=_Reader(feeds),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(self.config.op_types or DEFAULT_OP_TYPES),
                per_channel=self.config.per_channel,
                reduce_range=scheme["reduce_range"],
                activation_type=qtype[scheme["activation_type"]],
                weight_type=qtype[scheme["weight_type"]],
                nodes_to_quantize=nodes_to_quantize,
                nodes_to_exclude=nodes_to_exclude or None,
                calibrate_method=method,
                extra_options=extra_options,
                calibration_cache_path=str(calibration_cache),
            )
        except Exception as exc:
            raise PassError(f"static INT8 quantization failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}", pass_name=self.name) from None
        quantized, control_flow = _quantized_nodes(output, set(self.config.op_types or COMPUTE_OP_TYPES))
        return PassOutput(
            model_path=output,
            info={
                "quantized_nodes": quantized,
                "control_flow_nodes": control_flow,
                "quantization": {
                    "format": "QDQ",
                    "calibration": self.config.calibration_method,
                    "calibration_samples": len(feeds),
                    "per_channel": self.config.per_channel,
                    "op_types": list(self.config.op_types or DEFAULT_OP_TYPES),
                    **({"matmul_const_b_only": True} if self.config.matmul_const_b_only else {}),
                    "depthwise_in_float": len(depthwise) if keep_depthwise_float and nodes_to_quantize is None else 0,
                    **scheme,
                },
                "fallback_nodes": list(self.config.nodes_to_exclude),
            },
        )


def _quantized_nodes(model_path: Path, op_types: set[str]) -> tuple[int, list[str]]:
    """How many compute nodes read a dequantized weight, and the control-flow nodes the quantizer skipped."""
    import onnx

    model = onnx.load(str(model_path))
    dq_outputs = {out for node in model.graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    quantized = sum(1 for node in model.graph.node if node.op_type in op_types and len(node.input) > 1 and node.input[1] in dq_outputs)
    control_flow = [f"{node.op_type} {node.name}" for node in model.graph.node if node.op_type in ("If", "Loop", "Scan")]
    return quantized, control_flow


def _depthwise_convs(model_path: Path) -> list[str]:
    """Names of depthwise Conv nodes (group equal to the input channels, more than one)."""
    import onnx

    model = onnx.load(str(model_path))
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    names = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        weight = shapes.get(node.input[1]) if len(node.input) > 1 else None
        if group > 1 and weight is not None and weight[1] == 1:
            names.append(node.name)
    return names
