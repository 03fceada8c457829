"""The build pipeline for onnxruntime targets.

    validate everything (config, profile, data, pass configs, signing key)
      → check → static shapes → opset upgrade → simplify           (the fp32 reference)
      → variants: fp16 · int8 (static Q/DQ) · int8-dynamic · pruned
      → verify each against fp32 on the validation set → INT8 accuracy fallback
      → host latency + target estimate → gates → selection → bundle + report

Nothing is written to the output folder until the end, and then file by file through atomic
renames, so a failed build leaves the folder as it was.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from builder.cache import BuildCache, cache_key
from builder.data import BuildData, load_build_data
from builder.estimate import ESTIMATE_LABEL, count_graph, estimate_latency_ms
from builder.hostinfo import host_info, host_is_target
from builder.latency import measure_latency
from builder.onnx_utils import elem_type_to_numpy, graph_inputs, load_model, sha256_file, tool_versions, value_info_shape
from builder.passes.base import Pass, PassContext, PassOutput, load_all_passes
from builder.select import evaluate_gates, select_variant
from builder.runtimes import RuntimeUnavailable, get_adapter
from builder.targets import Candidate, get_target
from builder.verify import Outputs, compare, load_metric
from edgepack import __version__
from edgepack.config import BuildConfig, load_build_config
from edgepack.errors import ConfigError, DataError, EdgepackError, ModelError, PassError

REPORT_SCHEMA_VERSION = 1


class ProgressSink(Protocol):
    def start(self, task: str) -> None: ...
    def finish(self, task: str, detail: str = "", cached: bool = False) -> None: ...
    def note(self, message: str) -> None: ...


class _SilentProgress:
    def start(self, task: str) -> None:
        pass

    def finish(self, task: str, detail: str = "", cached: bool = False) -> None:
        pass

    def note(self, message: str) -> None:
        pass


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


@dataclasses.dataclass
class BuildResult:
    report: dict[str, Any]
    exit_code: int
    outputs: list[Path]
    signing_key_path: Path | None = None
    dev_key_created: bool = False


@dataclasses.dataclass
class _Plan:
    """Every pass the build will run, validated before the first one starts."""

    check: Pass
    static_shapes: Pass | None
    opset: Pass
    simplify: Pass
    fp16: Pass | None
    int8: Pass | None
    int8_dynamic_config: dict[str, Any] | None
    prune: Pass | None
    int8_config: dict[str, Any]


class Builder:
    def __init__(self, request: BuildRequest, progress: ProgressSink | None = None) -> None:
        self.request = request
        self.progress = progress or _SilentProgress()
        self.pass_log: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.cache = BuildCache(request.cache_dir, enabled=request.use_cache)
        self.tools = tool_versions()
        # Files a target wants next to the report even when it built no candidate (a converter's log).
        self.extra_artifacts: dict[str, Path] = {}

    # ---------------------------------------------------------------- validation (nothing runs yet)
    def _validate(self) -> None:
        from hardware_profiles import load_profile

        overrides = {"model": str(self.request.model_override.resolve())} if self.request.model_override else None
        self.config: BuildConfig = load_build_config(self.request.config_path, overrides)
        self.profile = load_profile(self.request.profile)
        self.targets = [(r, get_target(r.name)) for r in self.profile.runtimes]
        if not any(target for _, target in self.targets):
            listed = ", ".join(r.name for r in self.profile.runtimes)
            raise ConfigError(f"profile {self.profile.name}: edgepack builds for none of its runtimes ({listed})")
        self.gates = {
            **{k: v for k, v in self.profile.default_gates.model_dump().items() if v is not None},
            **{k: v for k, v in self.config.gates.model_dump().items() if v is not None},
        }
        model_path = self.config.model_path
        if not model_path.is_file():
            raise ModelError(f"model {model_path} does not exist")
        self.data: BuildData = load_build_data(self.config.calibration_path, self.config.validation_path, self.config.data.labels_key)
        if self.data.validation is None:
            raise ConfigError(f"{self.request.config_path}: data.validation is required: every variant is verified against fp32 on it")
        if self.config.metric in ("top1",) and self.data.validation.labels is None:
            raise DataError(
                f"metric top1 needs labels: validation data {self.data.validation.path.name} has no {self.config.data.labels_key!r} array "
                "(add labels or use metric: agreement)"
            )
        load_metric(self.config.metric)
        precisions = self.config.optimize.precisions
        if "fp32" not in precisions:
            self.notes.append("fp32 is always built: it is the reference every variant is verified against")
        want_int8 = "int8" in precisions and "int8" in self.profile.precisions
        if want_int8 and self.data.calibration is None:
            raise DataError("int8 needs calibration data: set data.calibration in edgepack.yaml (or drop int8 from optimize.precisions)")
        for precision in precisions:
            if precision not in self.profile.precisions:
                self.notes.append(f"{precision} skipped: profile {self.profile.name} runs {', '.join(self.profile.precisions)}")
        passes = load_all_passes()
        opt = self.config.optimize
        int8_config = {
            "calibration_method": opt.calibration.method,
            "percentile": opt.calibration.percentile,
            "calibration_samples": opt.calibration.samples,
            "per_channel": opt.int8.per_channel,
            **({"op_types": list(opt.int8.op_types)} if opt.int8.op_types else {}),
        }
        self.plan = _Plan(
            check=passes["check"].from_dict({"runtime": "onnxruntime"}),
            static_shapes=None,  # needs the model's inputs; built right after the check
            opset=passes["opset-upgrade"].from_dict({"min_opset": 13}),
            simplify=passes["simplify"].from_dict({"enabled": opt.simplify}),
            fp16=passes["fp16"].from_dict({}) if ("fp16" in precisions and "fp16" in self.profile.precisions) else None,
            int8=passes["int8-static"].from_dict(int8_config) if want_int8 else None,
            int8_dynamic_config={} if (opt.int8.dynamic != "never" and "int8" in precisions and "int8" in self.profile.precisions) else None,
            prune=passes["prune"].from_dict(opt.prune.model_dump()) if opt.prune else None,
            int8_config=int8_config,
        )
        if self.plan.int8_dynamic_config is not None:
            passes["int8-dynamic"].from_dict(self.plan.int8_dynamic_config)
        usable = []
        for runtime, target in self.targets:
            if target is not None:
                try:
                    target.validate(self)
                except RuntimeUnavailable as exc:
                    # A runtime whose extra is not installed: build for the profile's other runtimes.
                    self.notes.append(f"{runtime.name} variants skipped: {exc.message}")
                    target = None
            usable.append((runtime, target))
        self.targets = usable
        if not any(target for _, target in self.targets):
            raise ConfigError(f"profile {self.profile.name}: no runtime it lists can be built on this host ({'; '.join(self.notes)})")
        # The model's inputs against the data: the user's input, so checked before any pass runs.
        model = load_model(model_path)
        self.shapes = self._static_shapes_for(model)
        dtypes = {v.name: np.dtype(elem_type_to_numpy(v.type.tensor_type.elem_type)) for v in graph_inputs(model)}
        self.data.check_against(self.shapes, dtypes)
        from edgepack.signing import resolve_signing_key

        self.signing_key, self.signing_key_path, self.dev_key = resolve_signing_key(self.request.signing_key)

    # ---------------------------------------------------------------- running passes through the cache
    def _run_pass(self, pass_: Pass, input_model: Path, label: str | None = None, quiet: bool = False) -> PassOutput:
        label = label or pass_.name
        if not quiet:
            self.progress.start(label)
        started = time.perf_counter()
        key = cache_key(
            "pass", pass_.name, pass_.code_sha256(), pass_.config_json(), _model_sha(input_model), self.tools,
            self.profile.model_dump(mode="json") if pass_.uses_profile else None,
            self.data.calibration.sha256 if (pass_.uses_calibration_data and self.data.calibration) else None,
            self.data.validation.sha256 if (pass_.uses_validation_data and self.data.validation) else None,
            self.config.metric if pass_.uses_validation_data else None,
        )
        hit = self.cache.get_model(key)
        if hit is not None:
            model_path, info = hit
            output = PassOutput(model_path=model_path, info=info,
                                sidecars=[model_path.with_suffix(".bin")] if model_path.suffix == ".xml" else [])
            cached = True
        else:
            ctx = PassContext(work_dir=self.work_dir / label.replace("/", "_").replace(" ", "_"), profile=self.profile, build=self.config, data=self.data,
                              cache_dir=self.cache.root if self.cache.enabled else None)
            ctx.work_dir.mkdir(parents=True, exist_ok=True)
            try:
                output = pass_.run(input_model, ctx)
            except EdgepackError:
                raise
            except Exception as exc:  # a converter's own failure: name the pass, keep it to one line
                detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                raise PassError(f"pass {pass_.name} failed on {input_model.name}: {detail}", pass_name=pass_.name) from exc
            stored = self.cache.put_model(key, output.model_path, output.info, output.sidecars)
            output = PassOutput(model_path=stored, info=output.info,
                                sidecars=[stored.parent / s.name for s in output.sidecars] if stored != output.model_path else output.sidecars)
            cached = False
        seconds = time.perf_counter() - started
        if not quiet:
            self.pass_log.append({"name": label, "pass": pass_.name, "seconds": round(seconds, 3), "cached": cached})
            self.progress.finish(label, f"{seconds:.2f} s", cached)
        return output

    def _cached_result(self, kind: str, parts: tuple, compute: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
        key = cache_key(kind, *parts, self.tools)
        hit = self.cache.get_result(key)
        if hit is not None:
            return hit, True
        result = compute()
        self.cache.put_result(key, result)
        return result, False

    # ---------------------------------------------------------------- the build
    def run(self) -> BuildResult:
        started = time.perf_counter()
        self._validate()
        self.work_dir = Path(tempfile.mkdtemp(prefix="edgepack-build-"))
        try:
            return self._build(started)
        finally:
            if not self.request.keep_work:
                shutil.rmtree(self.work_dir, ignore_errors=True)

    def _on_accelerator(self, candidate: Candidate) -> bool:
        """Whether a candidate runs on the accelerator the profile's performance model describes."""
        preferred = self.profile.runtimes[0]
        # The performance model describes the device the preferred runtime uses: an accelerator for
        # TensorRT, the Edge TPU delegate or OpenVINO on a GPU/NPU first; otherwise the CPU, and then it
        # describes every CPU runtime alike.
        targets_accelerator = bool(self.profile.accelerators) and (
            preferred.name == "tensorrt"
            or (preferred.name == "tflite" and "edgetpu" in preferred.delegates)
            or (preferred.name == "openvino" and bool(preferred.devices) and preferred.devices[0] in ("GPU", "NPU")))
        if not targets_accelerator:
            return True
        if candidate.runtime != preferred.name:
            return False
        if candidate.runtime == "tflite":
            return "edgetpu" in candidate.info  # only the full-integer model the Edge TPU compiler maps
        return True

    def _toolchain_steps(self, candidate: Candidate) -> list[dict[str, Any]]:
        """Vendor-toolchain steps for the selected variant (Edge TPU compiler, trtexec), run in containers
        with `--toolchain docker`; their outputs join the bundle under toolchain/."""
        from builder.toolchain import run_step, steps_for_candidate

        work = self.work_dir / "toolchain"
        steps = steps_for_candidate(self.profile, candidate.runtime, candidate.model_path, work, precision=candidate.precision,
                                    sparse=bool(candidate.info.get("tensorrt", {}).get("sparse_tensor_cores")))
        records = []
        for step in steps:
            self.progress.start(f"toolchain {step.step}")
            result = run_step(step, "docker" if self.request.toolchain == "docker" else "none")
            if result.status == "ran":
                for name, path in sorted(result.outputs.items()):
                    candidate.files[f"toolchain/{Path(name).name}"] = path
            elif result.status == "failed":
                self.notes.append(f"toolchain step {step.step} failed: {result.message}")
            self.progress.finish(f"toolchain {step.step}", result.status)
            records.append({"step": step.step, "image": step.image, "command": " ".join(step.command),
                            "status": result.status, "message": result.message})
        return records

    def _needs_static_shapes(self) -> bool:
        return any(r.name in ("tensorrt", "tflite") for r in self.profile.runtimes[:1])

    def _static_shapes_for(self, model: Any) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        configured = dict(self.config.inputs or {})
        model_inputs = graph_inputs(model)
        unknown = sorted(set(configured) - {i.name for i in model_inputs})
        if unknown:
            raise ConfigError(f"inputs {unknown} in {self.request.config_path.name} are not model inputs ({', '.join(i.name for i in model_inputs)})")
        for value in model_inputs:
            dims = value_info_shape(value)
            if value.name in configured:
                shapes[value.name] = tuple(configured[value.name])
                continue
            if dims and all(isinstance(d, int) for d in dims) or not dims and value.type.tensor_type.HasField("shape"):
                shapes[value.name] = tuple(int(d) for d in dims)
                continue
            split = self.data.validation or self.data.calibration
            array = split.arrays.get(value.name) if split else None
            if array is None:
                raise ModelError(
                    f"input {value.name!r} has dynamic dims {dims} and no data to take a shape from; "
                    f"set inputs: {{{value.name}: [...]}} in edgepack.yaml"
                )
            sample = tuple(array.shape[1:])
            if len(sample) == len(dims):
                shapes[value.name] = sample
            elif len(sample) + 1 == len(dims):
                shapes[value.name] = (1, *sample)
            else:
                raise DataError(f"array {value.name!r} has per-sample shape {list(sample)}, which fits no shape of model input {value.name!r} {dims}")
        return shapes

    def _build(self, started: float) -> BuildResult:
        config, profile = self.config, self.profile
        source_model = config.model_path
        source_sha = sha256_file(source_model)
        shapes = self.shapes
        checked = self._run_pass(self.plan.check, source_model)
        # Fix shapes the config names; fix the others from the data only where the target needs static
        # shapes (TensorRT, TFLite): onnxruntime runs dynamic dims, and some models only accept them.
        fixed = {k: list(v) for k, v in shapes.items() if k in (config.inputs or {}) or self._needs_static_shapes()}
        current = checked.model_path
        if fixed:
            static_pass = load_all_passes()["static-shapes"].from_dict({"shapes": fixed})
            try:
                current = self._run_pass(static_pass, current).model_path
            except ModelError as exc:
                if self._needs_static_shapes():
                    hint = (f"profile {profile.name} runs {profile.runtimes[0].name}, which needs static shapes; "
                            "this model cannot be built for it")
                else:
                    hint = "fix or drop the shapes under `inputs:` in edgepack.yaml (onnxruntime also runs dynamic shapes)"
                raise ModelError(f"{exc.message}. {hint}") from None
        else:
            self.notes.append("input shapes left dynamic (onnxruntime target, none set under `inputs:`); feeds use " +
                              ", ".join(f"{k} {list(v)}" for k, v in shapes.items()))
        opset_out = self._run_pass(self.plan.opset, current)
        current = opset_out.model_path
        base = self._run_pass(self.plan.simplify, current).model_path

        val_feeds = list(self.data.feeds("validation", limit=config.verify.max_samples))
        labels = self.data.validation.labels
        if labels is not None:
            labels = labels[: len(val_feeds)]
        reference = Candidate("fp32", "fp32", "onnxruntime", "onnx", base)
        reference_outputs = self._outputs(reference, val_feeds)
        graph_counts = count_graph(base)
        total_macs = sum(n["macs"] for n in graph_counts)
        matmul_macs = sum(n["macs"] for n in graph_counts if n["op_type"] in ("MatMul", "Gemm"))
        self.matmul_share = matmul_macs / total_macs if total_macs else 0.0
        self.graph_counts = graph_counts
        is_target, target_reason = host_is_target(profile)
        self.is_target = is_target
        control_flow = [f"{n.op_type} {n.name}" for n in load_model(base).graph.node if n.op_type in ("If", "Loop", "Scan")]
        if control_flow:
            self.notes.append(f"the latency estimate leaves out compute inside control-flow subgraphs ({', '.join(control_flow)})")

        built: list[Candidate] = []
        self.onnx_family_runtime = None
        for runtime, target in self.targets:
            if target is None:
                self.notes.append(f"{runtime.name}: edgepack builds no variants for this runtime")
                continue
            self.progress.start(f"{runtime.name} variants")
            try:
                candidates = target.candidates(self, base)
            except RuntimeUnavailable as exc:
                self.notes.append(f"{runtime.name} variants skipped: {exc.message}")
                continue
            taken = {c.name for c in built}
            for candidate in candidates:
                if candidate.name in taken:
                    candidate.name = f"{runtime.name}-{candidate.name}"
                built.append(candidate)
            self.progress.finish(f"{runtime.name} variants", ", ".join(c.name for c in candidates) or "none")
        if not built:
            raise ConfigError(f"profile {profile.name}: no runtime edgepack can build for ({', '.join(r.name for r in profile.runtimes)})")
        self.candidates = {c.name: c for c in built}

        variants: list[dict[str, Any]] = []
        reference_record: dict[str, Any] | None = None
        for candidate in built:
            record = self._evaluate(candidate, val_feeds, labels, reference_outputs)
            info = candidate.info
            if info.get("quantized_nodes") == 0:
                where = info.get("control_flow_nodes")
                why = (f"the compute lives inside control-flow subgraphs ({', '.join(where)}), which static quantization does not enter"
                       if where else "no node of the quantized op types was found")
                record["dropped_reason"] = f"{candidate.name}: no node was quantized: {why}"
                self.notes.append(record["dropped_reason"])
            elif info.get("dropped_reason"):
                record["dropped_reason"] = f"{candidate.name}: {info['dropped_reason']}"
            if candidate.format == "onnx" and candidate.precision == "fp32" and candidate.model_path == base and reference_record is None:
                reference_record = record
            variants.append(record)
        if reference_record is None:
            reference_record = self._evaluate(reference, val_feeds, labels, reference_outputs)
            reference_record["name"] = "fp32-reference"
        reference_accuracy = reference_record["accuracy"]
        for record in variants:
            self._apply_reference(record, reference_record)

        sensitivity: dict[str, Any] = {}
        for index, record in enumerate(variants):
            candidate = self.candidates[record["name"]]
            if (candidate.format == "onnx" and candidate.info.get("quantization", {}).get("format") == "QDQ"
                    and "sparse" not in candidate.name and self.plan.int8 and config.optimize.int8.fallback
                    and any(g["gate"] in ("max_accuracy_drop", "min_agreement") for g in record["failed_gates"])):
                new_record, ranking = self._fallback(record, candidate, base, val_feeds, labels, reference_outputs, reference_record)
                sensitivity[record["name"]] = ranking
                variants[index] = new_record
        self._int8_notes(variants, reference_record)
        selected, reason = select_variant(variants, config.metric, [r.name for r in profile.runtimes])
        for record in variants:
            record["decision"] = _decision(record, selected)
        gates_passed = selected is not None
        report: dict[str, Any] = {
            "schema_version": REPORT_SCHEMA_VERSION,
            "name": config.name,
            "version": config.version,
            "profile": profile.name,
            "profile_description": profile.description,
            "runtime": next((v["runtime"] for v in variants if v["name"] == selected), profile.runtimes[0].name),
            "runtimes": [r.name for r in profile.runtimes],
            "created_by": f"edgepack {__version__}",
            "host": {**host_info(), "is_target": is_target, "reason": target_reason},
            "metric": config.metric,
            "selected": selected,
            "selection_reason": reason,
            "gates": {**{k: self.gates.get(k) for k in ("max_accuracy_drop", "max_p95_latency_ms", "max_size_mb", "min_agreement")}, "passed": gates_passed},
            "reference": {"name": "fp32", "accuracy": reference_accuracy, "size_bytes": reference_record["size_bytes"],
                          "validation_samples": len(val_feeds)},
            "variants": variants,
            "notes": self.notes,
            "passes": self.pass_log,
            "sensitivity": sensitivity,
            "estimate_label": ESTIMATE_LABEL,
            "lineage": self._lineage(source_sha),
            "source_model": {"path": str(source_model), "sha256": source_sha, "opset": opset_out.info.get("from")},
            "bundle": None,
        }
        stage = self.work_dir / "out"
        stage.mkdir()
        stem = f"{config.name}-{config.version}-{profile.name}"
        files: list[Path] = []
        if selected is not None:
            from builder.package import package_bundle

            self.progress.start("package")
            chosen = next(v for v in variants if v["name"] == selected)
            chosen_candidate = self.candidates[selected]
            report["toolchain"] = self._toolchain_steps(chosen_candidate)
            bundle_path = stage / f"{stem}.edgepack"
            outputs = self._outputs(chosen_candidate, val_feeds)

            def compute_stats() -> dict[str, Any]:
                from builder.stats import reference_stats

                inputs = {name: np.stack([feed[name] for feed in val_feeds]) for name in val_feeds[0]}
                return reference_stats(inputs, outputs.arrays, source=f"validation data ({len(val_feeds)} samples) through the {selected} model")

            stats, _ = self._cached_result("stats", (chosen["model_sha256"], self.data.validation.sha256, len(val_feeds), selected), compute_stats)
            info = package_bundle(
                bundle_path=bundle_path, candidate=chosen_candidate, base_model=base, variant=chosen, report=report, profile=profile,
                runtime=profile.runtime(chosen_candidate.runtime), val_feeds=val_feeds, outputs=outputs, stats=stats, config=config, tools=self.tools,
                private_key=self.signing_key,
            )
            final_bundle = self.request.out_dir / bundle_path.name
            report["bundle"] = {"path": str(final_bundle), "sha256": info.sha256, "size_bytes": info.size_bytes}
            files.append(bundle_path)
            self.progress.finish("package", f"{info.size_bytes / 1024:.0f} KB")
        for candidate in [*built, Candidate("", "", "", "", base, artifacts=self.extra_artifacts)]:
            for name, path in candidate.artifacts.items():
                published = stage / f"{stem}.{name}"
                if not published.exists():
                    shutil.copyfile(path, published)
                    files.append(published)
        report["cache"] = {"hits": self.cache.hits, "misses": self.cache.misses, "enabled": self.cache.enabled}
        report["duration_s"] = round(time.perf_counter() - started, 3)
        from builder.report_html import render_report_html

        json_path = stage / f"{stem}.report.json"
        json_path.write_text(json.dumps(report, indent=2, sort_keys=False, default=str) + "\n")
        html_path = stage / f"{stem}.report.html"
        html_path.write_text(render_report_html(report))
        files += [json_path, html_path]
        outputs = self._publish(files)
        return BuildResult(report=report, exit_code=0 if gates_passed else 1, outputs=outputs,
                           signing_key_path=self.signing_key_path, dev_key_created=self.dev_key)

    # ---------------------------------------------------------------- pieces
    def _outputs(self, candidate: Candidate, feeds: list[dict[str, np.ndarray]]) -> Outputs:
        """Outputs of a candidate on the validation feeds, in its own runtime (cached when small)."""
        key = cache_key("outputs", candidate.runtime, candidate.sha256(), self.data.validation.sha256, len(feeds), self.tools)
        hit = self.cache.get_result(key)
        if hit is not None:
            return Outputs({name: np.asarray(v["data"], dtype=np.float64).reshape(v["shape"]) for name, v in hit.items()})
        outputs = get_adapter(candidate.runtime).run(candidate.model_path, feeds)
        # Cache small output sets only: a JSON of millions of floats costs more than recomputing.
        if sum(a.size for a in outputs.arrays.values()) <= 200_000:
            self.cache.put_result(key, {name: {"shape": list(a.shape), "data": a.ravel().tolist()} for name, a in outputs.arrays.items()})
        return outputs

    def _evaluate(self, candidate: Candidate, val_feeds, labels, reference_outputs: Outputs) -> dict[str, Any]:
        config, name, precision = self.config, candidate.name, candidate.precision
        info, float_nodes = candidate.info, candidate.float_nodes
        self.progress.start(f"verify {name}")
        outputs = self._outputs(candidate, val_feeds)
        metrics = compare(outputs, reference_outputs, labels, config.metric)
        self.progress.finish(f"verify {name}", f"{candidate.runtime}: {config.metric} {metrics['accuracy']:.4f}, agreement {metrics['agreement']:.3f}")
        self.progress.start(f"latency {name}")
        bench = config.benchmark
        model_sha = candidate.sha256()
        adapter = get_adapter(candidate.runtime)
        latency, latency_cached = self._cached_result(
            "latency", (candidate.runtime, model_sha, bench.model_dump(), host_info()["cpu"]),
            lambda: adapter.latency(candidate.model_path, val_feeds[0], bench.warmup, bench.runs, bench.threads),
        )
        self.progress.finish(f"latency {name}", f"p50 {latency['p50']:.3f} ms", latency_cached)
        estimate = estimate_latency_ms(self.graph_counts, self.profile, precision, set(float_nodes),
                                       on_accelerator=self._on_accelerator(candidate))
        # The host stands for the target only when the target is a CPU with the host's kernel features;
        # then every CPU runtime's measurement is the target's, and all variants compare on one footing.
        if self.is_target:
            target_p50, target_p95, source = latency["p50"], latency["p95"], "host"
        else:
            target_p50, target_p95, source = estimate, estimate, "estimate"
        runtime_spec = self.profile.runtime(candidate.runtime)
        runtime_precisions = runtime_spec.precisions if runtime_spec and runtime_spec.precisions else self.profile.precisions
        runnable = runtime_spec is not None and precision in runtime_precisions
        record: dict[str, Any] = {
            "name": name,
            "precision": precision,
            "format": candidate.format,
            "runtime": candidate.runtime,
            "verified_in": adapter.name,
            "size_bytes": candidate.size_bytes,
            "model_sha256": model_sha,
            "metric": config.metric,
            **{k: round(v, 6) for k, v in metrics.items()},
            "latency_ms": latency,
            "latency_cached": latency_cached,
            "estimated_target_latency_ms": estimate,
            "target_latency_ms": target_p50,
            "target_latency_p95_ms": target_p95,
            "target_latency_source": source,
            "fallback_nodes": sorted(float_nodes) if float_nodes else list(info.get("fallback_nodes", [])),
            "sparsity": info.get("sparsity"),
            "quantization": info.get("quantization"),
            "runnable": runnable,
            "notes": [],
        }
        for key in ("tensorrt", "edgetpu", "io_quantization", "converter"):
            if key in info:
                record[key] = info[key]
        if not runnable:
            record["dropped_reason"] = (f"{name}: profile {self.profile.name} cannot run {precision} on {candidate.runtime}"
                                        if runtime_spec else f"{name}: profile {self.profile.name} does not list {candidate.runtime}")
        return record

    def _apply_reference(self, record: dict[str, Any], reference: dict[str, Any]) -> None:
        record["accuracy_delta"] = round(record["accuracy"] - reference["accuracy"], 6)
        record["size_ratio"] = round(record["size_bytes"] / reference["size_bytes"], 4)
        record["latency_ratio"] = round(record["latency_ms"]["p50"] / reference["latency_ms"]["p50"], 4) if reference["latency_ms"]["p50"] else None
        record["failed_gates"] = evaluate_gates(record, self.gates, self.config.metric, reference["accuracy"])
        record["passed"] = not record["failed_gates"] and not record.get("dropped_reason") and record["runnable"]

    def _fallback(self, record, candidate: Candidate, base: Path, val_feeds, labels, reference_outputs, reference_record):
        from builder.sensitivity import rank_nodes

        self.progress.start(f"sensitivity {candidate.name}")
        passes = load_all_passes()
        ranking = rank_nodes(self, base, val_feeds, reference_outputs)
        self.progress.finish(f"sensitivity {candidate.name}", f"{len(ranking)} nodes ranked")
        limit = min(self.config.optimize.int8.max_fallback_nodes, len(ranking))
        best = record
        for count in range(1, limit + 1):
            excluded = tuple(sorted(entry["node"] for entry in ranking[:count]))
            pass_ = passes["int8-static"].from_dict({**self.plan.int8_config, "nodes_to_exclude": list(excluded)})
            out = self._run_pass(pass_, base, label=f"{candidate.name} fallback {count}")
            trial = Candidate(candidate.name, candidate.precision, candidate.runtime, candidate.format, out.model_path,
                              {**candidate.info, **out.info}, float_nodes=frozenset(excluded))
            if candidate.runtime == "tensorrt":
                from builder.targets.onnx import tensorrt_engine_spec

                trial.info["tensorrt"] = tensorrt_engine_spec(trial, any(a.sparse_int8_tops for a in self.profile.accelerators))
            trial_record = self._evaluate(trial, val_feeds, labels, reference_outputs)
            self._apply_reference(trial_record, reference_record)
            self.candidates[candidate.name] = trial
            best = trial_record
            if not any(g["gate"] in ("max_accuracy_drop", "min_agreement") for g in trial_record["failed_gates"]):
                trial_record["notes"].append(f"{count} most sensitive node(s) kept in float to meet the accuracy gate")
                return trial_record, ranking
        best["notes"].append(f"still misses the accuracy gate with {limit} node(s) in float (max_fallback_nodes)")
        return best, ranking

    def _int8_notes(self, variants: list[dict[str, Any]], reference: dict[str, Any]) -> None:
        """Say so when INT8 does not pay on this host (it sometimes is slower and larger than float)."""
        for record in variants:
            if record["precision"] != "int8":
                continue
            # Compare with the float variant of the same runtime where there is one.
            base = next((v for v in variants if v["precision"] == "fp32" and v["runtime"] == record["runtime"]
                         and "sparse" not in v["name"]), reference)
            slower = record["latency_ms"]["p50"] > base["latency_ms"]["p50"] * 1.05
            larger = record["size_bytes"] > base["size_bytes"]
            if slower or larger:
                parts = []
                if slower:
                    parts.append(f"{record['latency_ms']['p50'] / base['latency_ms']['p50']:.2f}x slower")
                if larger:
                    parts.append(f"{record['size_bytes'] / base['size_bytes']:.2f}x larger")
                message = (f"{record['name']} does not pay here: {' and '.join(parts)} than {base['name']} on this host "
                           f"(p50 measured with {record['verified_in']} on the CPU)")
                record["notes"].append(message)
                self.notes.append(message)

    def _lineage(self, source_sha: str) -> dict[str, Any]:
        config_doc = self.config.model_dump(mode="json")
        return {
            "source_model_sha256": source_sha,
            "calibration_sha256": self.data.calibration.sha256 if self.data.calibration else None,
            "validation_sha256": self.data.validation.sha256 if self.data.validation else None,
            "config_sha256": cache_key("config", config_doc),
            "profile_sha256": cache_key("profile", self.profile.model_dump(mode="json")),
            "tools": self.tools,
        }

    def _publish(self, files: list[Path]) -> list[Path]:
        out_dir = self.request.out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        published = []
        for path in files:
            target = out_dir / path.name
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=out_dir)
            os.close(fd)
            try:
                shutil.copyfile(path, tmp)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            published.append(target)
        return published


def _decision(record: dict[str, Any], selected: str | None) -> str:
    """One line per variant for the report: why it was kept or dropped."""
    if record["name"] == selected:
        return "selected"
    if record.get("dropped_reason"):
        return f"dropped: {record['dropped_reason']}"
    if record["failed_gates"]:
        return "dropped: " + "; ".join(g["message"] for g in record["failed_gates"])
    return "kept as a candidate: passes every gate, not the fastest/smallest on the target"


def _model_sha(path: Path) -> str:
    """Hash of a model and its sidecars (an OpenVINO .xml with its .bin)."""
    if path.suffix == ".xml" and path.with_suffix(".bin").is_file():
        return cache_key("ir", sha256_file(path), sha256_file(path.with_suffix(".bin")))
    return sha256_file(path)


def run_build(request: BuildRequest, progress: ProgressSink | None = None) -> BuildResult:
    """Build, verify and package; raises EdgepackError subclasses for bad input."""
    try:
        return Builder(request, progress).run()
    except EdgepackError:
        raise
    except MemoryError:
        raise PassError("the build ran out of memory") from None
