"""TFLite target: LiteRT models for Raspberry Pi (XNNPACK) and the Coral Edge TPU, converted by onnx2tf.

One `tflite-convert` run (shared by every TFLite profile through the build cache) gives

    tflite-fp32          float32                          (profile runs fp32)
    tflite-fp16          float16 weights                  (profile runs fp16)
    tflite-dynamic-int8  int8 weights, float activations  (profile runs int8)
    tflite-full-int8     int8 weights and activations, int8 input and output

each verified and timed in LiteRT on the host. A profile whose tflite runtime has the `edgetpu` delegate
(Coral) gets only what the Edge TPU runs, the full-integer model, with a static op-placement report
(`builder.edgetpu`) and the `edgetpu_compiler` command that compiles it on a machine that has the
compiler. A model onnx2tf cannot convert gives no TFLite variant: one note naming the op and node, the
converter's log published next to the report, and the profile's other runtimes still build.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder.passes.base import Pass, load_all_passes
from builder.runtimes import RuntimeUnavailable
from builder.targets import Candidate, Target
from edgepack.errors import PassError
from edgepack.report import FailedVariant

if TYPE_CHECKING:
    from builder.context import BuildContext, ReferenceModel
    from hardware_profiles.schema import RuntimeSpec

PRECISION = {"fp32": "fp32", "fp16": "fp16", "dynamic-int8": "int8", "full-int8": "int8"}
LOG_ARTIFACT = "onnx2tf.log"
IO_FILE = "tflite_io.json"
MODEL_MEMBER = "model/model.tflite"


class TfliteTarget(Target):
    runtime = "tflite"
    extra = "tflite"
    adapter = "builder.runtimes.tflite:LiteRtAdapter"
    needs_static_shapes = True

    def drives_accelerator(self, spec: RuntimeSpec) -> bool:
        return "edgetpu" in spec.delegates

    def on_accelerator(self, candidate: Candidate) -> bool:
        return "edgetpu" in candidate.info  # only the full-integer model the Edge TPU compiler maps

    def validate(self, ctx: BuildContext) -> None:
        missing = [module for module in ("onnx2tf", "tensorflow", "ai_edge_litert") if importlib.util.find_spec(module) is None]
        if missing:
            raise RuntimeUnavailable(
                f"TFLite variants need {', '.join(missing)}, not installed on this host; install them with: pip install 'edgepack[tflite]'",
                runtime=self.runtime,
            )
        self._convert_pass(ctx)  # its config is checked now, before any pass runs

    def variants(self, ctx: BuildContext) -> list[str]:
        """The TFLite variants this profile and config ask for, in build order."""
        spec = ctx.profile.runtime(self.runtime)
        runnable = set(spec.precisions or ctx.profile.precisions)
        wanted = set(ctx.config.optimize.precisions) | {"fp32"}
        if _edgetpu(ctx):
            # The Edge TPU runs full-integer models only; anything float would run on the Cortex-A53s.
            return ["full-int8"] if "int8" in wanted and "int8" in runnable else []
        return [v for v in ("fp32", "fp16", "dynamic-int8", "full-int8") if PRECISION[v] in wanted and PRECISION[v] in runnable]

    def _convert_pass(self, ctx: BuildContext) -> Pass:
        optimize = ctx.config.optimize
        return load_all_passes()["tflite-convert"].from_dict({
            "int8": any(PRECISION[v] == "int8" for v in self.variants(ctx)),
            "quant_type": "per-channel" if optimize.int8.per_channel else "per-tensor",
            "calibration_samples": optimize.calibration.samples,
        })

    def _failed(self, ctx: BuildContext, variant: str, reason: str) -> None:
        """A variant the converter could not make, in the report's failed_variants."""
        ctx.failed.append(FailedVariant(name=f"tflite-{variant}", runtime=self.runtime, precision=PRECISION[variant],
                                        stage="build", reason=reason))

    def candidates(self, ctx: BuildContext, reference: ReferenceModel) -> list[Candidate]:
        variants = self.variants(ctx)
        if not variants:
            ctx.note(f"tflite: no variant to build (profile {ctx.profile.name} runs "
                     f"{', '.join(ctx.profile.runtime(self.runtime).precisions or ctx.profile.precisions)} on it; "
                     f"optimize.precisions asks for {', '.join(ctx.config.optimize.precisions)})")
            return []
        stem = ctx.stem
        try:
            converted = ctx.run_pass(self._convert_pass(ctx), reference.model_path)
        except PassError as exc:
            log = getattr(exc, "log_path", None)
            where = ""
            if log is not None and Path(log).is_file():
                ctx.publish_artifact(LOG_ARTIFACT, Path(log))
                where = f"; converter log: {stem}.{LOG_ARTIFACT}"
            ctx.note(f"tflite variants not built: {exc.message}{where}")
            for variant in variants:
                self._failed(ctx, variant, f"{exc.message}{where}")
            return []
        folder = converted.model_path.parent
        info = converted.info
        files: dict[str, str] = info["files"]
        io_map = json.loads((folder / IO_FILE).read_text())
        log = folder / LOG_ARTIFACT
        for variant, reason in info.get("failed_variants", {}).items():
            if variant in variants:
                ctx.note(f"tflite-{variant} not built: {reason}; converter log: {stem}.{LOG_ARTIFACT}")
                self._failed(ctx, variant, f"{reason} (converter log: {stem}.{LOG_ARTIFACT})")
        toolchain = ctx.profile.toolchains.get("edgetpu_compiler")
        candidates = []
        for variant in variants:
            if variant not in files:
                continue
            path = folder / files[variant]
            details: dict[str, Any] = {
                "converter": {**info["converter"], "file": files[variant]},
                "io_quantization": io_quantization(io_map[files[variant]]),
            }
            if variant == "full-int8":
                details["quantization"] = {
                    "format": "TFLite full integer", "activation_type": "int8", "weight_type": "int8",
                    "io_dtype": info["converter"]["io_dtype"], "per_channel": info["converter"]["quant_type"] == "per-channel",
                    "calibration": "TFLite converter on a representative dataset: the user's calibration data",
                    "calibration_samples": info["converter"]["calibration_samples"],
                }
            elif variant == "dynamic-int8":
                details["quantization"] = {"format": "TFLite dynamic range", "weight_type": "int8",
                                           "activation_type": "float (quantized on the fly per op)"}
            if variant == "full-int8" and _edgetpu(ctx):
                from builder.edgetpu import placement_report

                report = placement_report(path, MODEL_MEMBER, toolchain)
                details["edgetpu"] = report
                ctx.note(edgetpu_summary(report))
            candidates.append(Candidate(f"tflite-{variant}", PRECISION[variant], self.runtime, "tflite", path, details,
                                        artifacts={LOG_ARTIFACT: log} if log.is_file() else {}))
        return candidates


def _edgetpu(ctx: BuildContext) -> bool:
    spec = ctx.profile.runtime("tflite")
    return spec is not None and "edgetpu" in spec.delegates


def io_quantization(io: dict[str, Any]) -> dict[str, Any]:
    """Per ONNX input/output: the .tflite tensor, its dtype, scale and zero point, and the layout transpose."""

    def entry(spec: dict[str, Any]) -> dict[str, Any]:
        return {"name": spec["name"], "tflite_name": spec["tflite_name"], "dtype": spec["dtype"], "scale": spec["scale"],
                "zero_point": spec["zero_point"], "shape": spec["shape"], "transpose": spec["transpose"]}

    return {
        "inputs": [entry(s) for s in io["inputs"]],
        "outputs": [entry(s) for s in io["outputs"]],
        "doc": ("integer tensors: real = (q - zero_point) * scale; `transpose` takes an ONNX-layout input to the "
                "TFLite tensor, and a TFLite output back to the ONNX layout"),
    }


def edgetpu_summary(report: dict[str, Any]) -> str:
    total = report["tpu_ops"] + report["cpu_ops"]
    first = report["first_unsupported"]
    if first is None:
        mapped = f"all {total} ops map to the Edge TPU"
    else:
        mapped = (f"{report['tpu_ops']} of {total} ops map to the Edge TPU; from op #{first['index']} ({first['op']}: "
                  f"{first['reason']}) on, {report['cpu_ops']} run on the CPU")
    return f"Edge TPU (static estimate from Coral's op table): {mapped}; compile on a machine with the compiler: {report['compiler_command']}"
