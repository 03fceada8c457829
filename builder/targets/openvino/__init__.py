"""OpenVINO target: IR variants for profiles that list the `openvino` runtime (intel-nuc, x86 boards).

    fp32 reference ONNX ─ov-convert→ ov-fp32 IR ─ov-fp16→ ov-fp16 IR
                                             └─ov-int8 (nncf.quantize)→ ov-int8 IR
                                                  misses max_accuracy_drop?
                                                  └─ov-int8 (nncf.quantize_with_accuracy_control)→ ov-int8 IR

Each variant is `model.xml` + `model.bin`, verified and timed in the OpenVINO runtime on the host CPU
(`builder.runtimes.openvino`). The plain INT8 IR is checked here, on the validation split against the
fp32 IR, with the metric the gates use; only when it misses the accuracy budget does NNCF's accuracy
control run, and its result replaces the plain one.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from typing import TYPE_CHECKING, Any, Sequence

from builder.passes.base import Pass, PassOutput, load_all_passes
from builder.runtimes import RuntimeUnavailable
from builder.targets import Candidate, Target
from builder.verify import accuracy_drop, compare
from edgepack.errors import PassError

if TYPE_CHECKING:
    from builder.context import BuildContext, ReferenceModel
    from hardware_profiles.schema import RuntimeSpec

INSTALL_HINT = "install it with: pip install 'edgepack[openvino]'"


def missing_packages() -> list[str]:
    """Which of OpenVINO and NNCF this host lacks (found without importing them: NNCF takes seconds)."""
    return [name for name in ("openvino", "nncf") if importlib.util.find_spec(name) is None]


class OpenVinoTarget(Target):
    runtime = "openvino"
    extra = "openvino"
    adapter = "builder.runtimes.openvino:OpenVinoAdapter"

    def __init__(self) -> None:
        self._unavailable: str | None = None
        self._sole_runtime = False
        self._convert: Pass | None = None
        self._fp16: Pass | None = None
        self._int8: Pass | None = None
        self._accuracy_control: Pass | None = None
        self._int8_config: dict[str, Any] = {}

    # ---------------------------------------------------------------- before any pass runs
    def drives_accelerator(self, spec: RuntimeSpec) -> bool:
        return bool(spec.devices) and spec.devices[0] in ("GPU", "NPU")

    def validate(self, ctx: BuildContext) -> None:
        profile, config = ctx.profile, ctx.config
        others = [target for runtime, target in ctx.targets if target is not None and runtime.name != self.runtime]
        self._sole_runtime = not others
        missing = missing_packages()
        if "openvino" in missing:
            self._unavailable = f"OpenVINO is not installed on this host; {INSTALL_HINT}"
            if self._sole_runtime:
                # Nothing else to build for this profile: say so now, before any pass spends time.
                raise RuntimeUnavailable(f"profile {profile.name} runs OpenVINO, which is not installed on this host; {INSTALL_HINT}",
                                         runtime=self.runtime)
            return
        # OpenVINO and NNCF decide the IR bytes: their versions belong in every cache key, the lineage and the SBOM.
        for package in ("openvino", "nncf"):
            if package not in missing:
                ctx.tools[package] = importlib.metadata.version(package)
        spec = profile.runtime(self.runtime)
        runnable = [p for p in (spec.precisions or profile.precisions) if p in profile.precisions]
        wanted = config.optimize.precisions
        passes = load_all_passes()
        self._convert = passes["ov-convert"].from_dict({})
        if "fp16" in wanted and "fp16" in runnable:
            self._fp16 = passes["ov-fp16"].from_dict({})
        if "int8" in wanted and "int8" in runnable:
            if "nncf" in missing:
                ctx.note(f"ov-int8 skipped: NNCF is not installed on this host; {INSTALL_HINT}")
            else:
                self._int8_config = {
                    "preset": "performance",
                    "subset_size": config.optimize.calibration.samples,
                    # A CPU-only board gets CPU-tuned quantization; CPU+GPU boards a scheme both devices run.
                    "target_device": "CPU" if tuple(spec.devices) == ("CPU",) else "ANY",
                }
                self._int8 = passes["ov-int8"].from_dict(self._int8_config)
                if ctx.gates.max_accuracy_drop is not None:
                    self._accuracy_control = passes["ov-int8"].from_dict({
                        **self._int8_config, "accuracy_control": True, "max_drop": ctx.gates.max_accuracy_drop,
                        "validation_samples": config.verify.max_samples,
                        "max_iterations": max(1, config.optimize.int8.max_fallback_nodes)})
                if config.optimize.calibration.method not in ("minmax", "auto"):
                    ctx.note(f"ov-int8 calibrates with NNCF's range estimators; calibration.method "
                                         f"{config.optimize.calibration.method} applies to the ONNX int8 variants")

    # ---------------------------------------------------------------- the variants
    def candidates(self, ctx: BuildContext, reference: ReferenceModel) -> list[Candidate]:
        if self._unavailable:
            raise RuntimeUnavailable(self._unavailable, runtime=self.runtime)
        try:
            fp32 = ctx.run_pass(self._convert, reference.model_path)
        except PassError as exc:
            if self._sole_runtime:
                raise
            ctx.note(f"{exc.message}; building for the other runtimes")
            return []
        ir_reference = _candidate("ov-fp32", "fp32", fp32)
        out = [ir_reference]
        made = []  # a variant that fails is dropped with its reason (ctx.attempt); the others go on
        if self._fp16 is not None:
            made.append(ctx.attempt("ov-fp16", self.runtime, "fp16",
                                    lambda: _candidate("ov-fp16", "fp16", ctx.run_pass(self._fp16, fp32.model_path))))
        if self._int8 is not None:
            made.append(ctx.attempt("ov-int8", self.runtime, "int8", lambda: self._int8_candidate(ctx, ir_reference)))
        return out + [candidate for candidate in made if candidate is not None]

    def _int8_candidate(self, ctx: BuildContext, reference: Candidate) -> Candidate:
        """Plain INT8 (NNCF post-training quantization); accuracy control comes later, if the gate needs it
        and nothing cheaper already passes (recover_accuracy)."""
        return _candidate("ov-int8", "int8", ctx.run_pass(self._int8, reference.model_path))

    # ---------------------------------------------------------------- accuracy recovery
    def recovers_accuracy(self, candidate: Candidate) -> bool:
        return (candidate.name == "ov-int8" and self._accuracy_control is not None
                and bool(candidate.info.get("quantized_nodes")))

    def recover_accuracy(self, ctx: BuildContext, candidate: Candidate, built: Sequence[Candidate]) -> Candidate | None:
        """NNCF accuracy control: quantize again, keeping in float the ops that cost the metric most, until
        the drop against ov-fp32 is within the budget. None (ov-int8 stays plain) when plain INT8 is within
        the budget against ov-fp32 already, or control fails or does not improve it."""
        reference = next((c for c in built if c.name == "ov-fp32" and c.runtime == self.runtime), None)
        max_drop = ctx.gates.max_accuracy_drop
        if reference is None or max_drop is None:
            return None
        metric = ctx.config.metric
        val_feeds, labels = ctx.validation_feeds, ctx.validation_labels

        def drop_of(variant: Candidate) -> float:
            reference_outputs = ctx.outputs(reference, val_feeds)
            reference_value = compare(reference_outputs, reference_outputs, labels, metric)["accuracy"]
            value = compare(ctx.outputs(variant, val_feeds), reference_outputs, labels, metric)["accuracy"]
            return accuracy_drop(metric, reference_value, value)

        ctx.progress.start("check ov-int8")
        plain_drop = drop_of(candidate)
        ctx.progress.finish("check ov-int8", f"openvino: {metric} drop {plain_drop:.4g} vs ov-fp32 (budget {max_drop:g})")
        candidate.info["quantization"]["drop_vs_ov_fp32"] = round(plain_drop, 6)
        if plain_drop <= max_drop + 1e-12:
            return None

        lost = f"plain INT8 lost {plain_drop:.4g} {metric} against ov-fp32 (budget {max_drop:g})"
        if ctx.budget_spent("ov-int8 accuracy control"):
            return None
        try:
            controlled = ctx.run_pass(self._accuracy_control, reference.model_path, label="ov-int8 accuracy-control")
        except PassError as exc:
            ctx.note(f"ov-int8: {lost}; accuracy control failed ({exc.message}), so ov-int8 stays the plain INT8 IR")
            return None
        if not controlled.info.get("quantized_nodes"):
            ctx.note(f"ov-int8: {lost}; NNCF accuracy control reverted every quantized op, so ov-int8 stays the plain INT8 IR")
            return None
        # Compute ops that lost their INT8 inputs; NNCF's own list (which also names activations) if none did.
        kept_float = (sorted(set(candidate.info["quantized_ops"]) - set(controlled.info["quantized_ops"]))
                      or sorted(controlled.info["quantization"].get("reverted_ops") or []))
        trial = _candidate("ov-int8", "int8", controlled, float_nodes=kept_float)
        trial_drop = drop_of(trial)
        if trial_drop >= plain_drop:
            ctx.note(f"ov-int8: {lost}; NNCF accuracy control did not improve it ({trial_drop:.4g}), "
                                 "so ov-int8 stays the plain INT8 IR")
            return None
        trial.info["quantization"].update({
            "accuracy_control": True,
            "plain_drop_vs_ov_fp32": round(plain_drop, 6),
            "drop_vs_ov_fp32": round(trial_drop, 6),
            "fake_quantize_ops_before": candidate.info.get("fake_quantize_ops"),
            "fake_quantize_ops_after": controlled.info.get("fake_quantize_ops"),
        })
        outcome = "within budget" if trial_drop <= max_drop + 1e-12 else "still over budget"
        ctx.note(f"ov-int8: {lost}; NNCF accuracy control kept {len(kept_float)} op(s) in float "
                             f"({', '.join(kept_float[:5])}{', …' if len(kept_float) > 5 else ''}): drop {trial_drop:.4g}, {outcome}")
        return trial


def _candidate(name: str, precision: str, result: PassOutput, float_nodes: Sequence[str] = ()) -> Candidate:
    xml = result.model_path
    weights = result.sidecars[0] if result.sidecars else xml.with_suffix(".bin")
    info = {**result.info}
    if "quantization" in info:
        info["quantization"] = dict(info["quantization"])
    if float_nodes:
        info["fallback_nodes"] = list(float_nodes)
    return Candidate(name, precision, "openvino", "openvino-ir", xml, info,
                     files={"model/model.xml": xml, "model/model.bin": weights}, float_nodes=frozenset(float_nodes))
