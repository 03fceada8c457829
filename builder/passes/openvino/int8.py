"""INT8 OpenVINO IR with NNCF post-training quantization, calibrated on the user's data.

Plain mode is `nncf.quantize`. With `accuracy_control` the pass runs
`nncf.quantize_with_accuracy_control`: NNCF quantizes, measures the build's own metric (the
`builder.verify` definition the gates check, on the validation split, against the fp32 IR's outputs)
and reverts the most harmful quantized ops to float until the drop is within `max_drop`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from builder.passes.base import Pass, PassConfig, PassContext, PassOutput
from builder.passes.openvino import count_ops, onnx_node_name, quantized_ops, quiet_nncf, read_model, save_ir, source_names, stable_names
from edgepack.errors import DataError, PassError


class OvInt8Config(PassConfig):
    preset: Literal["performance", "mixed"] = Field(
        default="performance", description="performance: symmetric activations; mixed: asymmetric activations (better for non-ReLU models).")
    subset_size: int = Field(default=300, gt=0, description="Calibration samples used at most.")
    fast_bias_correction: bool = Field(default=True, description="NNCF's fast bias correction after calibration.")
    target_device: Literal["ANY", "CPU", "GPU"] = Field(default="ANY", description="Device the quantization scheme is tuned for.")
    accuracy_control: bool = Field(default=False, description="Revert the most harmful ops to float until the metric drop is within max_drop.")
    max_drop: float | None = Field(default=None, ge=0, description="Largest metric drop vs. the fp32 IR (metric units); needs accuracy_control.")
    validation_samples: int = Field(default=2000, gt=0, description="Validation samples accuracy control scores on at most.")
    max_iterations: int = Field(default=16, gt=0, description="Accuracy control reverts at most this many op groups to float "
                                                              "(each one a validation run); unbounded it ran for tens of minutes on PP-OCRv4 rec.")
    ranking_subset_size: int = Field(default=64, gt=0, description="Validation samples accuracy control ranks the ops on.")

    @model_validator(mode="after")
    def _drop_with_control(self) -> "OvInt8Config":
        if self.accuracy_control and self.max_drop is None:
            raise ValueError("accuracy_control needs max_drop")
        if self.max_drop is not None and not self.accuracy_control:
            raise ValueError("max_drop only applies with accuracy_control: true")
        return self


class OvInt8(Pass):
    name = "ov-int8"
    description = "INT8 OpenVINO IR with NNCF (nncf.quantize), optionally with accuracy control against the build's metric."
    Config = OvInt8Config
    uses_calibration_data = True

    def __init__(self, config: OvInt8Config) -> None:
        super().__init__(config)
        # Accuracy control reads the validation split and the metric: both belong in the cache key.
        self.uses_validation_data = config.accuracy_control

    def run(self, input_model: Path, ctx: PassContext) -> PassOutput:
        import builder.runtimes.openvino  # noqa: F401  (telemetry off before NNCF loads OpenVINO)
        import nncf

        if ctx.data is None or ctx.data.calibration is None:
            raise DataError("int8 needs calibration data: set data.calibration in edgepack.yaml (or drop int8 from optimize.precisions)")
        source = source_names(input_model)
        model = read_model(input_model)
        feeds = list(ctx.data.feeds("calibration", limit=self.config.subset_size))
        settings: dict[str, Any] = {
            "preset": {"performance": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED}[self.config.preset],
            "target_device": nncf.TargetDevice[self.config.target_device],
            "subset_size": len(feeds),
            "fast_bias_correction": self.config.fast_bias_correction,
        }
        quantization: dict[str, Any] = {
            "format": "nncf", "nncf": nncf.__version__, "preset": self.config.preset, "subset_size": len(feeds),
            "fast_bias_correction": self.config.fast_bias_correction, "target_device": self.config.target_device,
            "accuracy_control": self.config.accuracy_control,
        }
        with quiet_nncf() as log:
            try:
                if self.config.accuracy_control:
                    validation, validation_fn, samples = _validation(model, ctx, self.config.validation_samples)
                    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

                    restorer = AdvancedAccuracyRestorerParameters(
                        max_num_iterations=self.config.max_iterations,
                        ranking_subset_size=min(self.config.ranking_subset_size, samples))
                    quantized = nncf.quantize_with_accuracy_control(
                        model, nncf.Dataset(feeds), validation, validation_fn,
                        max_drop=self.config.max_drop, drop_type=nncf.DropType.ABSOLUTE,
                        advanced_accuracy_restorer_parameters=restorer, **settings)
                else:
                    quantized = nncf.quantize(model, nncf.Dataset(feeds), **settings)
            except Exception as exc:
                first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                raise PassError(f"NNCF quantization failed: {type(exc).__name__}: {first}", pass_name=self.name) from None
        # Before anything reads op names: the report then names the ops the saved IR has.
        renamed = stable_names(quantized, source)
        info: dict[str, Any] = {}
        if self.config.accuracy_control:
            control = _accuracy_control_summary(log.messages, renamed)
            quantization.update({"max_drop": self.config.max_drop, "drop_type": "absolute", "metric": ctx.build.metric,
                                 "validation_samples": samples, "max_iterations": self.config.max_iterations, **control})
            info["fallback_nodes"] = control["reverted_ops"] or []
        ops = quantized_ops(quantized)
        # Float parts stay fp32: they are what NNCF calibrated and (with accuracy control) validated.
        xml, bin_ = save_ir(quantized, ctx.scratch("ov-int8.xml"), compress_to_fp16=False, source=source)
        info.update({
            "quantized_nodes": len(ops),
            "quantized_ops": [onnx_node_name(op) for op in ops],
            "fake_quantize_ops": count_ops(quantized, "FakeQuantize"),
            "quantization": quantization,
        })
        return PassOutput(model_path=xml, sidecars=[bin_], info=info)


def _validation(model: Any, ctx: PassContext, limit: int) -> tuple[Any, Any, int]:
    """NNCF's validation dataset and function: the build's metric on the validation split, higher is better."""
    import nncf

    from builder.runtimes.openvino import infer_all, ov
    from builder.verify import HIGHER_IS_BETTER, Outputs, compare

    if ctx.data is None or ctx.data.validation is None:
        raise DataError("accuracy-controlled INT8 needs validation data: set data.validation in edgepack.yaml")
    feeds = list(ctx.data.feeds("validation", limit=limit))
    labels = ctx.data.validation.labels
    labels = labels[: len(feeds)] if labels is not None else None
    metric = ctx.build.metric
    # The fp32 IR's outputs are the reference, as the builder's verification uses fp32's.
    reference = infer_all(ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}), feeds)
    sign = 1.0 if HIGHER_IS_BETTER.get(metric, True) else -1.0

    def validation_fn(compiled: Any, items: Any) -> tuple[float, None]:
        items = list(items)
        indices = [index for index, _ in items]
        outputs = infer_all(compiled, [feed for _, feed in items])
        expected = Outputs({name: array[indices] for name, array in reference.arrays.items()})
        value = compare(outputs, expected, labels[indices] if labels is not None else None, metric)["accuracy"]
        return sign * float(value), None

    dataset = nncf.Dataset(list(enumerate(feeds)), lambda item: item[1])
    return dataset, validation_fn, len(feeds)


_REVERTED = re.compile(r"(\d+) out of (\d+) were reverted back to the floating-point precision")
_STEP_REVERTED = re.compile(r"Reverted \d+ operations to the floating-point precision")


def _accuracy_control_summary(messages: list[str], renamed: dict[str, str]) -> dict[str, Any]:
    """What NNCF's accuracy control did, from its log: ops reverted to float (by their names in the saved
    IR) and whether max_drop was met."""
    reverted: list[str] | None = None
    steps: list[str] = []
    for message in messages:
        names = [line.strip() for line in message.splitlines()[1:] if line.strip()]
        if _REVERTED.search(message):
            reverted = names
        elif _STEP_REVERTED.search(message):
            steps += names
    if reverted is None and steps:
        reverted = steps
    if reverted is None and any("Algorithm completed" in m for m in messages) and not any("Accuracy drop:" in m for m in messages):
        reverted = []  # plain INT8 already met max_drop: NNCF reverted nothing
    failed = any("could not achieve the required accuracy drop" in m for m in messages)
    summary = [m.splitlines()[0] for m in messages if m.startswith(("Accuracy drop", "Algorithm completed", "The algorithm could not"))]
    return {
        "reverted_ops": [onnx_node_name(renamed.get(name, name)) for name in reverted] if reverted is not None else None,
        "reached_max_drop": not failed,
        "nncf_log": list(dict.fromkeys(summary))[-4:],
    }
