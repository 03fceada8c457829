"""Rollout gates: what must hold on the devices of a wave before the rollout goes further.

A gate is a small frozen value, `GateSpec`, parsed from the text an operator types:

    install_failure_ratio<=0.1        absolute threshold
    p95_latency_ms<=1.10x control     relative to the control cohort (devices still on the old bundle)
    min_inferences>=500               not a pass/fail gate: until it holds, the wave holds

Each metric is computed by a registered `MetricSource` (subclasses register themselves by `name`), per
hardware profile, so a fleet-wide average cannot hide one failing profile. Install metrics read the
rollout members' phases; telemetry metrics read `TelemetryWindow` rows of the treatment cohort (members
of the waves so far, running the rollout's bundle, since the wave started) against the control cohort
(the rollout's devices not yet in a wave, still on their old bundle). The next issue's telemetry gates
need no new mechanism: they are already registered, and with no telemetry they hold.

A gate outcome per profile is `pass`, `fail` or `hold`. While some members have not finished installing,
a ratio is known only within bounds (the pending members may still go either way); a gate passes or
fails only when both bounds agree, else it holds. `evaluate_gates` folds the outcomes into one
`WaveVerdict`: any failure → rollback (immediately, no need to wait for the bake time), else any hold or
an unfinished bake / too few reports → hold, else promote.
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
    """The devices of one hardware profile in a rollout at one wave: treatment and control."""

    session: Session
    rollout: Rollout
    wave_index: int
    profile: str
    bundle_id: str | None
    treatment: list[tuple[RolloutMember, Device]]
    control: list[tuple[RolloutMember, Device]]
    window_start: dt.datetime
    min_inferences: int = 1
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def treatment_windows(self) -> list[TelemetryWindow]:
        """Telemetry of the treatment members running this rollout's bundle since the wave started."""
        if "treatment" not in self._cache:
            ids = [device.id for _, device in self.treatment]
            self._cache["treatment"] = self._windows(ids, new_bundle=True, since=self.window_start)
        return self._cache["treatment"]

    def control_windows(self) -> tuple[str, list[TelemetryWindow]]:
        """(cohort name, windows) of the control: devices still waiting for their wave, on their old bundle,
        during this wave; at the last wave (nobody is left waiting) the rollout's devices' windows on their
        old bundle since the rollout began (the baseline before they installed)."""
        if "control" not in self._cache:
            ids = [device.id for _, device in self.control]
            rows = self._windows(ids, new_bundle=False, since=self.window_start) if ids else []
            cohort = "control"
            if not rows:
                everyone = [device.id for _, device in self.treatment + self.control]
                rows = self._windows(everyone, new_bundle=False, since=utc(self.rollout.created_at))
                cohort = "baseline"
            self._cache["control"] = (cohort, rows)
        return self._cache["control"]

    def _windows(self, device_ids: Sequence[str], new_bundle: bool, since: dt.datetime | None) -> list[TelemetryWindow]:
        if not device_ids:
            return []
        query = select(TelemetryWindow).where(TelemetryWindow.device_id.in_(device_ids))
        if since is not None:
            query = query.where(TelemetryWindow.received_at >= since)
        if new_bundle:
            query = query.where(TelemetryWindow.bundle_id == self.bundle_id)
        else:
            query = query.where((TelemetryWindow.bundle_id != self.bundle_id) | TelemetryWindow.bundle_id.is_(None))
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
    """A metric over telemetry windows, absolute or relative to the control cohort."""

    kind = "telemetry"
    relative_ok = True

    @abstractmethod
    def aggregate(self, windows: Sequence[TelemetryWindow]) -> tuple[float | None, dict[str, Any]]:
        """(value, how it was computed) over some windows; None when they carry no data for it."""

    def measure(self, cohort: ProfileCohort, spec: GateSpec) -> Measurement:
        windows = cohort.treatment_windows()
        if not windows:
            return Measurement.holding("no telemetry yet")
        inferences = sum(w.inferences for w in windows)
        if inferences < cohort.min_inferences:
            return Measurement.holding("not enough inferences", inferences=inferences, required=cohort.min_inferences)
        value, how = self.aggregate(windows)
        if value is None:
            return Measurement.holding(f"no {self.name} in telemetry yet", inferences=inferences)
        detail = {"inferences": inferences, "windows": len(windows), **how}
        control = None
        if spec.relative_to == "control":
            cohort_name, control_windows = cohort.control_windows()
            control, control_how = self.aggregate(control_windows) if control_windows else (None, {})
            if control is None:
                return Measurement.holding("no control telemetry yet", inferences=inferences, value=value)
            detail["control_cohort"] = cohort_name
            detail["control_windows"] = len(control_windows)
            detail["control_inferences"] = sum(w.inferences for w in control_windows)
        return Measurement(value=value, n=inferences, control=control, detail=detail)


def _histogram_quantile(windows: Sequence[TelemetryWindow], q: float) -> float | None:
    """The q-quantile of the merged latency histograms, when every window uses the same buckets."""
    bounds: list[float] | None = None
    merged: list[int] = []
    for window in windows:
        latency = (window.payload or {}).get("latency_ms") or {}
        window_bounds, counts = latency.get("bounds_ms") or [], latency.get("counts") or []
        if not window_bounds or len(counts) != len(window_bounds) + 1:
            return None
        if bounds is None:
            bounds, merged = list(window_bounds), [0] * len(counts)
        elif window_bounds != bounds:
            return None
        merged = [a + int(b) for a, b in zip(merged, counts)]
    total = sum(merged)
    if bounds is None or total == 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(merged):
        if count and seen + count >= rank:
            if i == len(bounds):  # overflow bucket: all we know is "above the last bound"
                return float(bounds[-1])
            lower = 0.0 if i == 0 else float(bounds[i - 1])
            return lower + (float(bounds[i]) - lower) * (rank - seen) / count
        seen += count
    return float(bounds[-1])


class _LatencyQuantile(_TelemetryMetric):
    quantile: ClassVar[float]
    column: ClassVar[str]

    def aggregate(self, windows):
        value = _histogram_quantile(windows, self.quantile)
        if value is not None:
            return value, {"method": "merged latency histogram"}
        weighted = [(getattr(w, self.column), w.inferences) for w in windows if getattr(w, self.column) is not None]
        weight = sum(n for _, n in weighted)
        if not weighted:
            return None, {}
        if weight == 0:
            return max(v for v, _ in weighted), {"method": f"max of window {self.column[:3]}"}
        return sum(v * n for v, n in weighted) / weight, {"method": f"inference-weighted mean of window {self.column[:3]}"}


class P50LatencyMs(_LatencyQuantile):
    name, quantile, column = "p50_latency_ms", 0.50, "p50_ms"
    description = "Median inference latency in ms of the treatment cohort."


class P95LatencyMs(_LatencyQuantile):
    name, quantile, column = "p95_latency_ms", 0.95, "p95_ms"
    description = "95th percentile inference latency in ms of the treatment cohort."


class P99LatencyMs(_LatencyQuantile):
    name, quantile, column = "p99_latency_ms", 0.99, "p99_ms"
    description = "99th percentile inference latency in ms of the treatment cohort."


class ErrorRate(_TelemetryMetric):
    name = "error_rate"
    description = "Errors per inference (inferences count every request, failed ones included)."
    upper = 1.0

    def aggregate(self, windows):
        inferences = sum(w.inferences for w in windows)
        if inferences == 0:
            return None, {}
        return sum(w.errors for w in windows) / inferences, {"errors": sum(w.errors for w in windows)}


class Drift(_TelemetryMetric):
    name = "drift"
    description = "Worst drift score over the model's inputs and outputs (inference-weighted mean per name)."

    def aggregate(self, windows):
        totals: dict[str, float] = defaultdict(float)
        weights: dict[str, float] = defaultdict(float)
        for window in windows:
            for key, score in (window.drift or {}).items():
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
    description = "Inferences the treatment cohort served on the new bundle this wave; the wave holds until enough."
    on_fail = "hold"
    ops = (">=", ">")

    def measure(self, cohort, spec):
        windows = cohort.treatment_windows()
        return Measurement(value=float(sum(w.inferences for w in windows)), n=len(windows), detail={"windows": len(windows)})


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


def cohort_members(session: Session, rollout: Rollout) -> list[tuple[RolloutMember, Device]]:
    return list(session.execute(
        select(RolloutMember, Device).join(Device, Device.id == RolloutMember.device_id)
        .where(RolloutMember.rollout_id == rollout.id, RolloutMember.cohort == "treatment")
        .order_by(RolloutMember.id)
    ).all())


def evaluate_gates(session: Session, rollout: Rollout, wave_index: int, now: float | dt.datetime) -> WaveVerdict:
    """Decide promote, hold or rollback for a wave of `rollout` from the database as it is now.

    The cohort of wave i is cumulative: every member of waves 0..i. Gates are evaluated per hardware
    profile present in it. A failing gate rolls back at once; promotion also needs the bake time since
    the wave started to have passed and at least `min_reports` members (at most the cohort's size) to
    have finished installing.
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
    min_inferences = int(max([s.threshold for s in specs if s.metric == "min_inferences"], default=1))

    by_profile: dict[str, list[tuple[RolloutMember, Device]]] = defaultdict(list)
    control_by_profile: dict[str, list[tuple[RolloutMember, Device]]] = defaultdict(list)
    for member, device in treatment:
        by_profile[canonical_profile(device.profile)].append((member, device))
    for member, device in control:
        control_by_profile[canonical_profile(device.profile)].append((member, device))
    cohorts = {
        profile: ProfileCohort(session, rollout, wave_index, profile, getattr(bundles.get(profile), "id", None),
                               by_profile[profile], control_by_profile[profile], window_start, min_inferences)
        for profile in sorted(by_profile)
    }

    holds: set[str] = set()
    failures: list[str] = []
    gate_evidence = []
    for spec in specs:
        profiles: dict[str, Any] = {}
        outcomes: list[Outcome] = []
        for profile, cohort in cohorts.items():
            measurement = spec.source.measure(cohort, spec)
            outcome, why = _judge(spec, measurement)
            if outcome == "fail" and spec.source.on_fail == "hold":
                outcome, why = "hold", f"{spec.metric} not reached"
            entry: dict[str, Any] = {"value": _number(measurement.value), "outcome": outcome, "n": measurement.n}
            if measurement.low != measurement.high:
                entry["bounds"] = [_number(measurement.low), _number(measurement.high)]
            if spec.relative_to:
                entry["control"] = _number(measurement.control)
                entry["threshold"] = _number(spec.effective_threshold(measurement.control))
            if why:
                entry["reason"] = why
                holds.add(why)
            entry.update(measurement.detail)
            profiles[profile] = entry
            outcomes.append(outcome)
            if outcome == "fail":
                limit = spec.effective_threshold(measurement.control)
                failures.append(f"{spec.text} failed on {profile} ({measurement.value:.4g} vs {limit:.4g})")
        outcome = "fail" if "fail" in outcomes else "hold" if "hold" in outcomes else "pass"
        gate_evidence.append({
            "gate": spec.text, "metric": spec.metric, "op": spec.op, "threshold": spec.threshold,
            "relative_to": spec.relative_to,
            "cohort": "treatment vs control" if spec.relative_to else "treatment",
            "values": {profile: entry["value"] for profile, entry in profiles.items()},
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
                   "profiles": {p: len(c.treatment) for p, c in cohorts.items()}},
        "bake": {"required_s": rollout.bake_s, "elapsed_s": _number(elapsed), "done": bake_done},
        "reports": {"count": reports, "required": required_reports},
        "gates": gate_evidence,
    }
    return WaveVerdict(decision, evidence)


def describe_metrics() -> list[dict[str, Any]]:
    """Every gate metric with its kind and meaning (for docs, the CLI and the API)."""
    return [{"metric": s.name, "kind": s.kind, "relative_to_control": s.relative_ok, "on_fail": s.on_fail,
             "description": s.description} for s in sorted(METRIC_SOURCES.values(), key=lambda s: s.name)]


__all__ = [
    "DEFAULT_GATES", "METRIC_SOURCES", "GateSpec", "Measurement", "MetricSource", "ProfileCohort", "WaveVerdict",
    "canonical_profile", "describe_metrics", "evaluate_gates", "parse_gates", "rollout_bundles",
]
