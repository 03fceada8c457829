"""Rollout gates: what must hold on the devices of a wave before the rollout goes further.

A gate is a small frozen value, `GateSpec`, parsed from the text an operator types:

    install_failure_ratio<=0.1        absolute threshold, judged on the data so far
    p95_latency_ms<=1.30x control     relative to the control cohort: a statistical comparison
    shadow_agreement>=0.98            absolute, with a confidence interval (shadow runs)
    min_inferences>=500               not a pass/fail gate: until it holds, the wave holds

Each metric is computed by a registered `MetricSource` (subclasses register themselves by `name`), per
hardware profile, so a fleet-wide average cannot hide one failing profile. A gate's outcome per profile
is `pass`, `fail` or `inconclusive`.

Cohorts. The cohort of wave i is cumulative (every member of waves 0..i); its control is the members of
the later waves and the hold-back. The same hash ranking picked them, so within a profile they are a
random sample of the same targets. The hold-back: when a rollout has relative gates, a share of each
profile (`holdback_percent`, default 10 %, at least one device, never the whole profile) is taken out of
the last wave and stays on the old bundle through it, so the last wave still has a concurrent control.
Those devices form step len(waves), the hold-back step: started once the last wave passed, judged on the
install gates only. A profile with a single device has no control: its relative gates stay inconclusive
(use absolute gates for it, or resume the rollout after looking).

Time-matched telemetry. A relative gate reads, per profile:

    treatment   windows on the rollout's bundle received since the wave started, without each member's
                first window after it switched in this wave (it starts at the switch: the install's own work
                and a cold model). The span is the time those windows cover.
    control     windows of the control on its old bundle lying within that span.

So both sides see the same hours, the same busy host and the same network; a fleet-wide shift cancels
out instead of deciding the wave. Telemetry from before the rollout is never a control.

Statistics (fleet.services.stats). Latency gates compare the treatment's and the control's quantile of
their merged latency histograms: the ratio, with a device-level bootstrap (devices resampled, bucket
counts Poisson-resampled) for its standard error on the log scale and a normal interval. Error-rate gates
compare p_t − F·p_c with a Wilson/MOVER interval (an increase below ERROR_RATE_ALLOWANCE is forgiven).
Drift gates compare mean scores as a ratio (device bootstrap). `shadow_agreement` takes a Wilson interval
of the agreement against its threshold. Each test answers: fail when the interval lies beyond the
threshold (the regression is significant), pass when it lies on the good side, inconclusive otherwise.
Resolution: latency buckets are about 21 % apart and a quantile is interpolated inside its bucket, so for a
narrow distribution (log-σ below ~0.3) the ratio can be off by a few percent; a release within ~5 % of its
threshold may be judged on the wrong side of it (fleet.services.stats says more).

Repeated looks. The controller asks every second; testing every second would inflate false rollbacks.
So statistical gates are tested only at LOOKS planned looks per wave, evenly from the bake time to the
maximum bake (`max_bake_s`, default ten bake times and at least bake + 60 s), each at level ALPHA/LOOKS
(Bonferroni: whatever the looks' correlation, a release exactly at its threshold is rolled back, or
promoted, with probability at most ALPHA per wave, profile and gate). A look reads the windows received
up to its own time, so it always gives the same answer (its bootstrap is seeded by rollout, wave, look,
profile and gate). Between looks a statistical gate keeps the last look's outcome. A telemetry gate still
inconclusive after the maximum bake pauses the rollout for a person; it never promotes by default.
Install and absolute gates are judged on every tick, as before.

Before a telemetry gate decides, each cohort it reads must have served at least `min_inferences`
inferences (the `min_inferences>=N` gate; DEFAULT_MIN_INFERENCES when a rollout has telemetry gates but
names none); until then it is inconclusive, and its evidence says how many of how many.

Latency percentiles of absolute gates come from the cohort's merged latency histograms; when histograms
are missing, use different buckets, or the percentile lies above the last bucket bound, the metric falls
back to the maximum over devices of each device's window percentile — an upper bound of the pooled
percentile — and the evidence says so. A relative latency gate needs histograms: without them it is
inconclusive.

While some members have not finished installing, an install ratio is known only within bounds (the
pending members may still go either way); it passes or fails only when both bounds agree. `evaluate_gates`
folds the outcomes into one `WaveVerdict`: any failure → rollback (at once), else an inconclusive
telemetry gate past the maximum bake → pause, else anything inconclusive, an unfinished bake or too few
reports → hold, else promote.

Evidence. Besides the per-gate summary (`gates`), the verdict lists one `checks` row per gate and profile:

    {"gate": "p95_latency_ms<=1.3x control", "metric": "p95_latency_ms", "profile": "rpi5",
     "cohort": "treatment", "devices": 3, "reporting_devices": 3, "windows": 9, "inferences": 540,
     "value": 91.2, "control_cohort": "control", "control_devices": 27, "control_windows": 80,
     "control_inferences": 4800, "control": 60.4, "op": "<=", "threshold": "1.30x control", "limit": 78.5,
     "method": "merged latency histogram", "excluded_windows": 3, "span": [from, to],
     "test": {"method": "...", "estimate": 1.51, "low": 1.41, "high": 1.62, "limit": 1.3,
              "statistic": 5.2, "p_value": 1e-7, "p_pass": 1.0, "outcome": "fail", ...},
     "look": 1, "looks": 6, "alpha": 0.008333, "outcome": "fail", "passed": false}

`value` and `control` are the two sides' quantiles (ms); `test.estimate` their ratio, `low`/`high` its
interval at the look's level, `statistic` the z of the log ratio against the threshold (positive: towards
a regression), `p_value` the one-sided p of "no regression beyond the threshold", `p_pass` of "regressed
at least that much". An inconclusive row has `reason`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import math
import operator
import re
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, ClassVar, Iterable, Literal, Mapping, Sequence

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from edgepack.errors import ConfigError
from edgepack.histogram import from_wire
from edgepack.histogram import quantile as histogram_quantile
from fleet.models import Bundle, Device, Rollout, RolloutMember, TelemetryWindow
from fleet.services.stats import (
    Comparison, compare_mean_ratio, compare_proportion_to_threshold, compare_proportions, compare_quantile_ratio,
)

Decision = Literal["promote", "hold", "rollback", "pause"]
Outcome = Literal["pass", "fail", "inconclusive"]

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
# The error a relative gate may make on one wave, profile and gate: the chance of rolling back a release
# that sits exactly at its threshold, and of promoting one that does (one-sided, each).
ALPHA = 0.05
# Planned looks per wave between the bake time and the maximum bake; each look tests at ALPHA / LOOKS.
LOOKS = 6
# Without a maximum bake: ten bake times, and at least a minute more than one.
MAX_BAKE_FACTOR = 10.0
MAX_BAKE_MIN_EXTRA_S = 60.0
# A look judges the windows received up to its time, once this much later (a window stored at the look's
# time is surely committed).
LOOK_GRACE_S = 1.0
# A relative error-rate gate forgives an increase below this absolute rate (0.1 percentage point): without
# it a control that served no error would forbid any error at all.
ERROR_RATE_ALLOWANCE = 0.001
# Share of each profile (percent) kept on the old bundle through the last wave when a rollout has relative
# gates: the last wave's control. Moved after the last wave passed.
DEFAULT_HOLDBACK_PERCENT = 10.0
# Bootstrap resamples for the statistical comparisons.
RESAMPLES = 1000


def max_bake_s(rollout: Rollout) -> float:
    """The rollout's maximum bake per wave: its own, else MAX_BAKE_FACTOR bake times (≥ bake + 60 s)."""
    if rollout.max_bake_s is not None:
        return max(float(rollout.max_bake_s), rollout.bake_s)
    return max(rollout.bake_s * MAX_BAKE_FACTOR, rollout.bake_s + MAX_BAKE_MIN_EXTRA_S)


def look_times(bake_s: float, max_bake: float, looks: int = LOOKS) -> list[float]:
    """Seconds after a wave starts at which statistical gates are tested: `looks` evenly from the bake
    time to the maximum bake (one look when they are equal; without a bake, the first look is one step
    in, not at the wave's start, when there is nothing to judge yet)."""
    if max_bake <= bake_s or looks <= 1:
        return [max_bake]
    if bake_s <= 0:
        return [max_bake * (j + 1) / looks for j in range(looks)]
    step = (max_bake - bake_s) / (looks - 1)
    return [bake_s + step * j for j in range(looks)]


def holdback_count(profile_size: int, new_in_last_wave: int, percent: float) -> int:
    """How many of a profile's devices stay on the old bundle through the last wave: `percent` of the
    profile (at least one) but never more than the last wave adds, and never the whole profile."""
    if percent <= 0 or profile_size < 2:
        return 0
    wanted = max(1, math.ceil(percent * profile_size / 100))
    return max(0, min(wanted, new_in_last_wave, profile_size - 1))


def has_relative_gates(specs: Sequence[GateSpec]) -> bool:
    return any(spec.relative_to for spec in specs)


# ---------------------------------------------------------------- measurements and metric sources


@dataclass(frozen=True)
class Measurement:
    """One metric on one profile's cohort.

    `low`/`high` bound the value the metric can still reach while members are pending (equal to `value`
    once everything is in). `hold_reason` says the data is not there yet: the gate is inconclusive
    whatever the value. A relative gate's measurement carries the statistical `comparison` that decides it.
    """

    value: float | None
    low: float | None = None
    high: float | None = None
    n: int = 0
    control: float | None = None
    hold_reason: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    comparison: Comparison | None = None

    @classmethod
    def holding(cls, reason: str, **detail: Any) -> "Measurement":
        return cls(value=None, hold_reason=reason, detail=detail)


@dataclass
class ProfileCohort:
    """The devices of one hardware profile in a rollout at one wave: treatment and control, and the time
    span whose telemetry is judged (see the module docstring for the rules)."""

    session: Session
    rollout: Rollout
    wave_index: int
    profile: str
    bundle_id: str | None
    treatment: list[tuple[RolloutMember, CohortDevice]]
    control: list[tuple[RolloutMember, CohortDevice]]
    window_start: dt.datetime
    until: dt.datetime | None = None
    min_inferences: int = 1
    control_name: str = "control"
    look: int | None = None
    looks: int = 1
    alpha: float = ALPHA
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def treatment_windows(self) -> list[TelemetryWindow]:
        """Windows of the treatment members on this rollout's bundle received in the wave so far, without
        each new member's first one (it begins at the switch: the install's own work and a cold model)."""
        if "treatment" not in self._cache:
            ids = [device.id for _, device in self.treatment]
            rows = self._windows(ids, new_bundle=True, since=self.window_start, until=self.until)
            switched_in_wave = {device.id for member, device in self.treatment
                                if utc(member.assigned_at) is not None and utc(member.assigned_at) >= self.window_start}
            kept, first_seen, excluded = [], set(), 0
            for window in rows:
                if window.device_id in switched_in_wave and window.device_id not in first_seen:
                    first_seen.add(window.device_id)
                    excluded += 1
                    continue
                kept.append(window)
            self._cache["treatment"] = kept
            self._cache["excluded"] = excluded
        return self._cache["treatment"]

    def span(self) -> tuple[dt.datetime, dt.datetime] | None:
        """The time the judged treatment windows cover: from the start of the earliest to the end of the
        latest (a window ends when it is received and lasts `window_s`)."""
        windows = self.treatment_windows()
        if not windows:
            return None
        start = min(utc(w.received_at) - dt.timedelta(seconds=w.window_s) for w in windows)
        return max(start, self.window_start), max(utc(w.received_at) for w in windows)

    def control_windows(self) -> list[TelemetryWindow]:
        """Windows of the control members (later waves, then the hold-back) on their old bundle received
        within the treatment's span: the same time, so a fleet-wide shift hits both sides alike."""
        if "control" not in self._cache:
            span = self.span()
            ids = [device.id for _, device in self.control]
            if span is None or not ids:
                self._cache["control"] = []
            else:
                start, end = span
                rows = self._windows(ids, new_bundle=False, since=start, until=end)
                # a control window must lie inside the span, not only end in it
                self._cache["control"] = [w for w in rows if utc(w.received_at) - dt.timedelta(seconds=w.window_s)
                                          >= start - dt.timedelta(seconds=1e-3)]
        return self._cache["control"]

    def excluded_windows(self) -> int:
        self.treatment_windows()
        return self._cache["excluded"]

    def seed(self, spec: GateSpec) -> int:
        """The bootstrap's seed for one look at one gate: the same data always gives the same answer."""
        key = f"{self.rollout.id}/{self.wave_index}/{self.look}/{self.profile}/{spec.text}"
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big")

    def _windows(self, device_ids: Sequence[str], new_bundle: bool, since: dt.datetime | None,
                 until: dt.datetime | None = None) -> list[TelemetryWindow]:
        if not device_ids:
            return []
        query = select(TelemetryWindow).where(TelemetryWindow.device_id.in_(device_ids))
        if since is not None:
            query = query.where(TelemetryWindow.received_at >= since)
        if until is not None:
            query = query.where(TelemetryWindow.received_at <= until)
        if new_bundle:
            query = query.where(TelemetryWindow.bundle_id == self.bundle_id)
        else:
            query = query.where((TelemetryWindow.bundle_id != self.bundle_id) | TelemetryWindow.bundle_id.is_(None))
        return list(self.session.scalars(query.order_by(TelemetryWindow.received_at, TelemetryWindow.id)))


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
    must have served `min_inferences` first (see the module docstring).

    Absolute gates compare the treatment's value with the threshold. Relative gates compare treatment and
    control with `compare` (a statistical test: fleet.services.stats), at the wave's planned looks."""

    kind = "telemetry"
    relative_ok = True

    @abstractmethod
    def aggregate(self, windows: Sequence[TelemetryWindow]) -> tuple[float | None, dict[str, Any]]:
        """(value, how it was computed) over some windows; None when they carry no data for it."""

    @abstractmethod
    def compare(self, treatment: Sequence[TelemetryWindow], control: Sequence[TelemetryWindow], spec: GateSpec,
                alpha: float, seed: int) -> Comparison:
        """Treatment against control for a relative gate, at one-sided level `alpha`."""

    def measure(self, cohort: ProfileCohort, spec: GateSpec) -> Measurement:
        windows = cohort.treatment_windows()
        required = cohort.min_inferences
        detail: dict[str, Any] = {
            "devices": len(cohort.treatment), "reporting_devices": _reporting(windows), "windows": len(windows),
            "inferences": _served(windows), "required_inferences": required,
            "excluded_windows": cohort.excluded_windows(),
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

        name = cohort.control_name
        control_windows = cohort.control_windows()
        span = cohort.span()
        detail.update({
            "control_cohort": name, "control_devices": len(cohort.control),
            "control_reporting_devices": _reporting(control_windows), "control_windows": len(control_windows),
            "control_inferences": _served(control_windows),
            "span": [span[0].isoformat(), span[1].isoformat()] if span else None,
        })
        if not cohort.control:
            return Measurement(value=value, detail=detail,
                               hold_reason=f"no {name} devices on {cohort.profile}: nothing runs the old bundle beside it")
        if not control_windows:
            return Measurement(value=value, hold_reason=f"no {name} telemetry in the same span yet", detail=detail)
        if detail["control_inferences"] < required:
            return Measurement(value=value, hold_reason=f"not enough {name} inferences", detail=detail)
        control, control_how = self.aggregate(control_windows)
        detail.update({f"control_{key}": item for key, item in control_how.items()})
        if control is None:
            return Measurement(value=value, hold_reason=f"no {self.name} in {name} telemetry yet", detail=detail)
        comparison = self.compare(windows, control_windows, spec, cohort.alpha, cohort.seed(spec))
        return Measurement(value=value, n=detail["inferences"], control=control, detail=detail, comparison=comparison,
                           hold_reason=comparison.reason if comparison.outcome == "inconclusive" else None)


def _served(windows: Sequence[TelemetryWindow]) -> int:
    return sum(window.inferences for window in windows)


def _reporting(windows: Sequence[TelemetryWindow]) -> int:
    return len({window.device_id for window in windows})


_NO_HISTOGRAM = object()


def window_histogram(window: TelemetryWindow) -> tuple[tuple[float, ...], list[int]] | None:
    """(bucket upper bounds, counts with the overflow bucket last) of a window's latency histogram, or None.
    Decoded once per loaded window (one evaluation reads each window's histogram several times)."""
    cached = window.__dict__.get("_edgepack_histogram", _NO_HISTOGRAM)
    if cached is _NO_HISTOGRAM:
        latency = (window.payload or {}).get("latency_ms") or {}
        cached = from_wire(latency.get("bounds_ms"), latency.get("counts"))
        window.__dict__["_edgepack_histogram"] = cached
    return cached


def device_histograms(windows: Sequence[TelemetryWindow]) -> tuple[tuple[float, ...], np.ndarray] | str:
    """(bounds, devices × buckets counts: each device's windows summed) when every window that served
    inferences has a histogram with the same buckets; else why not."""
    served = [window for window in windows if window.inferences > 0]
    histograms = [window_histogram(window) for window in served]
    missing = sum(1 for histogram in histograms if histogram is None)
    if not served:
        return "no window served inferences"
    if missing:
        return f"no usable latency histogram in {missing} of {len(served)} windows"
    if len({bounds for bounds, _ in histograms}) > 1:
        return "windows use different histogram buckets"
    bounds = histograms[0][0]
    rows: dict[str, np.ndarray] = {}
    for window, (_, counts) in zip(served, histograms):
        row = rows.setdefault(window.device_id, np.zeros(len(counts), dtype=np.int64))
        row += np.asarray(counts, dtype=np.int64)
    return bounds, np.stack(list(rows.values()))


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
    merged_or_why = device_histograms(served)
    if isinstance(merged_or_why, str):
        why = merged_or_why
    else:
        bounds, per_device = merged_or_why
        merged = per_device.sum(axis=0).tolist()
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


def _undecidable(reason: str, spec: GateSpec) -> Comparison:
    return Comparison(method="none", estimate=None, low=None, high=None, limit=spec.threshold, statistic=None,
                      p_value=None, p_pass=None, outcome="inconclusive", reason=reason)


class _LatencyQuantile(_TelemetryMetric):
    quantile: ClassVar[float]
    column: ClassVar[str]

    def aggregate(self, windows):
        return latency_quantile(windows, self.quantile, self.column)

    def compare(self, treatment, control, spec, alpha, seed):
        sides = [device_histograms(treatment), device_histograms(control)]
        for side, name in zip(sides, ("treatment", "control")):
            if isinstance(side, str):
                return _undecidable(f"{name}: {side}; a relative latency gate compares histograms", spec)
        (bounds, t_counts), (c_bounds, c_counts) = sides
        if bounds != c_bounds:
            return _undecidable("treatment and control use different histogram buckets", spec)
        return compare_quantile_ratio(t_counts, c_counts, bounds, self.quantile, spec.threshold, spec.op, alpha, seed,
                                      resamples=RESAMPLES)


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
    description = ("Errors per inference (inferences count every request, failed ones included); relative: "
                   f"an increase below {ERROR_RATE_ALLOWANCE:g} is forgiven.")
    upper = 1.0

    def aggregate(self, windows):
        inferences = _served(windows)
        if inferences == 0:
            return None, {}
        errors = sum(w.errors for w in windows)
        return errors / inferences, {"errors": errors}

    def compare(self, treatment, control, spec, alpha, seed):
        return compare_proportions(sum(w.errors for w in treatment), _served(treatment),
                                   sum(w.errors for w in control), _served(control),
                                   spec.threshold, ERROR_RATE_ALLOWANCE, spec.op, alpha)


def _drift_scores(windows: Sequence[TelemetryWindow]) -> tuple[dict[str, dict[str, tuple[float, float]]], set[str]]:
    """{name: {device: (inference-weighted sum of scores, weight)}} over the windows' finite drift scores."""
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))
    for window in windows:
        for key, score in (window.drift or {}).items():
            if not isinstance(score, (int, float)) or not math.isfinite(score):
                continue  # a device's broken score must not poison the cohort's mean
            weight = max(window.inferences, 1)
            entry = scores[key][window.device_id]
            entry[0] += float(score) * weight
            entry[1] += weight
    methods = {(w.payload or {}).get("drift_method") for w in windows} - {None}
    return {key: {device: (s, w) for device, (s, w) in devices.items()} for key, devices in scores.items()}, methods


def _drift_means(per_name: Mapping[str, Mapping[str, tuple[float, float]]]) -> dict[str, float]:
    """{name: inference-weighted mean score over every device} from `_drift_scores`' first part."""
    return {key: sum(s for s, _ in devices.values()) / sum(w for _, w in devices.values())
            for key, devices in per_name.items()}


class Drift(_TelemetryMetric):
    name = "drift"
    description = "Worst drift score over the model's inputs and outputs (inference-weighted mean per name)."

    def aggregate(self, windows):
        per_name, methods = _drift_scores(windows)
        if not per_name:
            return None, {}
        scores = _drift_means(per_name)
        worst = max(scores, key=scores.__getitem__)
        return scores[worst], {"worst": worst, "scores": scores, "drift_method": ", ".join(sorted(methods)) or None}

    def compare(self, treatment, control, spec, alpha, seed):
        # the treatment's worst name, against the control's score for the same name
        t_scores, _ = _drift_scores(treatment)
        c_scores, _ = _drift_scores(control)
        if not t_scores:
            return _undecidable("no drift scores in the treatment", spec)
        t_means = _drift_means(t_scores)
        worst = max(t_means, key=t_means.__getitem__)
        if worst not in c_scores:
            return _undecidable(f"the control reports no drift score for {worst!r}", spec)
        comparison = compare_mean_ratio(list(t_scores[worst].values()), list(c_scores[worst].values()),
                                        spec.threshold, spec.op, alpha, seed, resamples=RESAMPLES)
        return dataclasses.replace(comparison, detail={**comparison.detail, "name": worst})


class ShadowAgreement(_TelemetryMetric):
    """Top-1 agreement of a shadow candidate with the active model, from the `shadow` summary of windows
    whose device runs a shadow (agreement × samples summed over windows)."""

    name = "shadow_agreement"
    description = ("Share of shadow-compared requests where the candidate agrees with the active model "
                   "(absolute; Wilson interval: pass when it clears the threshold, fail when it cannot reach it).")
    relative_ok = False
    upper = 1.0

    def aggregate(self, windows):
        agreed, samples = _shadow_counts(windows)
        if samples == 0:
            return None, {}
        return agreed / samples, {"shadow_samples": samples}

    def compare(self, treatment, control, spec, alpha, seed):  # absolute only (relative_ok is False)
        raise NotImplementedError

    def measure(self, cohort, spec):
        windows = self._shadow_windows(cohort)
        agreed, samples = _shadow_counts(windows)
        detail = {"devices": len(cohort.treatment), "reporting_devices": _reporting(windows), "windows": len(windows),
                  "shadow_samples": samples, "required_inferences": cohort.min_inferences}
        if samples < cohort.min_inferences:
            return Measurement.holding("not enough shadow samples", **detail)
        comparison = compare_proportion_to_threshold(round(agreed), samples, spec.threshold, spec.op, cohort.alpha)
        return Measurement(value=agreed / samples, n=samples, detail=detail, comparison=comparison,
                           hold_reason=comparison.reason or ("the interval still holds the threshold"
                                                             if comparison.outcome == "inconclusive" else None))

    @staticmethod
    def _shadow_windows(cohort: ProfileCohort) -> list[TelemetryWindow]:
        # a shadow runs beside the old bundle, so any window of the cohort's devices in the wave counts
        ids = [device.id for _, device in cohort.treatment]
        if not ids:
            return []
        query = select(TelemetryWindow).where(TelemetryWindow.device_id.in_(ids), TelemetryWindow.received_at >= cohort.window_start)
        if cohort.until is not None:
            query = query.where(TelemetryWindow.received_at <= cohort.until)
        return [w for w in cohort.session.scalars(query) if (w.payload or {}).get("shadow")]


def _shadow_counts(windows: Sequence[TelemetryWindow]) -> tuple[float, int]:
    agreed, samples = 0.0, 0
    for window in windows:
        shadow = (window.payload or {}).get("shadow") or {}
        n = shadow.get("samples")
        agreement = shadow.get("agreement")
        if isinstance(n, (int, float)) and n > 0 and isinstance(agreement, (int, float)) and 0 <= agreement <= 1:
            agreed += agreement * n
            samples += int(n)
    return agreed, samples


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
        if self.decision not in ("promote", "hold", "rollback", "pause"):
            raise ValueError(f"unknown decision {self.decision!r}")

    @property
    def reason(self) -> str:
        return self.evidence.get("reason", "")


def _judge(spec: GateSpec, measurement: Measurement) -> tuple[Outcome, str | None]:
    if measurement.comparison is not None:
        outcome = measurement.comparison.outcome
        return outcome, measurement.hold_reason or (
            "the interval still holds the threshold" if outcome == "inconclusive" else None)
    if measurement.hold_reason:
        return "inconclusive", measurement.hold_reason
    low = measurement.value if measurement.low is None else measurement.low
    high = measurement.value if measurement.high is None else measurement.high
    ok_low, ok_high = spec.satisfied(low, measurement.control), spec.satisfied(high, measurement.control)
    if ok_low and ok_high:
        return "pass", None
    if not ok_low and not ok_high:
        return "fail", None
    return "inconclusive", "waiting for installs"


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
    if measurement.comparison is not None:
        row["test"] = measurement.comparison.to_evidence()
    row.update({"outcome": outcome, "passed": outcome == "pass"})
    if why:
        row["reason"] = why
    return row


def _failure_text(row: dict[str, Any]) -> str:
    test = row.get("test")
    if test and test.get("estimate") is not None and row.get("control") is not None:
        low, high = test["low"], test["high"]
        return (f"{row['gate']} failed on {row['profile']}: {row['cohort']} {row['value']:.4g} vs "
                f"{row.get('control_cohort', 'control')} {row['control']:.4g}, ratio {test['estimate']:.3g} "
                f"(interval {low:.3g}–{high:.3g}, p={test['p_value']:.2g}) beyond {test['limit']:g}")
    if test and test.get("estimate") is not None:
        return (f"{row['gate']} failed on {row['profile']}: {row['value']:.4g} "
                f"(interval {test['low']:.4g}–{test['high']:.4g}) vs limit {test['limit']:g}")
    text = f"{row['gate']} failed on {row['profile']}: {row['cohort']} {row['value']:.4g} vs limit {row['limit']:.4g}"
    if row.get("control") is not None:
        factor = str(row["threshold"]).removesuffix("control").strip()
        text += f" = {factor} {row.get('control_cohort', 'control')} {row['control']:.4g}"
    return text


@dataclasses.dataclass(frozen=True, slots=True)
class CohortDevice:
    """What judging a wave reads of a member's device. Not the ORM row: at 10,000 members, loading every
    Device (labels, the signed desired state: JSON to parse) cost more than all the statistics."""

    id: str
    profile: str
    current_bundle_id: str | None


def cohort_members(session: Session, rollout: Rollout) -> list[tuple[RolloutMember, CohortDevice]]:
    rows = session.execute(
        select(RolloutMember, Device.id, Device.profile, Device.current_bundle_id)
        .join(Device, Device.id == RolloutMember.device_id)
        .where(RolloutMember.rollout_id == rollout.id)
        .order_by(RolloutMember.id)
    ).all()
    return [(member, CohortDevice(device_id, profile, bundle_id)) for member, device_id, profile, bundle_id in rows]


def holdback_step(rollout: Rollout) -> int:
    """The index of the step after the last wave that moves the hold-back (`len(waves)`)."""
    return len(rollout.waves)


def step_percent(rollout: Rollout, index: int) -> float | None:
    """A wave's percent; 100 for the hold-back step."""
    if 0 <= index < len(rollout.waves):
        return rollout.waves[index]
    return 100 if index == holdback_step(rollout) else None


def _is_statistical(spec: GateSpec) -> bool:
    return spec.relative_to is not None or spec.metric == "shadow_agreement"


def evaluate_gates(session: Session, rollout: Rollout, wave_index: int, now: float | dt.datetime) -> WaveVerdict:
    """Decide promote, hold, pause or rollback for a wave of `rollout` from the database as it is now.

    The cohort of wave i is cumulative: every member of waves 0..i; the control, the members of the waves
    after i and the hold-back. Gates are evaluated per hardware profile present in the cohort. Install and
    absolute gates are judged on the data so far; statistical gates (relative, shadow agreement) at the
    wave's latest planned look, on the telemetry received up to it. A failing gate rolls back at once.
    Promotion needs the bake time to have passed, every gate to pass and at least `min_reports` members
    (at most the cohort's size) to have finished installing. A telemetry gate still inconclusive at the
    last look (the maximum bake) pauses the rollout. The hold-back step (index len(waves)) judges the
    install gates of the hold-back only: the telemetry gates were judged at the last wave against it.
    """
    now_dt = utc(now)
    specs = parse_gates(rollout.gates or DEFAULT_GATES)
    bundles = rollout_bundles(session, rollout)
    members = cohort_members(session, rollout)
    final_step = wave_index >= holdback_step(rollout)
    if final_step:
        specs = [spec for spec in specs if spec.source.kind == "install"]
    treatment = [(m, d) for m, d in members if m.wave_index <= wave_index]
    control = [(m, d) for m, d in members if m.wave_index > wave_index]
    new_in_wave = sum(1 for m, _ in treatment if m.wave_index == wave_index)
    started = utc(rollout.wave_started_at) if rollout.current_wave == wave_index else None
    window_start = started or utc(rollout.created_at)
    elapsed = None if started is None else (now_dt - started).total_seconds()
    min_inferences = required_inferences(specs)
    max_bake = max_bake_s(rollout)
    looks = look_times(rollout.bake_s, max_bake)
    reached = [j for j, t in enumerate(looks) if elapsed is not None and elapsed >= t + LOOK_GRACE_S]
    look = reached[-1] if reached else None
    look_until = started + dt.timedelta(seconds=looks[look]) if look is not None and started else None
    control_name = "holdback" if wave_index == holdback_step(rollout) - 1 else "control"

    by_profile: dict[str, list[tuple[RolloutMember, CohortDevice]]] = defaultdict(list)
    control_by_profile: dict[str, list[tuple[RolloutMember, CohortDevice]]] = defaultdict(list)
    for member, device in treatment:
        by_profile[canonical_profile(device.profile)].append((member, device))
    for member, device in control:
        control_by_profile[canonical_profile(device.profile)].append((member, device))

    def cohort(profile: str, statistical: bool) -> ProfileCohort:
        return ProfileCohort(session, rollout, wave_index, profile, getattr(bundles.get(profile), "id", None),
                             by_profile[profile], control_by_profile[profile], window_start,
                             until=look_until if statistical else now_dt, min_inferences=min_inferences,
                             control_name=control_name, look=look, looks=len(looks), alpha=ALPHA / len(looks))

    live = {profile: cohort(profile, False) for profile in sorted(by_profile)}
    at_look = {profile: cohort(profile, True) for profile in sorted(by_profile)}

    holds: set[str] = set()
    failures: list[str] = []
    telemetry_inconclusive = False
    gate_evidence = []
    checks: list[dict[str, Any]] = []
    for spec in specs:
        statistical = _is_statistical(spec)
        profiles: dict[str, Any] = {}
        outcomes: list[Outcome] = []
        for profile in sorted(by_profile):
            if statistical and look is None:
                first = looks[0]
                measurement = Measurement.holding(f"baking until the first look at {first:g} s",
                                                  devices=len(by_profile[profile]))
            elif statistical:
                measurement = _measure_cached(spec, at_look[profile])
            else:
                measurement = spec.source.measure(live[profile], spec)
            outcome, why = _judge(spec, measurement)
            if outcome == "fail" and spec.source.on_fail == "hold":
                outcome, why = "inconclusive", f"{spec.metric} not reached"
            row = _check(spec, profile, measurement, outcome, why)
            if statistical:
                row.update({"look": None if look is None else look + 1, "looks": len(looks),
                            "alpha": _number(ALPHA / len(looks))})
            if why:
                holds.add(why)
            if outcome == "fail":
                failures.append(_failure_text(row))
            if outcome == "inconclusive" and spec.source.kind == "telemetry":
                telemetry_inconclusive = True
            profiles[profile] = row
            checks.append(row)
            outcomes.append(outcome)
        outcome = "fail" if "fail" in outcomes else "inconclusive" if "inconclusive" in outcomes else "pass"
        gate_evidence.append({
            "gate": spec.text, "metric": spec.metric, "op": spec.op, "threshold": spec.threshold,
            "relative_to": spec.relative_to,
            "cohort": f"treatment vs {control_name}" if spec.relative_to else "treatment",
            "values": {profile: row["value"] for profile, row in profiles.items()},
            "profiles": profiles, "outcome": outcome, "passed": outcome == "pass",
        })

    bake_done = final_step or new_in_wave == 0 or (elapsed is not None and elapsed >= rollout.bake_s)
    if not bake_done:
        holds.add("baking")
    reports = sum(1 for m, _ in treatment if m.phase in TERMINAL_PHASES - {TIMED_OUT})
    required_reports = min(rollout.min_reports, len(treatment))
    if reports < required_reports:
        holds.add("waiting for reports")
    past_max_bake = elapsed is not None and elapsed >= max_bake + LOOK_GRACE_S

    if failures:
        decision: Decision = "rollback"
        reason = "; ".join(failures)
    elif telemetry_inconclusive and past_max_bake:
        decision = "pause"
        reason = f"inconclusive after the maximum bake of {max_bake:g} s: " + "; ".join(sorted(holds))
    elif holds:
        decision = "hold"
        reason = "; ".join(sorted(holds))
    else:
        decision = "promote"
        reason = "every gate passed on every profile"
    evidence = {
        "wave": wave_index, "percent": step_percent(rollout, wave_index), "decision": decision, "reason": reason,
        "at": now_dt.isoformat(),
        "step": "holdback" if final_step else "wave",
        "cohort": {"treatment": len(treatment), "new_in_wave": new_in_wave, "control": len(control),
                   "control_cohort": control_name,
                   "profiles": {p: len(c) for p, c in sorted(by_profile.items())},
                   "control_profiles": {p: len(control_by_profile[p]) for p in sorted(by_profile)}},
        "bake": {"required_s": rollout.bake_s, "max_s": max_bake, "elapsed_s": _number(elapsed), "done": bake_done},
        "looks": {"at_s": [_number(t) for t in looks], "current": None if look is None else look + 1,
                  "alpha_per_look": _number(ALPHA / len(looks)), "alpha": ALPHA},
        "reports": {"count": reports, "required": required_reports},
        "min_inferences": min_inferences,
        "gates": gate_evidence,
        "checks": checks,
    }
    return WaveVerdict(decision, evidence)


# A look's statistical measurements never change once taken (its data ends at the look's time): the
# controller asks every tick, so keep the recent ones instead of reading and resampling them again.
_LOOK_CACHE: "OrderedDict[tuple[str, int, int, str, str, str], Measurement]" = OrderedDict()
_LOOK_CACHE_SIZE = 4096
_LOOK_CACHE_LOCK = threading.Lock()


def _measure_cached(spec: GateSpec, cohort: ProfileCohort) -> Measurement:
    key = (cohort.rollout.id, cohort.wave_index, cohort.look if cohort.look is not None else -1, cohort.profile, spec.text,
           utc(cohort.window_start).isoformat())
    with _LOOK_CACHE_LOCK:
        if key in _LOOK_CACHE:
            _LOOK_CACHE.move_to_end(key)
            return _LOOK_CACHE[key]
    measurement = spec.source.measure(cohort, spec)
    with _LOOK_CACHE_LOCK:
        _LOOK_CACHE[key] = measurement
        while len(_LOOK_CACHE) > _LOOK_CACHE_SIZE:
            _LOOK_CACHE.popitem(last=False)
    return measurement


def describe_metrics() -> list[dict[str, Any]]:
    """Every gate metric with its kind and meaning (for docs, the CLI and the API)."""
    return [{"metric": s.name, "kind": s.kind, "relative_to_control": s.relative_ok, "on_fail": s.on_fail,
             "description": s.description} for s in sorted(METRIC_SOURCES.values(), key=lambda s: s.name)]


__all__ = [
    "CohortDevice",
    "ALPHA", "DEFAULT_GATES", "DEFAULT_HOLDBACK_PERCENT", "DEFAULT_MIN_INFERENCES", "LOOKS", "METRIC_SOURCES",
    "GateSpec", "Measurement", "MetricSource", "ProfileCohort", "WaveVerdict", "canonical_profile", "describe_metrics",
    "evaluate_gates", "has_relative_gates", "holdback_count", "holdback_step", "latency_quantile", "look_times",
    "max_bake_s", "parse_gates", "required_inferences", "rollout_bundles", "step_percent", "threshold_text",
    "window_histogram",
]
