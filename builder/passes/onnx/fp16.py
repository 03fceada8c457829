"""FP16: weights and compute in half precision, model inputs/outputs kept float32."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from builder.onnx_utils import load_model, save_model
from builder.passes.base import Pass, PassConfig, PassContext, PassOutput
from edgepack.errors import PassError


class Fp16Config(PassConfig):
    keep_io_types: bool = Field(default=True, description="Keep float32 model inputs and outputs.")
    op_block_list: tuple[str, ...] | None = Field(default=None, description="Ops kept in float32 (default: onnxruntime's list).")


class Fp16(Pass):
    name = "fp16"
    description = "Convert weights and compute to float16, keeping float32 inputs/outputs."
    Config = Fp16Config

    def run(self, input_model: Path, ctx: PassContext) -> PassOutput:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = load_model(input_model)
        kwargs = {"keep_io_types": self.config.keep_io_types}
        if self.config.op_block_list is not None:
            kwargs["op_block_list"] = list(self.config.op_block_list)
        try:
            converted = convert_float_to_float16(model, **kwargs)
        except Exception as exc:
            raise PassError(f"fp16 conversion failed: {str(exc)[:200]}", pass_name=self.name) from None
        output = save_model(converted, ctx.scratch("fp16.onnx"))
        return PassOutput(model_path=output, info={"keep_io_types": self.config.keep_io_types})
