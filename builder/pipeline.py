"""The build pipeline: validate everything, then run the stages in order.

    validate  config, profile, data, pass configs, targets, model inputs, signing key   (nothing runs yet)
    reference check → static shapes → opset upgrade → simplify: the fp32 model       → ReferenceModel
    candidates  every target the profile lists builds its variants from it             → [Candidate]
    evaluate  verify each against fp32 in its runtime, time it, estimate the target    → Evaluation
    fallback  INT8 variants that miss the accuracy gate keep their most harmful nodes in float
    select    gates → the fastest/smallest passing variant, a decision for every one   → Selection
    package   vendor-toolchain steps, reference stats, the signed bundle               → BuildReport
    publish   bundle, report JSON/HTML and artifacts into the output folder

Stages take and return typed values; targets see only the `BuildContext` (builder.context). Nothing
is written to the output folder until the end, and then file by file through atomic renames, so a
failed build leaves the folder as it was.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from builder.cache import BuildCache, cache_key
from builder.context import BuildContext, BuildPlan, ProgressSink, ReferenceModel, SilentProgress
from builder.data import load_build_data
from builder.estimate import ESTIMATE_LABEL, count_graph, estimate_latency_ms
from builder.family import Family, detect_family
from builder.hostinfo import host_info, host_is_target
from builder.onnx_utils import elem_type_to_numpy, graph_inputs, load_model, tool_versions, value_info_shape
from builder.passes.base import load_all_passes
from builder.runtimes import RuntimeUnavailable, get_adapter
from builder.select import evaluate_gates, select_variant
from builder.targets import Candidate, get_target, target_class
from builder.verify import accuracy_drop, compare, load_metric
from edgepack import __version__
from edgepack.config import BuildConfig, load_build_config
from edgepack.errors import ConfigError, DataError, EdgepackError, ModelError, PassError, one_line_reason
from edgepack.files import atomic_writer, file_sha256
from edgepack.report import (
    REPORT_SCHEMA_VERSION, BuildReport, BundleInfo, CacheStats, Gates, GateThresholds, HostInfo, Lineage, ModelFamily,
    ReferenceSummary, SensitivityEntry, SourceModel, ToolchainStep, Variant, VariantMeasurement,
)

if TYPE_CHECKING:
    from builder.data import BuildData
    from builder.targets import Target
    from hardware_profiles.schema import HardwareProfile, RuntimeSpec

__all__ = ["REPORT_SCHEMA_VERSION", "BuildRequest", "BuildResult", "Builder", "ProgressSink", "run_build"]

# The gates that decide a fallback: a variant missing only latency or size gains nothing from float nodes.
ACCURACY_GATES = ("max_accuracy_drop", "min_agreement")


DEFAULT_TIME_BUDGET_S = 900.0


@dataclasses.dataclass
class BuildRequest:
    config_path: Path
    profile: str
    out_dir: Path
    model_override: Path | None = None
    signing_key: Path | None = None
    cache_dir: Path | None = None
    use_cache: bool = True
    keep_work: bool = False
    toolchain: str = "none"  # "docker" runs vendor-toolchain steps in the profile's container images
    # Seconds for the whole build; past it the optional slow steps (accuracy fallback builds, OpenVINO
    # accuracy control) are skipped and the report says so. None: no limit.
    time_budget_s: float | None = DEFAULT_TIME_BUDGET_S


@dataclasses.dataclass
class BuildResult:
    report: BuildReport
    exit_code: int
    outputs: list[Path]
    signing_key_path: Path | None = None
    dev_key_created: bool = False


@dataclasses.dataclass(frozen=True)
class Trial:
    """A candidate and what the build found about it."""

    candidate: Candidate
    variant: Variant


@dataclasses.dataclass(frozen=True)
class Evaluation:
    trials: list[Trial]
    reference: VariantMeasurement  # the fp32 ONNX reference as measured (what deltas and ratios are against)


@dataclasses.dataclass(frozen=True)
class Selection:
    selected: str | None
    reason: str
    trials: list[Trial]  # every variant with its decision

    @property
    def chosen(self) -> Trial | None:
        return next((t for t in self.trials if t.variant.name == self.selected), None)


@dataclasses.dataclass(frozen=True)
class Packaged:
    report: BuildReport  # with the bundle and the toolchain steps
    files: list[Path]  # staged, to publish


class Builder:
    def __init__(self, request: BuildRequest, progress: ProgressSink | None = None) -> None:
        self.request = request
        self.progress = progress or SilentProgress()

    def run(self) -> BuildResult:
        started = time.perf_counter()
        ctx = validate(self.request, self.progress)
        from edgepack.signing import resolve_signing_key

        signing_key, signing_key_path, dev_key = resolve_signing_key(self.request.signing_key)
        ctx.work_dir = Path(tempfile.mkdtemp(prefix="edgepack-build-"))
        try:
            reference = build_reference(ctx)
            candidates = build_candidates(ctx, reference)
            evaluation = evaluate(ctx, reference, candidates)
            trials, sensitivity = apply_fallback(ctx, reference, evaluation)
            selection = select(ctx, note_unprofitable_int8(ctx, trials, evaluation.reference))
            draft = draft_report(ctx, reference, evaluation.reference, selection, sensitivity)
            packaged = package(ctx, reference, selection, draft, signing_key)
            report = packaged.report.model_copy(update={
                "notes": list(ctx.notes), "passes": list(ctx.pass_log),
                "cache": CacheStats(hits=ctx.cache.hits, misses=ctx.cache.misses, enabled=ctx.cache.enabled),
                "duration_s": round(time.perf_counter() - started, 3),
                "time_budget_s": ctx.time_budget_s, "cut_short": list(ctx.cut_short),
            })
            staged = [*packaged.files, *publish_artifacts(ctx, candidates), *write_reports(ctx, report)]
            outputs = publish(self.request.out_dir, staged)
        finally:
            if not self.request.keep_work:
                shutil.rmtree(ctx.work_dir, ignore_errors=True)
        return BuildResult(report=report, exit_code=0 if selection.selected is not None else 1, outputs=outputs,
                           signing_key_path=signing_key_path, dev_key_created=dev_key)


def run_build(request: BuildRequest, progress: ProgressSink | None = None) -> BuildResult:
    """Build, verify and package; raises EdgepackError subclasses for bad input."""
    try:
        return Builder(request, progress).run()
    except EdgepackError:
        raise
    except MemoryError:
        raise PassError("the build ran out of memory") from None


# ==================================================================== validate (nothing runs yet)
def validate(request: BuildRequest, progress: ProgressSink) -> BuildContext:
    """Everything the user gave, checked before the first pass: a bad input fails in seconds, not minutes."""
    from hardware_profiles import load_profile

    overrides = {"model": str(request.model_override.resolve())} if request.model_override else None
    config = load_build_config(request.config_path, overrides)
    profile = load_profile(request.profile)
    targets = [(r, get_target(r.name)) for r in profile.runtimes]
    if not any(target for _, target in targets):
        listed = ", ".join(r.name for r in profile.runtimes)
        raise ConfigError(f"profile {profile.name}: edgepack builds for none of its runtimes ({listed})")
    gates = GateThresholds(**{
        **{k: v for k, v in profile.default_gates.model_dump().items() if v is not None},
        **{k: v for k, v in config.gates.model_dump().items() if v is not None},
    })
    if not config.model_path.is_file():
        raise ModelError(f"model {config.model_path} does not exist")
    data = load_build_data(config.calibration_path, config.validation_path, config.data.labels_key)
    _check_data(request, config, data)
    notes = _precision_notes(config, profile)
    want_int8 = "int8" in config.optimize.precisions and "int8" in profile.precisions
    if want_int8 and data.calibration is None:
        raise DataError("int8 needs calibration data: set data.calibration in edgepack.yaml (or drop int8 from optimize.precisions)")
    ctx = BuildContext(request=request, config=config, profile=profile, data=data, gates=gates, plan=_plan(config, profile),
                       cache=BuildCache(request.cache_dir, enabled=request.use_cache), tools=tool_versions(), input_shapes={},
                       time_budget_s=request.time_budget_s,
                       progress=progress, targets=targets, notes=notes)
    ctx.targets = _usable_targets(ctx)
    # The model's inputs against the data: the user's input, so checked before any pass runs.
    model = load_model(config.model_path)
    ctx.input_shapes = _static_shapes_for(ctx, model)
    dtypes = {v.name: np.dtype(elem_type_to_numpy(v.type.tensor_type.elem_type)) for v in graph_inputs(model)}
    data.check_against(ctx.input_shapes, dtypes)
    return ctx


def _check_data(request: BuildRequest, config: BuildConfig, data: BuildData) -> None:
    if data.validation is None:
        raise ConfigError(f"{request.config_path}: data.validation is required: every variant is verified against fp32 on it")
    if config.metric in ("top1",) and data.validation.labels is None:
        raise DataError(
            f"metric top1 needs labels: validation data {data.validation.path.name} has no {config.data.labels_key!r} array "
            "(add labels or use metric: agreement)"
        )
    load_metric(config.metric)


def _precision_notes(config: BuildConfig, profile: HardwareProfile) -> list[str]:
    notes = []
    if "fp32" not in config.optimize.precisions:
        notes.append("fp32 is always built: it is the reference every variant is verified against")
    for precision in config.optimize.precisions:
        if precision not in profile.precisions:
            notes.append(f"{precision} skipped: profile {profile.name} runs {', '.join(profile.precisions)}")
    return notes


def _plan(config: BuildConfig, profile: HardwareProfile) -> BuildPlan:
    """Every ONNX pass with its config, validated now (a bad setting fails before any pass runs)."""
    passes = load_all_passes()
    opt = config.optimize
    wants = {p for p in opt.precisions if p in profile.precisions}
    int8_config = {
        "calibration_method": "minmax" if opt.calibration.method == "auto" else opt.calibration.method,
        "percentile": opt.calibration.percentile,
        "calibration_samples": opt.calibration.samples,
        "per_channel": opt.int8.per_channel,
        **({"op_types": list(opt.int8.op_types)} if opt.int8.op_types else {}),
    }
    plan = BuildPlan(
        check=passes["check"].from_dict({"runtime": "onnxruntime"}),
        opset=passes["opset-upgrade"].from_dict({"min_opset": 13}),
        simplify=passes["simplify"].from_dict({"enabled": opt.simplify}),
        fp16=passes["fp16"].from_dict({}) if "fp16" in wants else None,
        int8=passes["int8-static"].from_dict(int8_config) if "int8" in wants else None,
        int8_dynamic_config={} if (opt.int8.dynamic != "never" and "int8" in wants) else None,
        prune=passes["prune"].from_dict(opt.prune.model_dump()) if opt.prune else None,
        int8_config=int8_config,
        calibration_auto=opt.calibration.method == "auto",
    )
    if plan.int8_dynamic_config is not None:
        passes["int8-dynamic"].from_dict(plan.int8_dynamic_config)
    return plan


def _usable_targets(ctx: BuildContext) -> list[tuple[RuntimeSpec, Target | None]]:
    """The targets whose settings check out; a runtime whose extra is missing is left out with a note."""
    usable = []
    for runtime, target in ctx.targets:
        if target is not None:
            try:
                target.validate(ctx)
            except RuntimeUnavailable as exc:
                # A runtime whose extra is not installed: build for the profile's other runtimes.
                ctx.note(f"{runtime.name} variants skipped: {exc.message}")
                target = None
        usable.append((runtime, target))
    if not any(target for _, target in usable):
        raise ConfigError(f"profile {ctx.profile.name}: no runtime it lists can be built on this host ({'; '.join(ctx.notes)})")
    return usable


def _static_shapes_for(ctx: BuildContext, model: Any) -> dict[str, tuple[int, ...]]:
    """Every input's shape: from the config, else the model's static dims, else one sample of the data."""
    shapes: dict[str, tuple[int, ...]] = {}
    configured = dict(ctx.config.inputs or {})
    model_inputs = graph_inputs(model)
    unknown = sorted(set(configured) - {i.name for i in model_inputs})
    if unknown:
        raise ConfigError(f"inputs {unknown} in {ctx.request.config_path.name} are not model inputs ({', '.join(i.name for i in model_inputs)})")
    for value in model_inputs:
        dims = value_info_shape(value)
        if value.name in configured:
            shapes[value.name] = tuple(configured[value.name])
        elif dims and all(isinstance(d, int) for d in dims) or not dims and value.type.tensor_type.HasField("shape"):
            shapes[value.name] = tuple(int(d) for d in dims)
        else:
            shapes[value.name] = _shape_from_data(ctx, value.name, dims)
    return shapes


def _shape_from_data(ctx: BuildContext, name: str, dims: list[Any]) -> tuple[int, ...]:
    split = ctx.data.validation or ctx.data.calibration
    array = split.arrays.get(name) if split else None
    if array is None:
        raise ModelError(f"input {name!r} has dynamic dims {dims} and no data to take a shape from; set inputs: {{{name}: [...]}} in edgepack.yaml")
    sample = tuple(array.shape[1:])
    if len(sample) == len(dims):
        return sample
    if len(sample) + 1 == len(dims):
        return (1, *sample)
    raise DataError(f"array {name!r} has per-sample shape {list(sample)}, which fits no shape of model input {name!r} {dims}")


# ==================================================================== reference
def build_reference(ctx: BuildContext) -> ReferenceModel:
    """The fp32 reference: check → static shapes → opset upgrade → simplify, its outputs and graph counts."""
    source_model = ctx.config.model_path
    checked = ctx.run_pass(ctx.plan.check, source_model)
    current = _fix_shapes(ctx, checked.model_path)
    opset_out = ctx.run_pass(ctx.plan.opset, current)
    base = ctx.run_pass(ctx.plan.simplify, opset_out.model_path).model_path
    outputs = ctx.outputs(Candidate("fp32", "fp32", "onnxruntime", "onnx", base), ctx.validation_feeds)
    # dims that stay dynamic (a transformer's batch and sequence) are counted at the shapes validate() fixed
    graph_counts = count_graph(base, ctx.input_shapes or None)
    total_macs = sum(n["macs"] for n in graph_counts)
    matmul_macs = sum(n["macs"] for n in graph_counts if n["op_type"] in ("MatMul", "Gemm"))
    is_target, target_reason = host_is_target(ctx.profile)
    control_flow = [f"{n.op_type} {n.name}" for n in load_model(base).graph.node if n.op_type in ("If", "Loop", "Scan")]
    if control_flow:
        ctx.note(f"the latency estimate leaves out compute inside control-flow subgraphs ({', '.join(control_flow)})")
    family = detect_family(base, graph_counts)
    _apply_family_recipe(ctx, family)
    return ReferenceModel(source_model=source_model, source_sha256=file_sha256(source_model), source_opset=opset_out.info.get("from"),
                          model_path=base, outputs=outputs, graph_counts=graph_counts,
                          matmul_share=matmul_macs / total_macs if total_macs else 0.0, host_is_target=is_target, host_reason=target_reason,
                          family=family)


# Dynamic INT8 quantizes the embedding tables too (Gather) when they are at least this share of the weights:
# MiniLM's 30522x384 table is 52 % of its weights, and left float it keeps dynamic INT8 at 0.65x the float size.
EMBEDDING_SHARE_FOR_GATHER = 0.25


def _apply_family_recipe(ctx: BuildContext, family: Family) -> None:
    """Start INT8 from the family's recipe (builder.family), unless the config names the ops itself."""
    plan, opt = ctx.plan, ctx.config.optimize
    recipe = family.int8_recipe()
    changes = []
    if recipe and plan.int8 is not None and not opt.int8.op_types:
        plan.int8_config = {**plan.int8_config, **recipe}
        plan.int8 = load_all_passes()["int8-static"].from_dict(plan.int8_config)
        changes.append("static INT8 quantizes only the weight MatMul/Gemm (Softmax, LayerNorm, GELU and attention stay float)")
    if plan.int8_dynamic_config is not None and family.embedding_share >= EMBEDDING_SHARE_FOR_GATHER:
        from builder.passes.onnx.int8_dynamic import Int8DynamicConfig

        op_types = (*Int8DynamicConfig().op_types, "Gather")
        plan.int8_dynamic_config = {**plan.int8_dynamic_config, "op_types": list(op_types)}
        changes.append(f"dynamic INT8 also quantizes the embedding tables ({family.embedding_share:.0%} of the weights)")
    ctx.note(f"model family: {family.name} ({family.reason})" + (f"; {'; '.join(changes)}" if changes else ""))


def _needs_static_shapes(ctx: BuildContext) -> bool:
    preferred = target_class(ctx.profile.runtimes[0].name)
    return preferred is not None and preferred.needs_static_shapes


def _fix_shapes(ctx: BuildContext, model_path: Path) -> Path:
    """Fix shapes the config names; fix the others from the data only where the target needs static
    shapes (TensorRT, TFLite): onnxruntime runs dynamic dims, and some models only accept them."""
    static = _needs_static_shapes(ctx)
    fixed = {k: list(v) for k, v in ctx.input_shapes.items() if k in (ctx.config.inputs or {}) or static}
    if not fixed:
        ctx.note("input shapes left dynamic (onnxruntime target, none set under `inputs:`); feeds use " +
                 ", ".join(f"{k} {list(v)}" for k, v in ctx.input_shapes.items()))
        return model_path
    static_pass = load_all_passes()["static-shapes"].from_dict({"shapes": fixed})
    try:
        return ctx.run_pass(static_pass, model_path).model_path
    except ModelError as exc:
        if static:
            hint = (f"profile {ctx.profile.name} runs {ctx.profile.runtimes[0].name}, which needs static shapes; "
                    "this model cannot be built for it")
        else:
            hint = "fix or drop the shapes under `inputs:` in edgepack.yaml (onnxruntime also runs dynamic shapes)"
        raise ModelError(f"{exc.message}. {hint}") from None


# ==================================================================== candidates
def build_candidates(ctx: BuildContext, reference: ReferenceModel) -> list[Candidate]:
    """Every variant the profile's targets build from the reference, with names unique in the build."""
    for runtime, target in ctx.targets:
        if target is None:
            ctx.note(f"{runtime.name}: edgepack builds no variants for this runtime")
            continue
        ctx.progress.start(f"{runtime.name} variants")
        try:
            candidates = target.candidates(ctx, reference)
        except RuntimeUnavailable as exc:
            ctx.note(f"{runtime.name} variants skipped: {exc.message}")
            continue
        taken = {c.name for c in ctx.built}
        for candidate in candidates:
            if candidate.name in taken:
                candidate.name = f"{runtime.name}-{candidate.name}"
            ctx.built.append(candidate)
        ctx.progress.finish(f"{runtime.name} variants", ", ".join(c.name for c in candidates) or "none")
    if not ctx.built:
        raise ConfigError(f"profile {ctx.profile.name}: no runtime edgepack can build for ({', '.join(r.name for r in ctx.profile.runtimes)})")
    return list(ctx.built)


# ==================================================================== evaluate
def evaluate(ctx: BuildContext, reference: ReferenceModel, candidates: list[Candidate]) -> Evaluation:
    """Measure every candidate, then judge each against the fp32 reference and the gates."""
    measured = []
    for candidate in candidates:  # one the runtime cannot load or run is dropped (ctx.attempt), the others go on
        measurement = ctx.attempt(candidate.name, candidate.runtime, candidate.precision,
                                  lambda: measure(ctx, reference, candidate), stage="verify")
        if measurement is not None:
            measured.append((candidate, _with_build_verdict(ctx, candidate, measurement)))
    reference_measurement = next(
        (m for c, m in measured if c.format == "onnx" and c.precision == "fp32" and c.model_path == reference.model_path), None)
    if reference_measurement is None:
        reference_candidate = Candidate("fp32", "fp32", "onnxruntime", "onnx", reference.model_path)
        reference_measurement = measure(ctx, reference, reference_candidate).model_copy(update={"name": "fp32-reference"})
    trials = [Trial(candidate, judge(ctx, m, reference_measurement)) for candidate, m in measured]
    return Evaluation(trials=trials, reference=reference_measurement)


def measure(ctx: BuildContext, reference: ReferenceModel, candidate: Candidate) -> VariantMeasurement:
    """Accuracy against fp32 in the candidate's runtime, host latency and the target's latency."""
    config, name, precision, info = ctx.config, candidate.name, candidate.precision, candidate.info
    ctx.progress.start(f"verify {name}")
    metrics = compare(ctx.outputs(candidate, ctx.validation_feeds), reference.outputs, ctx.validation_labels, config.metric)
    ctx.progress.finish(f"verify {name}", f"{candidate.runtime}: {config.metric} {metrics['accuracy']:.4f}, agreement {metrics['agreement']:.3f}")
    ctx.progress.start(f"latency {name}")
    bench = config.benchmark
    model_sha = candidate.sha256()
    adapter = get_adapter(candidate.runtime)
    latency, latency_cached = ctx.cached_result(
        "latency", (candidate.runtime, model_sha, bench.model_dump(), host_info()["cpu"]),
        lambda: adapter.latency(candidate.model_path, ctx.validation_feeds[0], bench.warmup, bench.runs, bench.threads),
    )
    ctx.progress.finish(f"latency {name}", f"p50 {latency['p50']:.3f} ms", latency_cached)
    estimate = estimate_latency_ms(reference.graph_counts, ctx.profile, precision, set(candidate.float_nodes),
                                   on_accelerator=_on_accelerator(ctx, candidate))
    # The host stands for the target only when the target is a CPU with the host's kernel features;
    # then every CPU runtime's measurement is the target's, and all variants compare on one footing.
    if reference.host_is_target:
        target_p50, target_p95, source = latency["p50"], latency["p95"], "host"
    else:
        target_p50, target_p95, source = estimate, estimate, "estimate"
    return VariantMeasurement(
        name=name, precision=precision, format=candidate.format, runtime=candidate.runtime, verified_in=adapter.name,
        size_bytes=candidate.size_bytes, model_sha256=model_sha, metric=config.metric, **{k: round(v, 6) for k, v in metrics.items()},
        latency_ms=latency, latency_cached=latency_cached, estimated_target_latency_ms=estimate,
        target_latency_ms=target_p50, target_latency_p95_ms=target_p95, target_latency_source=source,
        fallback_nodes=sorted(candidate.float_nodes) if candidate.float_nodes else list(info.get("fallback_nodes", [])),
        sparsity=info.get("sparsity"), quantization=info.get("quantization"), runnable=_runnable(ctx, candidate), notes=[],
        **{key: info[key] for key in ("tensorrt", "edgetpu", "io_quantization", "converter") if key in info},
        dropped_reason=_unrunnable_reason(ctx, candidate),
    )


def _runnable(ctx: BuildContext, candidate: Candidate) -> bool:
    spec = ctx.profile.runtime(candidate.runtime)
    return spec is not None and candidate.precision in (spec.precisions or ctx.profile.precisions)


def _unrunnable_reason(ctx: BuildContext, candidate: Candidate) -> str | None:
    if _runnable(ctx, candidate):
        return None
    if ctx.profile.runtime(candidate.runtime) is None:
        return f"{candidate.name}: profile {ctx.profile.name} does not list {candidate.runtime}"
    return f"{candidate.name}: profile {ctx.profile.name} cannot run {candidate.precision} on {candidate.runtime}"


def _on_accelerator(ctx: BuildContext, candidate: Candidate) -> bool:
    """Whether a candidate runs on the accelerator the profile's performance model describes."""
    preferred = ctx.profile.runtimes[0]
    preferred_class = target_class(preferred.name)
    preferred_target = preferred_class() if preferred_class is not None else None
    # The performance model describes the device the preferred runtime uses: an accelerator for
    # TensorRT, the Edge TPU delegate or OpenVINO on a GPU/NPU first; otherwise the CPU, and then it
    # describes every CPU runtime alike.
    if not (ctx.profile.accelerators and preferred_target is not None and preferred_target.drives_accelerator(preferred)):
        return True
    if candidate.runtime != preferred.name:
        return False
    return preferred_target.on_accelerator(candidate)


def _with_build_verdict(ctx: BuildContext, candidate: Candidate, measurement: VariantMeasurement) -> VariantMeasurement:
    """Drop a candidate its build already ruled out: nothing quantized, or its target refused it."""
    info = candidate.info
    if info.get("quantized_nodes") == 0:
        where = info.get("control_flow_nodes")
        why = (f"the compute lives inside control-flow subgraphs ({', '.join(where)}), which static quantization does not enter"
               if where else "no node of the quantized op types was found")
        reason = f"{candidate.name}: no node was quantized: {why}"
        ctx.note(reason)
        return measurement.model_copy(update={"dropped_reason": reason})
    if info.get("dropped_reason"):
        return measurement.model_copy(update={"dropped_reason": f"{candidate.name}: {info['dropped_reason']}"})
    return measurement


def judge(ctx: BuildContext, measurement: VariantMeasurement, reference: VariantMeasurement) -> Variant:
    """A measurement against the fp32 reference and the gates."""
    failed = evaluate_gates(measurement, ctx.gates, ctx.config.metric, reference.accuracy)
    reference_p50 = reference.latency_ms.p50
    return Variant(
        **dict(measurement),
        accuracy_delta=round(measurement.accuracy - reference.accuracy, 6),
        size_ratio=round(measurement.size_bytes / reference.size_bytes, 4),
        latency_ratio=round(measurement.latency_ms.p50 / reference_p50, 4) if reference_p50 else None,
        failed_gates=failed,
        passed=not failed and not measurement.dropped_reason and measurement.runnable,
    )


# ==================================================================== fallback
def apply_fallback(ctx: BuildContext, reference: ReferenceModel, evaluation: Evaluation) -> tuple[list[Trial], dict[str, list[SensitivityEntry]]]:
    """Variants that miss an accuracy gate, rebuilt to meet it: ONNX INT8 with its most harmful nodes in
    float (the fallback search), OpenVINO INT8 with NNCF's accuracy control (its target's recover_accuracy).
    Neither runs when a variant that passes is already as fast and as small: recovering accuracy only adds
    float ops, so the rebuilt variant could not be selected over it, and these are a build's slowest steps."""
    trials: list[Trial] = []
    sensitivity: dict[str, list[SensitivityEntry]] = {}
    for trial in evaluation.trials:
        fallback, target = _wants_fallback(ctx, trial), _recovering_target(ctx, trial)
        if fallback or target is not None:
            better = _passing_at_least_as_good(ctx, trial, evaluation.trials)
            if better is None and ctx.budget_spent(f"{trial.variant.name} accuracy recovery"):
                trials.append(_with_note(trial, "accuracy recovery not run: the build's time budget was spent"))
                continue
            if better is not None:
                why = (f"accuracy recovery not run: {better.variant.name} already passes every gate and is as fast "
                       f"({better.variant.target_latency_ms:.3g} vs {trial.variant.target_latency_ms:.3g} ms) and as small")
                ctx.progress.note(f"{trial.variant.name}: {why}")
                trials.append(_with_note(trial, why))
                continue
            try:
                if fallback and ctx.plan.calibration_auto:
                    trial = _choose_calibration(ctx, reference, evaluation.reference, trial)
                if fallback and _misses_accuracy(trial):
                    ranking = _rank_nodes(ctx, reference, trial.candidate)
                    sensitivity[trial.variant.name] = ranking
                    searched = _fallback(ctx, reference, evaluation.reference, trial, ranking)
                    # a rebuilt variant keeps what was said of the one it was searched from
                    for note in trial.variant.notes:
                        if note not in searched.variant.notes:
                            searched = _with_note(searched, note)
                    trial = searched
                else:
                    rebuilt = target.recover_accuracy(ctx, trial.candidate, [t.candidate for t in evaluation.trials])
                    if rebuilt is not None:
                        trial = Trial(rebuilt, judge(ctx, measure(ctx, reference, rebuilt), evaluation.reference))
            except (KeyboardInterrupt, SystemExit, MemoryError):
                raise
            except Exception as exc:  # the variant stays as it was measured, with its failed gate
                why = one_line_reason(exc)
                trial = _with_note(trial, f"the accuracy fallback failed ({why}); left as first built")
                ctx.progress.note(f"{trial.variant.name}: the accuracy fallback failed: {why}")
        trials.append(trial)
    return trials, sensitivity


def _misses_accuracy(trial: Trial) -> bool:
    return any(g.gate in ACCURACY_GATES for g in trial.variant.failed_gates)


def _wants_fallback(ctx: BuildContext, trial: Trial) -> bool:
    candidate = trial.candidate
    return (candidate.format == "onnx" and (candidate.info.get("quantization") or {}).get("format") == "QDQ"
            and "sparse" not in candidate.name and ctx.plan.int8 is not None and ctx.config.optimize.int8.fallback
            and _misses_accuracy(trial))


def _recovering_target(ctx: BuildContext, trial: Trial) -> Target | None:
    """The target that can rebuild this variant to meet its accuracy gate, if it missed one."""
    if not _misses_accuracy(trial):
        return None
    return next((target for runtime, target in ctx.targets if target is not None and runtime.name == trial.candidate.runtime
                 and target.recovers_accuracy(trial.candidate)), None)


def _passing_at_least_as_good(ctx: BuildContext, trial: Trial, trials: Sequence[Trial]) -> Trial | None:
    """A variant that passes and that a rebuilt `trial` could not beat: as fast on the target, as small,
    in a runtime the profile ranks no lower (selection's tie-breaker)."""
    order = {runtime.name: index for index, runtime in enumerate(ctx.profile.runtimes)}
    mine = trial.variant
    rank = order.get(mine.runtime, len(order))
    for other in trials:
        theirs = other.variant
        if (other is not trial and theirs.passed and theirs.runnable
                and theirs.target_latency_ms <= mine.target_latency_ms and theirs.size_bytes <= mine.size_bytes
                and order.get(theirs.runtime, len(order)) <= rank):
            return other
    return None


CALIBRATION_TRIALS = ("percentile", "entropy")


def _requantize(ctx: BuildContext, reference: ReferenceModel, reference_measurement: VariantMeasurement, candidate: Candidate,
                label: str, **changes: Any) -> Trial:
    """`candidate` quantized again from the reference with `changes` to the INT8 config, measured and judged."""
    pass_ = load_all_passes()["int8-static"].from_dict({**ctx.plan.int8_config, **changes})
    out = ctx.run_pass(pass_, reference.model_path, label=label)
    excluded = frozenset(changes.get("nodes_to_exclude") or ())
    rebuilt = Candidate(candidate.name, candidate.precision, candidate.runtime, candidate.format, out.model_path,
                        {**candidate.info, **out.info}, float_nodes=excluded)
    target = target_class(candidate.runtime)
    if target is not None:
        rebuilt = target().requantized(ctx, rebuilt)
    return Trial(rebuilt, judge(ctx, measure(ctx, reference, rebuilt), reference_measurement))


def _choose_calibration(ctx: BuildContext, reference: ReferenceModel, reference_measurement: VariantMeasurement,
                        trial: Trial) -> Trial:
    """calibration.method auto, and minmax missed the accuracy gate: quantize with the other methods too and
    keep the one that loses least on the validation data. The fallback search, if still needed, then
    builds with that method (the plan's INT8 config says so from here on)."""
    metric = ctx.config.metric
    drops = {"minmax": accuracy_drop(metric, reference_measurement.accuracy, trial.variant.accuracy)}
    best, best_method = trial, "minmax"
    for method in CALIBRATION_TRIALS:
        if ctx.budget_spent(f"{trial.variant.name} calibration {method}"):
            break
        attempt = _requantize(ctx, reference, reference_measurement, trial.candidate,
                              f"{trial.candidate.name} calibration {method}", calibration_method=method)
        drops[method] = accuracy_drop(metric, reference_measurement.accuracy, attempt.variant.accuracy)
        if drops[method] < drops[best_method] - 1e-12:
            best, best_method = attempt, method
    ctx.plan.int8_config = {**ctx.plan.int8_config, "calibration_method": best_method}
    measured = ", ".join(f"{method} {drop:.4g}" for method, drop in drops.items())
    return _with_note(best, f"calibration chosen by measurement: {best_method} (the {metric} loss with each: {measured})")


def _rank_nodes(ctx: BuildContext, reference: ReferenceModel, candidate: Candidate) -> list[SensitivityEntry]:
    from builder.sensitivity import rank_nodes

    ctx.progress.start(f"sensitivity {candidate.name}")
    ranking = rank_nodes(ctx, reference.model_path, ctx.validation_feeds, reference.outputs)
    ctx.progress.finish(f"sensitivity {candidate.name}", f"{len(ranking)} nodes ranked")
    return ranking


def _fallback(ctx: BuildContext, reference: ReferenceModel, reference_measurement: VariantMeasurement, trial: Trial,
              ranking: list[SensitivityEntry]) -> Trial:
    """Keep the k most sensitive nodes in float, for the smallest k that meets the accuracy gates.

    The nodes are ranked once; k is then searched, not counted up one at a time: k = 1 (the common case),
    then the limit (`max_fallback_nodes`): when even that misses the gate, the search stops there — and when
    it is no better than plain INT8, the plain variant stays, since more float nodes only cost speed. Else k
    is halved between the last miss and the last pass. That is 2 + log2(limit) builds at most instead of
    `limit`, assuming more float nodes never hurt accuracy (the ranking's premise)."""
    candidate = trial.candidate
    limit = min(ctx.config.optimize.int8.max_fallback_nodes, len(ranking))
    if limit < 1:
        return trial
    tried: dict[int, Trial] = {}

    def build(count: int) -> Trial:
        excluded = sorted(entry.node for entry in ranking[:count])
        tried[count] = _requantize(ctx, reference, reference_measurement, candidate, f"{candidate.name} fallback {count}",
                                   nodes_to_exclude=excluded)
        return tried[count]

    def meets(attempt: Trial) -> bool:
        return not any(g.gate in ACCURACY_GATES for g in attempt.variant.failed_gates)

    def drop(attempt: Trial) -> float:
        return accuracy_drop(ctx.config.metric, reference_measurement.accuracy, attempt.variant.accuracy)

    if meets(build(1)):
        return _with_note(tried[1], "1 most sensitive node kept in float to meet the accuracy gate")
    if limit == 1:
        return _with_note(tried[1], "still misses the accuracy gate with 1 node in float (max_fallback_nodes)")
    if ctx.budget_spent(f"{candidate.name} fallback search"):
        return _with_note(trial, "the fallback search was cut short by the time budget after 1 build; left as built")
    top = build(limit)
    if not meets(top):
        if drop(top) >= drop(trial) - 1e-12:
            return _with_note(trial, f"keeping up to {limit} of the most sensitive nodes in float did not reduce the "
                                     f"{ctx.config.metric} loss ({drop(top):.4g} vs {drop(trial):.4g} as built); left as built "
                                     f"after {len(tried)} fallback builds")
        return _with_note(top, f"still misses the accuracy gate with {limit} node(s) in float (max_fallback_nodes); "
                               f"{len(tried)} fallback builds")
    low, high = 1, limit  # low misses, high meets
    while high - low > 1:
        if ctx.budget_spent(f"{candidate.name} fallback search"):
            return _with_note(tried[high], f"{high} most sensitive node(s) kept in float to meet the accuracy gate; the "
                                           f"search was cut short by the time budget (between {low} and {high})")
        middle = (low + high) // 2
        if meets(build(middle)):
            high = middle
        else:
            low = middle
    return _with_note(tried[high], f"{high} most sensitive node(s) kept in float to meet the accuracy gate "
                                   f"(found in {len(tried)} fallback builds by halving)")


def _with_note(trial: Trial, note: str) -> Trial:
    return Trial(trial.candidate, trial.variant.model_copy(update={"notes": [*trial.variant.notes, note]}))


def note_unprofitable_int8(ctx: BuildContext, trials: list[Trial], reference: VariantMeasurement) -> list[Trial]:
    """Say so when INT8 does not pay on this host (it sometimes is slower and larger than float)."""
    variants = [t.variant for t in trials]
    out = []
    for trial in trials:
        record = trial.variant
        message = _int8_does_not_pay(record, variants, reference) if record.precision == "int8" else None
        if message:
            ctx.note(message)
            trial = _with_note(trial, message)
        out.append(trial)
    return out


def _int8_does_not_pay(record: Variant, variants: list[Variant], reference: VariantMeasurement) -> str | None:
    # Compare with the float variant of the same runtime where there is one.
    base = next((v for v in variants if v.precision == "fp32" and v.runtime == record.runtime and "sparse" not in v.name), reference)
    slower = record.latency_ms.p50 > base.latency_ms.p50 * 1.05
    larger = record.size_bytes > base.size_bytes
    if not (slower or larger):
        return None
    parts = []
    if slower:
        parts.append(f"{record.latency_ms.p50 / base.latency_ms.p50:.2f}x slower")
    if larger:
        parts.append(f"{record.size_bytes / base.size_bytes:.2f}x larger")
    return (f"{record.name} does not pay here: {' and '.join(parts)} than {base.name} on this host "
            f"(p50 measured with {record.verified_in} on the CPU)")


# ==================================================================== select
def select(ctx: BuildContext, trials: list[Trial]) -> Selection:
    """The variant to ship (or none), and for every variant one line saying why it was kept or dropped."""
    selected, reason = select_variant([t.variant for t in trials], ctx.config.metric, [r.name for r in ctx.profile.runtimes])
    decided = [Trial(t.candidate, t.variant.model_copy(update={"decision": _decision(t.variant, selected)})) for t in trials]
    return Selection(selected=selected, reason=reason, trials=decided)


def _decision(record: Variant, selected: str | None) -> str:
    if record.name == selected:
        return "selected"
    if record.dropped_reason:
        return f"dropped: {record.dropped_reason}"
    if record.failed_gates:
        return "dropped: " + "; ".join(g.message for g in record.failed_gates)
    return "kept as a candidate: passes every gate, not the fastest/smallest on the target"


# ==================================================================== package
def draft_report(ctx: BuildContext, reference: ReferenceModel, reference_measurement: VariantMeasurement, selection: Selection,
                 sensitivity: dict[str, list[SensitivityEntry]]) -> BuildReport:
    """The report as the bundle sees it: everything but the bundle itself and the build's totals."""
    config, profile = ctx.config, ctx.profile
    chosen = selection.chosen
    return BuildReport(
        schema_version=REPORT_SCHEMA_VERSION, name=config.name, version=config.version, profile=profile.name,
        profile_description=profile.description,
        runtime=chosen.variant.runtime if chosen else profile.runtimes[0].name,
        runtimes=[r.name for r in profile.runtimes], created_by=f"edgepack {__version__}",
        host=HostInfo(**host_info(), is_target=reference.host_is_target, reason=reference.host_reason),
        metric=config.metric, selected=selection.selected, selection_reason=selection.reason,
        gates=Gates(**dict(ctx.gates), passed=selection.selected is not None),
        reference=ReferenceSummary(name="fp32", accuracy=reference_measurement.accuracy, size_bytes=reference_measurement.size_bytes,
                                   validation_samples=len(ctx.validation_feeds)),
        variants=[t.variant for t in selection.trials], failed_variants=list(ctx.failed),
        model_family=ModelFamily(**reference.family.to_dict()) if reference.family else None, notes=list(ctx.notes), passes=list(ctx.pass_log), sensitivity=sensitivity,
        estimate_label=ESTIMATE_LABEL, lineage=_lineage(ctx, reference.source_sha256),
        source_model=SourceModel(path=str(reference.source_model), sha256=reference.source_sha256, opset=reference.source_opset),
        bundle=None, cache=CacheStats(hits=ctx.cache.hits, misses=ctx.cache.misses, enabled=ctx.cache.enabled), duration_s=0.0,
    )


def _lineage(ctx: BuildContext, source_sha: str) -> Lineage:
    data = ctx.data
    return Lineage(
        source_model_sha256=source_sha,
        calibration_sha256=data.calibration.sha256 if data.calibration else None,
        validation_sha256=data.validation.sha256 if data.validation else None,
        config_sha256=cache_key("config", ctx.config.model_dump(mode="json")),
        profile_sha256=cache_key("profile", ctx.profile.model_dump(mode="json")),
        tools=ctx.tools,
    )


def package(ctx: BuildContext, reference: ReferenceModel, selection: Selection, report: BuildReport, signing_key: Any) -> Packaged:
    """The signed bundle of the selected variant (none when nothing passed)."""
    chosen = selection.chosen
    if chosen is None:
        return Packaged(report=report, files=[])
    from builder.package import package_bundle

    ctx.progress.start("package")
    toolchain = _toolchain_steps(ctx, chosen.candidate)
    bundle_path = _stage_dir(ctx) / f"{ctx.stem}.edgepack"
    feeds = ctx.validation_feeds
    outputs = ctx.outputs(chosen.candidate, feeds)

    def compute_stats() -> dict[str, Any]:
        from builder.stats import reference_stats

        inputs = {name: np.stack([feed[name] for feed in feeds]) for name in feeds[0]}
        return reference_stats(inputs, outputs.arrays, source=f"validation data ({len(feeds)} samples) through the {chosen.variant.name} model")

    stats, _ = ctx.cached_result("stats", (chosen.variant.model_sha256, ctx.data.validation.sha256, len(feeds), chosen.variant.name), compute_stats)
    info = package_bundle(
        bundle_path=bundle_path, candidate=chosen.candidate, base_model=reference.model_path, variant=chosen.variant, report=report,
        profile=ctx.profile, runtime=ctx.profile.runtime(chosen.candidate.runtime), val_feeds=feeds, outputs=outputs, stats=stats,
        config=ctx.config, tools=ctx.tools, private_key=signing_key,
    )
    bundle = BundleInfo(path=str(ctx.request.out_dir / bundle_path.name), sha256=info.sha256, size_bytes=info.size_bytes)
    ctx.progress.finish("package", f"{info.size_bytes / 1024:.0f} KB")
    return Packaged(report=report.model_copy(update={"bundle": bundle, "toolchain": toolchain}), files=[bundle_path])


def _toolchain_steps(ctx: BuildContext, candidate: Candidate) -> list[ToolchainStep]:
    """Vendor-toolchain steps for the selected variant (Edge TPU compiler, trtexec), run in containers
    with `--toolchain docker`; their outputs join the bundle under toolchain/."""
    from builder.toolchain import run_step, steps_for_candidate

    steps = steps_for_candidate(ctx.profile, candidate.runtime, candidate.model_path, ctx.work_dir / "toolchain", precision=candidate.precision,
                                sparse=bool(candidate.info.get("tensorrt", {}).get("sparse_tensor_cores")))
    records = []
    for step in steps:
        ctx.progress.start(f"toolchain {step.step}")
        result = run_step(step, "docker" if ctx.request.toolchain == "docker" else "none")
        if result.status == "ran":
            for name, path in sorted(result.outputs.items()):
                candidate.files[f"toolchain/{Path(name).name}"] = path
        elif result.status == "failed":
            ctx.note(f"toolchain step {step.step} failed: {result.message}")
        ctx.progress.finish(f"toolchain {step.step}", result.status)
        records.append(ToolchainStep(step=step.step, image=step.image, command=" ".join(step.command), status=result.status, message=result.message))
    return records


# ==================================================================== publish
def _stage_dir(ctx: BuildContext) -> Path:
    """Where outputs wait until the build is done (inside the work folder)."""
    stage = ctx.work_dir / "out"
    stage.mkdir(exist_ok=True)
    return stage


def publish_artifacts(ctx: BuildContext, candidates: list[Candidate]) -> list[Path]:
    """Stage the files targets asked to publish beside the report (a converter's log), once each."""
    stage = _stage_dir(ctx)
    files = []
    for artifacts in [*(c.artifacts for c in candidates), ctx.artifacts]:
        for name, path in artifacts.items():
            published = stage / f"{ctx.stem}.{name}"
            if not published.exists():
                shutil.copyfile(path, published)
                files.append(published)
    return files


def write_reports(ctx: BuildContext, report: BuildReport) -> list[Path]:
    from builder.report_html import write_report_html

    stage = _stage_dir(ctx)
    json_path = stage / f"{ctx.stem}.report.json"
    json_path.write_text(report.to_json())
    html_path = stage / f"{ctx.stem}.report.html"
    write_report_html(report, html_path)
    return [json_path, html_path]


def publish(out_dir: Path, files: list[Path]) -> list[Path]:
    """Copy staged files into the output folder, each through an atomic rename."""
    published = []
    for path in files:
        target = out_dir / path.name
        with path.open("rb") as source, atomic_writer(target) as handle:
            shutil.copyfileobj(source, handle)
        published.append(target)
    return published
