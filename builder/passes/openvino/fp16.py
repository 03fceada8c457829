"""OpenVINO IR with FP16 weights (`compress_to_fp16=True`): half the size of the fp32 IR.

On CPUs without native FP16 arithmetic OpenVINO decompresses the weights at load time and computes
in f32, so accuracy matches fp32 to FP16 weight rounding and latency matches fp32; the gain is size
(and speed on GPU devices).
"""

from __future__ import annotations

from pathlib import Path

from builder.passes.base import Pass, PassConfig, PassContext, PassOutput
from builder.passes.openvino import read_model, save_ir, source_names


class OvFp16Config(PassConfig):
    """No settings: OpenVINO keeps precision-sensitive subgraphs in f32 on its own."""


class OvFp16(Pass):
    name = "ov-fp16"
    description = "OpenVINO IR with weights compressed to FP16, from the ONNX model or the fp32 IR."
    Config = OvFp16Config
    uses_profile = False

    def run(self, input_model: Path, ctx: PassContext) -> PassOutput:
        source = source_names(input_model)
        model = read_model(input_model)
        xml, bin_ = save_ir(model, ctx.scratch("ov-fp16.xml"), compress_to_fp16=True, source=source)
        return PassOutput(model_path=xml, sidecars=[bin_], info={"weights": "fp16", "compute_on_cpu": "f32 (weights decompressed at load)"})
