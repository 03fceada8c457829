"""Dynamic INT8: weights quantized offline, activations quantized per batch at run time.

Pays off where MatMul/Gemm dominate (transformers, MLPs) and needs no calibration data.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from builder.passes.base import Pass, PassConfig, PassContext, PassOutput
from edgepack.errors import PassError


class Int8DynamicConfig(PassConfig):
    per_channel: bool = Field(default=True, description="Per-output-channel weight scales.")
    op_types: tuple[str, ...] = Field(default=("MatMul", "Gemm", "Attention", "LSTM", "GRU"), description="Ops to quantize.")
    reduce_range: bool = Field(default=False, description="7-bit weights (for x86 without VNNI).")


class Int8Dynamic(Pass):
    name = "int8-dynamic"
    description = "Dynamic INT8 quantization of MatMul/Gemm-heavy models (no calibration data needed)."
    Config = Int8DynamicConfig

    def run(self, input_model: Path, ctx: PassContext) -> PassOutput:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        output = ctx.scratch("int8_dynamic.onnx")
        try:
            quantize_dynamic(
                str(input_model), str(output), op_types_to_quantize=list(self.config.op_types),
                per_channel=self.config.per_channel, reduce_range=self.config.reduce_range,
                weight_type=QuantType.QInt8,
            )
        except Exception as exc:
            raise PassError(f"dynamic INT8 quantization failed: {str(exc).splitlines()[0][:200]}", pass_name=self.name) from None
        return PassOutput(
            model_path=output,
            info={"quantization": {"format": "dynamic", "per_channel": self.config.per_channel,
                                   "reduce_range": self.config.reduce_range, "weight_type": "int8",
                                   "activation_type": "uint8 (per batch)", "op_types": list(self.config.op_types),
                                   "reason": "MatMul/Gemm dominate the compute; activations quantized at run time"}},
        )
