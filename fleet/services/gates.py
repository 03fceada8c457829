"""Rollout gates: what must hold on the devices of a wave before the rollout goes further.

A gate is a small frozen value, `GateSpec`, parsed from the text an operator types:

    install_failure_ratio<=0.1        absolute threshold
    p95_latency_ms<=1.10x control     relative to the control cohort (devices still on the old bundle)
    min_inferences>=500               not a pass/fail gate: until it holds, the wave holds

Each metric is computed by a registered `MetricSource` (subclasses register themselves by `name`), per
hardware profile, so a fleet-wide average cannot hide one failing profile. Install metrics read the
rollout members' phases; telemetry metrics (`p50/p95/p99_latency_ms`, `error_rate`, `drift`) read the
`TelemetryWindow` rows of two cohorts of the same profile:

    treatment   members of the waves so far, windows on the rollout's bundle received since this wave started
    control     members of the later waves (the same hash ranking picked them, so they are a random sample
                of the same profile's targets), windows on their old bundle received since this wave started
    baseline    at the last wave nobody is left waiting, so relative gates compare against the profile's
                members' most recent windows on their old bundle (at most BASELINE_MAX_WINDOWS, none older
                than BASELINE_LOOKBACK_S before the rollout was created): mostly the last wave's devices
                during the wave before, i.e. the last concurrent control

The control is therefore not a separate reserved set: with the default waves (1, 10, 50, 100) every wave
but the last has at least half of each profile running the old bundle beside it, a regression is caught
there, and no device is held back from a release that passed. When a profile's control has members but
their telemetry is missing, a relative gate holds (it never silently switches to another cohort).

Before a telemetry gate passes or fails, each cohort it reads must have served at least `min_inferences`
inferences (the `min_inferences>=N` gate; DEFAULT_MIN_INFERENCES when a rollout has telemetry gates but
names none); until then it holds, and its evidence says how many of how many.

Latency percentiles are computed from the cohort's merged latency histograms (`latency_ms.bounds_ms` /
`counts` in the stored payloads), never by averaging device percentiles. When histograms are missing,
use different buckets, or the percentile lies above the last bucket bound, the metric falls back to the
maximum over the cohort's devices of each device's (inference-weighted) window percentile — an upper
bound of the pooled percentile — and the evidence says which method was used and why.

A gate outcome per profile is `pass`, `fail` or `hold`. While some members have not finished installing,
a ratio is known only within bounds (the pending members may still go either way); a gate passes or
fails only when both bounds agree, else it holds. `evaluate_gates` folds the outcomes into one
`WaveVerdict`: any failure → rollback (immediately, no need to wait for the bake time), else any hold or
an unfinished bake / too few reports → hold, else promote.

Evidence. Besides the per-gate summary (`gates`), the verdict lists one `checks` row per gate and profile:

    {"gate": "p95_latency_ms<=1.1x control", "metric": "p95_latency_ms", "profile": "rpi5",
     "cohort": "treatment", "devices": 1, "inferences": 600, "value": 15.2,
     "control_cohort": "control", "control_devices": 9, "control_inferences": 5400, "control": 10.1,
     "op": "<=", "threshold": "1.10x control", "limit": 11.11, "method": "merged latency histogram",
     "required_inferences": 300, "outcome": "fail", "passed": false}

`threshold` is what the operator wrote (a number, or "F x control"); `limit` the number `value` was
compared with. A holding check has `reason` and the counts so far.
"""

from __future__ import annotations

import datetime as dt
import math
import operator
import re
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, ClassVar, Iterable, Literal, Mapping, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgepack.errors import ConfigError
from edgepack.histogram import from_wire, merge_counts
from edgepack.histogram import quantile as histogram_quantile
from fleet.models import Bundle, Device, Rollout, RolloutMember, TelemetryWindow

Decision = Literal["promote", "hold", "rollback"]
Outcome = Literal["pass", "fail", "hold"]

# Member phases. `waiting`: its wave has not started; `assigned`: desired state stored, not yet
# acknowledged by the broker; `pending`: published, the device has not answered; then the device's own
# install phases; `timed_out`: no terminal answer within the rollout's install timeout; `skipped`: the
# rollout ended before the member's wave.
WAITING, ASSIGNED, PENDING, TIMED_OUT, SKIPPED = "waiting", "assigned", "pending", "timed_out", "skipped"
IN_PROGRESS_PHASES = frozenset({ASSIGNED, PENDING, "idle", "downloading", "verifying", "installing", "selftest"})
FAILED_PHASES = frozenset({"failed", "rolled_back"})  # rolled_back: the agent switched back by itself
TERMINAL_PHASES = frozenset({"active", TIMED_OUT}) | FAILED_PHASES

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt,
}
_SPEC = re.compile(
    r"^\s*(?P<metric>[a-z][a-z0-9_]*)\s*(?P<op><=|>=|<|>)\s*"
    r"(?P<value>[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*"
    r"(?:(?P<rel>[xX×])\s*(?P<cohort>[a-z_]+))?\s*$"
)


def utc(value: dt.datetime | float | None) -> dt.datetime | None:
    """An aware UTC datetime (SQLite hands back naive ones; they are UTC)."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return dt.datetime.fromtimestamp(value, dt.timezone.utc)
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


# ---------------------------------------------------------------- profiles and the rollout's bundles


@lru_cache(maxsize=1)
def _profile_names() -> dict[str, str]:
    from hardware_profiles import list_profiles  # YAML + pydantic: load when first needed

    return {alias: profile.name for profile in list_profiles() for alias in profile.all_names}


def canonical_profile(name: str) -> str:
    """A bundled profile's canonical name for a name or alias (`jetson` → `jetson-orin-nano`); other names as given."""
    return _profile_names().get(name, name)


def rollout_bundles(session: Session, rollout: Rollout) -> dict[str, Bundle]:
    """The bundle each hardware profile gets in this rollout, keyed by canonical profile name.

    A rollout ships one release: the named bundle for its own profile, plus the bundles of the same name
    and version built for other profiles (a multi-profile build makes one per profile). Only bundles
    uploaded before the rollout was created count, so a later upload cannot change what a wave sends.
    """
    primary = session.get(Bundle, rollout.bundle_id)
    if primary is None:
        raise ConfigError(f"rollout {rollout.id} refers to bundle {rollout.bundle_id}, which is not stored",
                          rollout_id=rollout.id, bundle_id=rollout.bundle_id)
    siblings = session.scalars(
        select(Bundle)
        .where(Bundle.name == primary.name, Bundle.version == primary.version, Bundle.uploaded_at <= rollout.created_at)
        .order_by(Bundle.uploaded_at, Bundle.id)
    ).all()
    bundles = {canonical_profile(bundle.profile): bundle for bundle in siblings}  # the latest upload wins
    bundles[canonical_profile(primary.profile)] = primary
    return bundles


# ---------------------------------------------------------------- gate specs


@dataclass(frozen=True)
class GateSpec:
    """One gate: `metric op threshold`, or `metric op threshold x control` when relative."""

    metric: str
    op: str
    threshold: float
    relative_to: Literal["control"] | None = None

    def __post_init__(self) -> None:
        text = self.text
        source = METRIC_SOURCES.get(self.metric)
        if source is None:
            known = ", ".join(sorted(METRIC_SOURCES))
            raise ConfigError(f"gate {text!r}: unknown metric {self.metric!r} (known: {known})", gate=text)
        if self.op not in _OPS:
            raise ConfigError(f"gate {text!r}: operator must be one of {', '.join(_OPS)}", gate=text)
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not math.isfinite(self.threshold):
            raise ConfigError(f"gate {text!r}: threshold must be a finite number", gate=text)
        object.__setattr__(self, "threshold", float(self.threshold))
        if self.relative_to not in (None, "control"):
            raise ConfigError(f"gate {text!r}: a threshold can only be relative to 'control'", gate=text)
        if self.relative_to and not source.relative_ok:
            raise ConfigError(f"gate {text!r}: {self.metric} cannot be relative to a control cohort", gate=text)
        if self.relative_to and self.threshold <= 0:
            raise ConfigError(f"gate {text!r}: a relative threshold must be a positive factor", gate=text)
        if self.op not in source.ops:
            raise ConfigError(f"gate {text!r}: {self.metric} takes {' or '.join(source.ops)}", gate=text)
        if not self.relative_to and not (source.lower <= self.threshold <= source.upper):
            raise ConfigError(f"gate {text!r}: {self.metric} lies in [{source.lower:g}, {source.upper:g}]", gate=text)

    @property
    def text(self) -> str:
        threshold = f"{self.threshold:g}" if isinstance(self.threshold, (int, float)) else repr(self.threshold)
        return f"{self.metric}{self.op}{threshold}" + (f"x {self.relative_to}" if self.relative_to else "")

    def __str__(self) -> str:
        return self.text

    @property
    def source(self) -> "MetricSource":
        return METRIC_SOURCES[self.metric]

    @classmethod
    def parse(cls, text: str) -> "GateSpec":
        """Parse `metric<=0.1` or `metric<=1.10x control`; a ConfigError names the spec otherwise."""
        if not isinstance(text, str):
            raise ConfigError(f"gate {text!r}: expected text like 'install_failure_ratio<=0.1'", gate=repr(text))
        match = _SPEC.match(text)
        if not match:
            raise ConfigError(
                f"gate {text!r}: expected METRIC OP NUMBER or METRIC OP FACTORx control "
                "(e.g. 'install_failure_ratio<=0.1', 'p95_latency_ms<=1.10x control')", gate=text)
        relative = None
        if match["rel"]:
            if match["cohort"] != "control":
                raise ConfigError(f"gate {text!r}: a threshold can only be relative to 'control'", gate=text)
            relative = "control"
        return cls(match["metric"], match["op"], float(match["value"]), relative)

    @classmethod
    def from_value(cls, value: "str | Mapping[str, Any] | GateSpec") -> "GateSpec":
        """A spec from its text, its stored dict form, or itself."""
        if isinstance(value, GateSpec):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {"metric", "op", "threshold", "relative_to"}
            if unknown or not {"metric", "op", "threshold"} <= set(value):
                raise ConfigError(f"gate {dict(value)!r}: expected keys metric, op, threshold[, relative_to]", gate=repr(value))
            return cls(value["metric"], value["op"], value["threshold"], value.get("relative_to"))
        return cls.parse(value)

    def to_dict(self) -> dict[str, Any]:
        """The form stored in `Rollout.gates`."""
        return {"metric": self.metric, "op": self.op, "threshold": self.threshold, "relative_to": self.relative_to}

    def effective_threshold(self, control: float | None) -> float | None:
        if self.relative_to is None:
            return self.threshold
        return None if control is None else self.threshold * control

    def satisfied(self, value: float, control: float | None = None) -> bool:
        limit = self.effective_threshold(control)
        return limit is not None and _OPS[self.op](value, limit)


def parse_gates(specs: Iterable["str | Mapping[str, Any] | GateSpec"]) -> list[GateSpec]:
    """Parse a list of gate specs; duplicates are refused (the second would only shadow the first)."""
    parsed: list[GateSpec] = []
    for value in specs:
        spec = GateSpec.from_value(value)
        if spec in parsed:
            raise ConfigError(f"gate {spec.text!r} is given twice", gate=spec.text)
        parsed.append(spec)
    return parsed


# Used when a rollout names no gates: no install may fail, none may time out, every device must end active.
DEFAULT_GATES: tuple[str, ...] = ("install_failure_ratio<=0", "install_timeout_ratio<=0", "active_ratio>=1.0")
# Inferences each cohort must serve before a telemetry gate decides, when a rollout has telemetry gates but
# no `min_inferences` gate: a percentile of a few dozen requests is noise.
DEFAULT_MIN_INFERENCES = 100
# The baseline cohort (relative gates at the last wave): the newest windows on the old bundle, at most this
# many, none received longer than this before the rollout was created.
BASELINE_MAX_WINDOWS = 5000
BASELINE_LOOKBACK_S = 3600.0


# ---------------------------------------------------------------- measurements and metric sources


@dataclass(frozen=True)
class Measurement:
    """One metric on one profile's cohort.

    `low`/`high` bound the value the metric can still reach while members are pending (equal to `value`
    once everything is in). `hold_reason` says the data is not there yet: the gate holds whatever the value.
    """

    value: float | None
    low: float | None = None
    high: float | None = None
    n: int = 0
    control: float | None = None
    hold_reason: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def holding(cls, reason: str, **detail: Any) -> "Measurement":
        return cls(value=None, hold_reason=reason, detail=detail)


@dataclass
class ProfileCohort:
    """The devices of one hardware profile in a rollout at one wave: treatment and control (see the module
    docstring for which telemetry windows each cohort reads)."""

    session: Session
    rollout: Rollout
    wave_index: int
    profile: str
    bundle_id: str | None
    treatment: list[tuple[RolloutMember, Device]]
    control: list[tuple[RolloutMember, Device]]
    window_start: dt.datetime
    min_inferences: int = 1
    settle_s: float = 0.0
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def treatment_windows(self) -> list[TelemetryWindow]:
        """Telemetry of the treatment members running this rollout's bundle since the wave started."""
        if "treatment" not in self._cache:
            ids = [device.id for _, device in self.treatment]
            since = self.window_start + dt.timedelta(seconds=self.settle_s)
            self._cache["treatment"] = self._windows(ids, new_bundle=True, since=since)
        return self._cache["treatment"]

    def control_windows(self) -> tuple[str, list[TelemetryWindow]]:
        """(cohort name, windows): `control` — the later waves' members on their old bundle during this
        wave — while the profile has such members, else `baseline` (the last wave: the profile's members'
        most recent windows on their old bundle)."""
        if "control" not in self._cache:
            if self.control:
                ids = [device.id for _, device in self.control]
                self._cache["control"] = ("control", self._windows(ids, new_bundle=False, since=self.window_start))
            else:
                everyone = [device.id for _, device in self.treatment]
                since = utc(self.rollout.created_at) - dt.timedelta(seconds=BASELINE_LOOKBACK_S)
                rows = self._windows(everyone, new_bundle=False, since=since, until=self.window_start,
                                     newest=BASELINE_MAX_WINDOWS)
                self._cache["control"] = ("baseline", rows)
        return self._cache["control"]

    def _windows(self, device_ids: Sequence[str], new_bundle: bool, since: dt.datetime | None,
                 until: dt.datetime | None = None, newest: int | None = None) -> list[TelemetryWindow]:
        if not device_ids:
            return []
        query = select(TelemetryWindow).where(TelemetryWindow.device_id.in_(device_ids))
        if since is not None:
            query = query.where(TelemetryWindow.received_at >= since)
        if until is not None:
            query = query.where(TelemetryWindow.received_at < until)
        if new_bundle:
            query = query.where(TelemetryWindow.bundle_id == self.bundle_id)
        else:
            query = query.where((TelemetryWindow.bundle_id != self.bundle_id) | TelemetryWindow.bundle_id.is_(None))
        if newest is not None:
            rows = list(self.session.scalars(query.order_by(TelemetryWindow.id.desc()).limit(newest)))
            return rows[::-1]
        return list(self.session.scalars(query.order_by(TelemetryWindow.id)))


METRIC_SOURCES: dict[str, "MetricSource"] = {}


class MetricSource(ABC):
    """Computes one gate metric for one profile's cohort. Concrete subclasses register by `name`."""

    name: ClassVar[str]
    kind: ClassVar[Literal["install", "telemetry"]]
    description: ClassVar[str]
    relative_ok: ClassVar[bool] = False
    lower: ClassVar[float] = 0.0
    upper: ClassVar[float] = math.inf
    # What a failed gate on this metric means for the wave: most metrics roll back; a data sufficiency
    # metric (min_inferences) only holds.
    on_fail: ClassVar[Decision] = "rollback"
    ops: ClassVar[tuple[str, ...]] = tuple(_OPS)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not getattr(cls, "__abstractmethods__", None) and "name" in cls.__dict__:
            if cls.name in METRIC_SOURCES:
                raise TypeError(f"metric {cls.name!r} is registered twice")
            METRIC_SOURCES[cls.name] = cls()

    @abstractmethod
    def measure(self, cohort: ProfileCohort, spec: GateSpec) -> Measurement:
        """The metric's value on `cohort` (with bounds or a hold reason while data is missing)."""


class _InstallRatio(MetricSource):
    """Share of the cohort's members in some phases; pending members widen the bounds."""

    kind = "install"
    upper = 1.0

    @abstractmethod
    def counts(self, member: RolloutMember, device: Device, bundle_id: str | None) -> bool:
        """Whether this member counts towards the ratio."""

    def measure(self, cohort: ProfileCohort, spec: GateSpec) -> Measurement:
        members = cohort.treatment
        if not members:
            return Measurement.holding("no members yet")
        counted = sum(1 for member, device in members if self.counts(member, device, cohort.bundle_id))
        pending = sum(1 for member, _ in members if member.phase in IN_PROGRESS_PHASES)
        total = len(members)
        phases: dict[str, int] = defaultdict(int)
        for member, _ in members:
            phases[member.phase] += 1
        return Measurement(value=counted / total, low=counted / total, high=min(total, counted + pending) / total,
                           n=total, detail={"members": total, "counted": counted, "pending": pending,
                                            "phases": dict(sorted(phases.items()))})


class InstallFailureRatio(_InstallRatio):
    name = "install_failure_ratio"
    description = "Share of the profile's members whose install failed (or that switched back by themselves)."

    def counts(self, member, device, bundle_id):
        return member.phase in FAILED_PHASES


class InstallTimeoutRatio(_InstallRatio):
    name = "install_timeout_ratio"
    description = "Share of the profile's members that did not finish installing within the install timeout."

    def counts(self, member, device, bundle_id):
        return member.phase == TIMED_OUT


class ActiveRatio(_InstallRatio):
    name = "active_ratio"
    description = "Share of the profile's members reporting the rollout's bundle active."

    def counts(self, member, device, bundle_id):
        return member.phase == "active" and device.current_bundle_id == bundle_id


class _TelemetryMetric(MetricSource):
    """A metric over telemetry windows, absolute or relative to the control cohort. Each cohort it reads
    must have served `min_inferences` first (see the module docstring)."""

    kind = "telemetry"
    relative_ok = True

    @abstractmethod
    def aggregate(self, windows: Sequence[TelemetryWindow]) -> tuple[float | None, dict[str, Any]]:
        """(value, how it was computed) over some windows; None when they carry no data for it."""

    def measure(self, cohort: ProfileCohort, spec: GateSpec) -> Measurement:
        windows = cohort.treatment_windows()
        required = cohort.min_inferences
        detail: dict[str, Any] = {
            "devices": len(cohort.treatment), "reporting_devices": _reporting(windows), "windows": len(windows),
            "inferences": _served(windows), "required_inferences": required,
        }
        if not windows:
            return Measurement.holding("no telemetry yet", **detail)
        if detail["inferences"] < required:
            return Measurement.holding("not enough inferences", **detail)
        value, how = self.aggregate(windows)
        detail.update(how)
        if value is None:
            return Measurement.holding(f"no {self.name} in telemetry yet", **detail)
        if spec.relative_to is None:
            return Measurement(value=value, n=detail["inferences"], detail=detail)

        cohort_name, control_windows = cohort.control_windows()
        detail.update({
            "control_cohort": cohort_name,
            # the baseline is the treatment's own devices (and the later waves'), before they switched
            "control_devices": len(cohort.control) if cohort_name == "control" else len(cohort.treatment),
            "control_reporting_devices": _reporting(control_windows), "control_windows": len(control_windows),
            "control_inferences": _served(control_windows),
        })
        if not control_windows:
            return Measurement(value=value, hold_reason=f"no {cohort_name} telemetry yet", detail=detail)
        if detail["control_inferences"] < required:
            return Measurement(value=value, hold_reason=f"not enough {cohort_name} inferences", detail=detail)
        control, control_how = self.aggregate(control_windows)
        detail.update({f"control_{key}": item for key, item in control_how.items()})
        if control is None:
            return Measurement(value=value, hold_reason=f"no {self.name} in {cohort_name} telemetry yet", detail=detail)
        return Measurement(value=value, n=detail["inferences"], control=control, detail=detail)


def _served(windows: Sequence[TelemetryWindow]) -> int:
    return sum(window.inferences for window in windows)


def _reporting(windows: Sequence[TelemetryWindow]) -> int:
    return len({window.device_id for window in windows})


def _histogram(window: TelemetryWindow) -> tuple[tuple[float, ...], list[int]] | None:
    """(bucket upper bounds, counts with the overflow bucket last) of a window's latency histogram, or None."""
    latency = (window.payload or {}).get("latency_ms") or {}
    return from_wire(latency.get("bounds_ms"), latency.get("counts"))


def latency_quantile(windows: Sequence[TelemetryWindow], q: float, column: str) -> tuple[float | None, dict[str, Any]]:
    """The q-quantile of latency over `windows`, and how it was computed.

    From the merged histograms when every window that served inferences has one with the same buckets;
    otherwise the maximum over devices of each device's inference-weighted window percentile (`column`,
    e.g. `p95_ms`), which bounds the pooled percentile from above; the detail names the method and why.
    """
    served = [window for window in windows if window.inferences > 0]
    if not served:
        return None, {}
    label = column.removesuffix("_ms")
    histograms = [_histogram(window) for window in served]
    missing = sum(1 for histogram in histograms if histogram is None)
    if missing:
        why = f"no usable latency histogram in {missing} of {len(served)} windows"
    elif len({bounds for bounds, _ in histograms}) > 1:
        why = "windows use different histogram buckets"
    else:
        bounds = histograms[0][0]
        merged = merge_counts(counts for _, counts in histograms)
        value = histogram_quantile(bounds, merged, q)
        if value is None:
            why = "the latency histograms are empty"
        elif math.isinf(value):
            why = f"the {label} lies above the last histogram bound ({bounds[-1]:g} ms)"
        else:
            return value, {"method": "merged latency histogram", "histogram_samples": sum(merged)}

    totals: dict[str, float] = defaultdict(float)
    weights: dict[str, float] = defaultdict(float)
    for window in served:
        percentile = getattr(window, column)
        if percentile is not None:
            totals[window.device_id] += percentile * window.inferences
            weights[window.device_id] += window.inferences
    if not totals:
        return None, {"fallback_reason": why}
    per_device = {device_id: totals[device_id] / weights[device_id] for device_id in totals}
    worst = max(per_device, key=per_device.__getitem__)
    return per_device[worst], {"method": f"max of device {label}", "fallback_reason": why, "worst_device": worst}


class _LatencyQuantile(_TelemetryMetric):
    quantile: ClassVar[float]
    column: ClassVar[str]

    def aggregate(self, windows):
        return latency_quantile(windows, self.quantile, self.column)


class P50LatencyMs(_LatencyQuantile):
    name, quantile, column = "p50_latency_ms", 0.50, "p50_ms"
    description = "Median inference latency in ms of the cohort (merged histograms; see the module docstring)."


class P95LatencyMs(_LatencyQuantile):
    name, quantile, column = "p95_latency_ms", 0.95, "p95_ms"
    description = "95th percentile inference latency in ms of the cohort (merged histograms)."


class P99LatencyMs(_LatencyQuantile):
    name, quantile, column = "p99_latency_ms", 0.99, "p99_ms"
    description = "99th percentile inference latency in ms of the cohort (merged histograms)."


class ErrorRate(_TelemetryMetric):
    name = "error_rate"
    description = "Errors per inference (inferences count every request, failed ones included)."
    upper = 1.0

    def aggregate(self, windows):
        inferences = _served(windows)
        if inferences == 0:
            return None, {}
        errors = sum(w.errors for w in windows)
        return errors / inferences, {"errors": errors}


class Drift(_TelemetryMetric):
    name = "drift"
    description = "Worst drift score over the model's inputs and outputs (inference-weighted mean per name)."

    def aggregate(self, windows):
        totals: dict[str, float] = defaultdict(float)
        weights: dict[str, float] = defaultdict(float)
        for window in windows:
            for key, score in (window.drift or {}).items():
                if not isinstance(score, (int, float)) or not math.isfinite(score):
                    continue  # a device's broken score must not poison the cohort's mean
                weight = max(window.inferences, 1)
                totals[key] += float(score) * weight
                weights[key] += weight
        if not totals:
            return None, {}
        scores = {key: totals[key] / weights[key] for key in totals}
        worst = max(scores, key=scores.__getitem__)
        methods = sorted({(w.payload or {}).get("drift_method") for w in windows} - {None})
        return scores[worst], {"worst": worst, "scores": scores, "drift_method": ", ".join(methods) or None}


class MinInferences(MetricSource):
    name = "min_inferences"
    kind = "telemetry"
    description = ("Inferences each cohort (treatment; control too for relative gates) served this wave; until "
                   "then the wave and every telemetry gate hold.")
    on_fail = "hold"
    ops = (">=", ">")

    def measure(self, cohort, spec):
        windows = cohort.treatment_windows()
        return Measurement(value=float(_served(windows)), n=len(windows),
                           detail={"windows": len(windows), "devices": len(cohort.treatment),
                                   "reporting_devices": _reporting(windows)})


# ---------------------------------------------------------------- the verdict


@dataclass(frozen=True)
class WaveVerdict:
    """What to do with a wave, and why (the evidence is stored with the decision)."""

    decision: Decision
    evidence: dict[str, Any]

    def __post_init__(self) -> None:
        if self.decision not in ("promote", "hold", "rollback"):
            raise ValueError(f"unknown decision {self.decision!r}")

    @property
    def reason(self) -> str:
        return self.evidence.get("reason", "")


def _judge(spec: GateSpec, measurement: Measurement) -> tuple[Outcome, str | None]:
    if measurement.hold_reason:
        return "hold", measurement.hold_reason
    low = measurement.value if measurement.low is None else measurement.low
    high = measurement.value if measurement.high is None else measurement.high
    ok_low, ok_high = spec.satisfied(low, measurement.control), spec.satisfied(high, measurement.control)
    if ok_low and ok_high:
        return "pass", None
    if not ok_low and not ok_high:
        return "fail", None
    return "hold", "waiting for installs"


def _number(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)


def threshold_text(spec: GateSpec) -> float | str:
    """The threshold as the operator meant it: a number, or `1.10x control` for a relative gate."""
    if spec.relative_to is None:
        return spec.threshold
    factor = f"{spec.threshold:.2f}" if round(spec.threshold, 2) == spec.threshold else f"{spec.threshold:g}"
    return f"{factor}x {spec.relative_to}"


def required_inferences(specs: Sequence[GateSpec]) -> int:
    """Inferences each cohort must serve before telemetry gates decide: the strictest `min_inferences` gate,
    else DEFAULT_MIN_INFERENCES when there are telemetry gates, else 1."""
    limits = [math.floor(s.threshold) + 1 if s.op == ">" else math.ceil(s.threshold)
              for s in specs if s.metric == "min_inferences"]
    if limits:
        return max(1, *limits)
    return DEFAULT_MIN_INFERENCES if any(s.source.kind == "telemetry" for s in specs) else 1


def _check(spec: GateSpec, profile: str, measurement: Measurement, outcome: Outcome, why: str | None) -> dict[str, Any]:
    """One evidence row: this gate on this profile's cohort (see the module docstring)."""
    row: dict[str, Any] = {"gate": spec.text, "metric": spec.metric, "profile": profile,
                           "cohort": "treatment",
                           "value": _number(measurement.value)}
    if measurement.low != measurement.high:
        row["bounds"] = [_number(measurement.low), _number(measurement.high)]
    if spec.relative_to:
        row["control"] = _number(measurement.control)
    row.update({"op": spec.op, "threshold": threshold_text(spec),
                "limit": _number(spec.effective_threshold(measurement.control)), "n": measurement.n})
    row.update(measurement.detail)
    row.update({"outcome": outcome, "passed": outcome == "pass"})
    if why:
        row["reason"] = why
    return row


def _failure_text(row: dict[str, Any]) -> str:
    text = f"{row['gate']} failed on {row['profile']}: {row['cohort']} {row['value']:.4g} vs limit {row['limit']:.4g}"
    if row.get("control") is not None:
        factor = str(row["threshold"]).removesuffix("control").strip()
        text += f" = {factor} {row.get('control_cohort', 'control')} {row['control']:.4g}"
    return text


def cohort_members(session: Session, rollout: Rollout) -> list[tuple[RolloutMember, Device]]:
    return list(session.execute(
        select(RolloutMember, Device).join(Device, Device.id == RolloutMember.device_id)
        .where(RolloutMember.rollout_id == rollout.id, RolloutMember.cohort == "treatment")
        .order_by(RolloutMember.id)
    ).all())


def evaluate_gates(session: Session, rollout: Rollout, wave_index: int, now: float | dt.datetime,
                   settle_s: float = 0.0) -> WaveVerdict:
    """Decide promote, hold or rollback for a wave of `rollout` from the database as it is now.

    The cohort of wave i is cumulative: every member of waves 0..i; the control, the members of the waves
    after i. Gates are evaluated per hardware profile present in the cohort. A failing gate rolls back at
    once; promotion also needs the bake time since the wave started to have passed and at least
    `min_reports` members (at most the cohort's size) to have finished installing. Treatment telemetry of
    the first `settle_s` seconds of the wave is not judged: it mixes the wave's installs with cold models.
    """
    now_dt = utc(now)
    specs = parse_gates(rollout.gates or DEFAULT_GATES)
    bundles = rollout_bundles(session, rollout)
    members = cohort_members(session, rollout)
    treatment = [(m, d) for m, d in members if m.wave_index <= wave_index]
    control = [(m, d) for m, d in members if m.wave_index > wave_index]
    new_in_wave = sum(1 for m, _ in treatment if m.wave_index == wave_index)
    started = utc(rollout.wave_started_at) if rollout.current_wave == wave_index else None
    window_start = started or utc(rollout.created_at)
    min_inferences = required_inferences(specs)

    by_profile: dict[str, list[tuple[RolloutMember, Device]]] = defaultdict(list)
    control_by_profile: dict[str, list[tuple[RolloutMember, Device]]] = defaultdict(list)
    for member, device in treatment:
        by_profile[canonical_profile(device.profile)].append((member, device))
    for member, device in control:
        control_by_profile[canonical_profile(device.profile)].append((member, device))
    cohorts = {
        profile: ProfileCohort(session, rollout, wave_index, profile, getattr(bundles.get(profile), "id", None),
                               by_profile[profile], control_by_profile[profile], window_start, min_inferences,
                               settle_s=settle_s)
        for profile in sorted(by_profile)
    }

    holds: set[str] = set()
    failures: list[str] = []
    gate_evidence = []
    checks: list[dict[str, Any]] = []
    for spec in specs:
        profiles: dict[str, Any] = {}
        outcomes: list[Outcome] = []
        for profile, cohort in cohorts.items():
            measurement = spec.source.measure(cohort, spec)
            outcome, why = _judge(spec, measurement)
            if outcome == "fail" and spec.source.on_fail == "hold":
                outcome, why = "hold", f"{spec.metric} not reached"
            row = _check(spec, profile, measurement, outcome, why)
            if why:
                holds.add(why)
            if outcome == "fail":
                failures.append(_failure_text(row))
            profiles[profile] = row
            checks.append(row)
            outcomes.append(outcome)
        outcome = "fail" if "fail" in outcomes else "hold" if "hold" in outcomes else "pass"
        gate_evidence.append({
            "gate": spec.text, "metric": spec.metric, "op": spec.op, "threshold": spec.threshold,
            "relative_to": spec.relative_to,
            "cohort": "treatment vs control" if spec.relative_to else "treatment",
            "values": {profile: row["value"] for profile, row in profiles.items()},
            "profiles": profiles, "outcome": outcome, "passed": outcome == "pass",
        })

    elapsed = None if started is None else (now_dt - started).total_seconds()
    bake_done = new_in_wave == 0 or (elapsed is not None and elapsed >= rollout.bake_s)
    if not bake_done:
        holds.add("baking")
    reports = sum(1 for m, _ in treatment if m.phase in TERMINAL_PHASES - {TIMED_OUT})
    required_reports = min(rollout.min_reports, len(treatment))
    if reports < required_reports:
        holds.add("waiting for reports")

    if failures:
        decision: Decision = "rollback"
        reason = "; ".join(failures)
    elif holds:
        decision = "hold"
        reason = "; ".join(sorted(holds))
    else:
        decision = "promote"
        reason = "every gate passed on every profile"
    percent = rollout.waves[wave_index] if 0 <= wave_index < len(rollout.waves) else None
    evidence = {
        "wave": wave_index, "percent": percent, "decision": decision, "reason": reason,
        "at": now_dt.isoformat(),
        "cohort": {"treatment": len(treatment), "new_in_wave": new_in_wave, "control": len(control),
                   "profiles": {p: len(c.treatment) for p, c in cohorts.items()},
                   "control_profiles": {p: len(c.control) for p, c in cohorts.items()}},
        "bake": {"required_s": rollout.bake_s, "elapsed_s": _number(elapsed), "done": bake_done},
        "reports": {"count": reports, "required": required_reports},
        "min_inferences": min_inferences,
        "gates": gate_evidence,
        "checks": checks,
    }
    return WaveVerdict(decision, evidence)


def describe_metrics() -> list[dict[str, Any]]:
    """Every gate metric with its kind and meaning (for docs, the CLI and the API)."""
    return [{"metric": s.name, "kind": s.kind, "relative_to_control": s.relative_ok, "on_fail": s.on_fail,
             "description": s.description} for s in sorted(METRIC_SOURCES.values(), key=lambda s: s.name)]


__all__ = [
    "BASELINE_LOOKBACK_S", "BASELINE_MAX_WINDOWS", "DEFAULT_GATES", "DEFAULT_MIN_INFERENCES", "METRIC_SOURCES",
    "GateSpec", "Measurement", "MetricSource", "ProfileCohort", "WaveVerdict", "canonical_profile", "describe_metrics",
    "evaluate_gates", "latency_quantile", "parse_gates", "required_inferences", "rollout_bundles", "threshold_text",
]
