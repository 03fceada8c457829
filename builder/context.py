"""The build context: what the pipeline's stages and every target may use.

A target gets a `BuildContext` (never the pipeline itself): the validated request, config, profile,
data and gates, the ONNX pass plan, the cached pass runner (`run_pass`), outputs of a candidate in its
own runtime (`outputs`), cached measurements (`cached_result`), notes for the report (`note`), files
to publish beside the report (`publish_artifact`) and the progress display.
"""

from __future__ import annotations

import dataclasses
import time
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, TypeVar

import numpy as np

from builder.cache import BuildCache, cache_key
from builder.passes.base import Pass, PassContext, PassOutput
from builder.runtimes import get_adapter
from builder.verify import Outputs
from edgepack.errors import EdgepackError, PassError, one_line_reason
from edgepack.files import file_sha256
from edgepack.report import FailedVariant, GateThresholds, PassRecord

if TYPE_CHECKING:
    from builder.data import BuildData
    from builder.family import Family
    from builder.targets import Candidate, Target
    from edgepack.config import BuildConfig
    from hardware_profiles.schema import HardwareProfile, RuntimeSpec


_T = TypeVar("_T")


class ProgressSink(Protocol):
    def start(self, task: str) -> None: ...
    def finish(self, task: str, detail: str = "", cached: bool = False) -> None: ...
    def note(self, message: str) -> None: ...


class SilentProgress:
    def start(self, task: str) -> None:
        pass

    def finish(self, task: str, detail: str = "", cached: bool = False) -> None:
        pass

    def note(self, message: str) -> None:
        pass


@dataclasses.dataclass
class BuildPlan:
    """Every ONNX pass the build will run, validated before the first one starts."""

    check: Pass
    opset: Pass
    simplify: Pass
    fp16: Pass | None
    int8: Pass | None
    int8_dynamic_config: dict[str, Any] | None
    prune: Pass | None
    int8_config: dict[str, Any]
    calibration_auto: bool = False  # calibration.method auto: other methods are measured where minmax misses


@dataclasses.dataclass(frozen=True)
class ReferenceModel:
    """The fp32 reference every variant is built from and verified against."""

    source_model: Path
    source_sha256: str
    source_opset: int | None  # before the opset upgrade
    model_path: Path  # after check → static shapes → opset upgrade → simplify
    outputs: Outputs  # on the context's validation feeds
    graph_counts: list[dict[str, Any]]  # per node: op type, MACs, weights, activations (builder.estimate)
    matmul_share: float  # MatMul/Gemm share of the MACs: decides whether dynamic INT8 is worth trying
    host_is_target: bool  # whether host latency stands for the target's
    host_reason: str
    family: Family | None = None  # what kind of network (builder.family): the INT8 recipe starts from it


@dataclasses.dataclass
class BuildContext:
    request: Any  # builder.pipeline.BuildRequest
    config: BuildConfig
    profile: HardwareProfile
    data: BuildData
    gates: GateThresholds
    plan: BuildPlan
    cache: BuildCache
    tools: dict[str, str]  # tool versions: every cache key, the lineage and the SBOM carry them
    input_shapes: dict[str, tuple[int, ...]]  # every model input's static shape (config, model or data)
    progress: ProgressSink = dataclasses.field(default_factory=SilentProgress)
    # The profile's runtimes in order, each with the target that builds it (None: edgepack builds none).
    targets: list[tuple[RuntimeSpec, Target | None]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    failed: list[FailedVariant] = dataclasses.field(default_factory=list)  # variants that raised (attempt)
    pass_log: list[PassRecord] = dataclasses.field(default_factory=list)
    # Files a target wants next to the report even when it built no candidate (a converter's log).
    artifacts: dict[str, Path] = dataclasses.field(default_factory=dict)
    # Candidates earlier targets built (a later target may leave out what an earlier one covers).
    built: list[Candidate] = dataclasses.field(default_factory=list)
    work_dir: Path | None = None
    # The time budget of the whole build (--time-budget): optional, slow steps (the accuracy fallback's
    # builds, OpenVINO's accuracy control) are not started once it is spent; `cut_short` says which.
    time_budget_s: float | None = None
    started: float = dataclasses.field(default_factory=time.monotonic)
    cut_short: list[str] = dataclasses.field(default_factory=list)

    @property
    def stem(self) -> str:
        """`<name>-<version>-<profile>`: the file name every output of this build starts with."""
        return f"{self.config.name}-{self.config.version}-{self.profile.name}"

    def note(self, message: str) -> None:
        """A sentence for the report's notes."""
        self.notes.append(message)

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def budget_spent(self, step: str) -> bool:
        """Whether the build's time budget is spent, so the optional `step` must not start; a step cut
        short is recorded (the report's cut_short) and shown."""
        if self.time_budget_s is None or self.elapsed_s() < self.time_budget_s:
            return False
        message = f"{step}: not run, the build's time budget of {self.time_budget_s:g} s was spent ({self.elapsed_s():.0f} s)"
        self.cut_short.append(message)
        self.progress.note(message)
        return True

    def attempt(self, name: str, runtime: str, precision: str, make: Callable[[], _T], stage: str = "build") -> _T | None:
        """`make()`, or None when it raises: one variant failing (a quantizer crash, a converter error, a runtime
        that cannot load it) is a result, not the end of the build. It is recorded in the report's
        `failed_variants`, said on the progress display, and the build selects among the other variants.
        Running out of memory or an interrupt still ends the build."""
        try:
            return make()
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except Exception as exc:
            failed = FailedVariant(name=name, runtime=runtime, precision=precision, stage=stage,
                                   reason=one_line_reason(exc))
            self.failed.append(failed)
            self.progress.note(f"{failed.line()}; going on without it")
            return None

    def publish_artifact(self, name: str, path: Path) -> None:
        """Publish `path` beside the report as `<stem>.<name>`."""
        self.artifacts[name] = path

    @cached_property
    def validation_feeds(self) -> list[dict[str, np.ndarray]]:
        """The validation samples every variant is verified on (at most verify.max_samples)."""
        return list(self.data.feeds("validation", limit=self.config.verify.max_samples))

    @cached_property
    def validation_labels(self) -> np.ndarray | None:
        labels = self.data.validation.labels
        return labels[: len(self.validation_feeds)] if labels is not None else None

    # ---------------------------------------------------------------- passes through the cache
    def run_pass(self, pass_: Pass, input_model: Path, label: str | None = None, quiet: bool = False) -> PassOutput:
        """Run a pass on a model, or take its output from the build cache; logged in the report unless quiet."""
        label = label or pass_.name
        if not quiet:
            self.progress.start(label)
        started = time.perf_counter()
        key = self._pass_key(pass_, input_model)
        hit = self.cache.get_model(key)
        if hit is not None:
            model_path, info = hit
            output = PassOutput(model_path=model_path, info=info,
                                sidecars=[model_path.with_suffix(".bin")] if model_path.suffix == ".xml" else [])
        else:
            output = self._store(key, self._run_uncached(pass_, input_model, label))
        seconds = time.perf_counter() - started
        if not quiet:
            self.pass_log.append(PassRecord(name=label, pass_name=pass_.name, seconds=round(seconds, 3), cached=hit is not None))
            self.progress.finish(label, f"{seconds:.2f} s", hit is not None)
        return output

    def _pass_key(self, pass_: Pass, input_model: Path) -> str:
        calibration, validation = self.data.calibration, self.data.validation
        return cache_key(
            "pass", pass_.name, pass_.code_sha256(), pass_.config_json(), model_sha256(input_model), self.tools,
            self.profile.model_dump(mode="json") if pass_.uses_profile else None,
            calibration.sha256 if (pass_.uses_calibration_data and calibration) else None,
            validation.sha256 if (pass_.uses_validation_data and validation) else None,
            self.config.metric if pass_.uses_validation_data else None,
        )

    def _run_uncached(self, pass_: Pass, input_model: Path, label: str) -> PassOutput:
        assert self.work_dir is not None, "passes run only once the build has a work folder"
        ctx = PassContext(work_dir=self.work_dir / label.replace("/", "_").replace(" ", "_"), profile=self.profile, build=self.config,
                          data=self.data, cache_dir=self.cache.root if self.cache.enabled else None)
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        try:
            return pass_.run(input_model, ctx)
        except EdgepackError:
            raise
        except Exception as exc:  # a converter's own failure: name the pass, keep it to one line
            detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise PassError(f"pass {pass_.name} failed on {input_model.name}: {detail}", pass_name=pass_.name) from exc

    def _store(self, key: str, output: PassOutput) -> PassOutput:
        stored = self.cache.put_model(key, output.model_path, output.info, output.sidecars)
        sidecars = [stored.parent / s.name for s in output.sidecars] if stored != output.model_path else output.sidecars
        return PassOutput(model_path=stored, info=output.info, sidecars=sidecars)

    # ---------------------------------------------------------------- measurements through the cache
    def cached_result(self, kind: str, parts: tuple, compute: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
        """`compute()`, or its earlier result for the same parts and tool versions; and whether it was cached."""
        key = cache_key(kind, *parts, self.tools)
        hit = self.cache.get_result(key)
        if hit is not None:
            return hit, True
        result = compute()
        self.cache.put_result(key, result)
        return result, False

    def outputs(self, candidate: Candidate, feeds: list[dict[str, np.ndarray]]) -> Outputs:
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


def model_sha256(path: Path) -> str:
    """Hash of a model and its sidecars (an OpenVINO .xml with its .bin)."""
    if path.suffix == ".xml" and path.with_suffix(".bin").is_file():
        return cache_key("ir", file_sha256(path), file_sha256(path.with_suffix(".bin")))
    return file_sha256(path)
