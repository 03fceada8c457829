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
from typing import Any

from builder.passes.base import Pass, load_all_passes
from builder.runtimes import RuntimeUnavailable
from builder.targets import Candidate, Target
from edgepack.errors import PassError

PRECISION = {"fp32": "fp32", "fp16": "fp16", "dynamic-int8": "int8", "full-int8": "int8"}
LOG_ARTIFACT = "onnx2tf.log"
IO_FILE = "tflite_io.json"
MODEL_MEMBER = "model/model.tflite"


class TfliteTarget(Target):
    runtime = "tflite"
    extra = "tflite"

    def validate(self, builder: Any) -> None:
        missing = [module for module in ("onnx2tf", "tensorflow", "ai_edge_litert") if importlib.util.find_spec(module) is None]
        if missing:
            raise RuntimeUnavailable(
                f"TFLite variants need {', '.join(missing)}, not installed on this host; install them with: pip install 'edgepack[tflite]'",
                runtime=self.runtime,
            )
        self._convert_pass(builder)  # its config is checked now, before any pass runs

    def variants(self, builder: Any) -> list[str]:
        """The TFLite variants this profile and config ask for, in build order."""
        spec = builder.profile.runtime(self.runtime)
        runnable = set(spec.precisions or builder.profile.precisions)
        wanted = set(builder.config.optimize.precisions) | {"fp32"}
        if _edgetpu(builder):
            # The Edge TPU runs full-integer models only; anything float would run on the Cortex-A53s.
            return ["full-int8"] if "int8" in wanted and "int8" in runnable else []
        return [v for v in ("fp32", "fp16", "dynamic-int8", "full-int8") if PRECISION[v] in wanted and PRECISION[v] in runnable]

    def _convert_pass(self, builder: Any) -> Pass:
        optimize = builder.config.optimize
        return load_all_passes()["tflite-convert"].from_dict({
            "int8": any(PRECISION[v] == "int8" for v in self.variants(builder)),
            "quant_type": "per-channel" if optimize.int8.per_channel else "per-tensor",
            "calibration_samples": optimize.calibration.samples,
        })

    def candidates(self, builder: Any, base: Path) -> list[Candidate]:
        variants = self.variants(builder)
        if not variants:
            builder.notes.append(f"tflite: no variant to build (profile {builder.profile.name} runs "
                                 f"{', '.join(builder.profile.runtime(self.runtime).precisions or builder.profile.precisions)} on it; "
                                 f"optimize.precisions asks for {', '.join(builder.config.optimize.precisions)})")
            return []
        stem = f"{builder.config.name}-{builder.config.version}-{builder.profile.name}"
        try:
            converted = builder._run_pass(self._convert_pass(builder), base)
        except PassError as exc:
            log = getattr(exc, "log_path", None)
            where = ""
            if log is not None and Path(log).is_file():
                builder.extra_artifacts[LOG_ARTIFACT] = Path(log)
                where = f"; converter log: {stem}.{LOG_ARTIFACT}"
            builder.notes.append(f"tflite variants not built: {exc.message}{where}")
            return []
        folder = converted.model_path.parent
        info = converted.info
        files: dict[str, str] = info["files"]
        io_map = json.loads((folder / IO_FILE).read_text())
        log = folder / LOG_ARTIFACT
        for variant, reason in info.get("failed_variants", {}).items():
            if variant in variants:
                builder.notes.append(f"tflite-{variant} not built: {reason}; converter log: {stem}.{LOG_ARTIFACT}")
        toolchain = builder.profile.toolchains.get("edgetpu_compiler")
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
            if variant == "full-int8" and _edgetpu(builder):
                from builder.edgetpu import placement_report

                report = placement_report(path, MODEL_MEMBER, toolchain)
                details["edgetpu"] = report
                builder.notes.append(edgetpu_summary(report))
            candidates.append(Candidate(f"tflite-{variant}", PRECISION[variant], self.runtime, "tflite", path, details,
                                        artifacts={LOG_ARTIFACT: log} if log.is_file() else {}))
        return candidates


def _edgetpu(builder: Any) -> bool:
    spec = builder.profile.runtime("tflite")
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
