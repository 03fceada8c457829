"""ONNX → OpenVINO IR in fp32 with `openvino.convert_model`.

The IR is the same for every profile (devices and precisions are decided later), so the pass does
not read the profile and several profiles share one cached conversion.
"""

from __future__ import annotations

from pathlib import Path

from builder.passes.base import Pass, PassConfig, PassContext, PassOutput
from builder.passes.openvino import count_ops, save_ir, source_names
from edgepack.errors import PassError


class OvConvertConfig(PassConfig):
    """No settings: input shapes come from the ONNX model (fixed earlier where the config sets them)."""


class OvConvert(Pass):
    name = "ov-convert"
    description = "Convert the fp32 ONNX reference to OpenVINO IR (model.xml + model.bin) with fp32 weights."
    Config = OvConvertConfig
    uses_profile = False

    def run(self, input_model: Path, ctx: PassContext) -> PassOutput:
        from builder.runtimes.openvino import ov

        try:
            source = source_names(input_model)
            model = ov.convert_model(str(input_model))
        except Exception as exc:
            raise PassError(f"OpenVINO cannot convert {input_model.name}: {conversion_problem(exc)}", pass_name=self.name) from None
        xml, bin_ = save_ir(model, ctx.scratch("ov-fp32.xml"), compress_to_fp16=False, source=source)
        return PassOutput(
            model_path=xml,
            sidecars=[bin_],
            info={"openvino": {"converter": "openvino.convert_model", "version": ov.__version__,
                               "ops": len(model.get_ops()), "constants": count_ops(model, "Constant")}},
        )


def conversion_problem(exc: Exception) -> str:
    """The informative line of a converter error (OpenVINO's messages open with C++ check locations)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for marker in ("No conversion rule found", "OpConversionFailure", "is not supported", "Unsupported"):
        for index, line in enumerate(lines):
            if marker in line:
                detail = " ".join(lines[index:index + 2]) if line.endswith(":") else line
                return detail[:300]
    return (lines[0] if lines else type(exc).__name__)[:300]
