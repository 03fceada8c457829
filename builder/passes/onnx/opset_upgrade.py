"""Upgrade the opset where quantization needs it (per-channel Q/DQ needs opset >= 13)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from builder.onnx_utils import load_model, opset_version, save_model
from builder.passes.base import Pass, PassConfig, PassContext, PassOutput
from edgepack.errors import ModelError


class OpsetUpgradeConfig(PassConfig):
    min_opset: int = Field(default=13, ge=7, le=30, description="Upgrade models below this opset.")


class OpsetUpgrade(Pass):
    name = "opset-upgrade"
    description = "Convert the model to at least `min_opset` (bounded by the profile's opset.max)."
    Config = OpsetUpgradeConfig

    def run(self, input_model: Path, ctx: PassContext) -> PassOutput:
        import onnx
        from onnx import version_converter

        model = load_model(input_model)
        current = opset_version(model)
        target = min(max(self.config.min_opset, ctx.profile.opset.min), ctx.profile.opset.max)
        if current >= target:
            return PassOutput(model_path=input_model, info={"from": current, "to": current, "changed": False})
        try:
            converted = version_converter.convert_version(model, target)
            onnx.checker.check_model(converted)
        except Exception as exc:
            raise ModelError(f"cannot upgrade the model from opset {current} to {target}: {str(exc).splitlines()[0][:200]}") from None
        output = save_model(converted, ctx.scratch("opset.onnx"))
        return PassOutput(model_path=output, info={"from": current, "to": target, "changed": True})
