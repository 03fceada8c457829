"""Paced and dynamic rollouts: how fast a wave's devices are started, when, and who joins on the way.

A rollout's `pacing` (None: every device of a wave starts at once, as before):

    max_per_minute   start at most this many devices in any 60 s (AWS IoT Jobs' maximumPerMinute)
    max_concurrent   at most this many devices installing at once (assigned, downloading, … selftest): it caps
                     concurrent downloads from the fleet or the object store
    windows          maintenance windows, [{"selector": {label: value}, "start": "HH:MM", "end": "HH:MM",
                     "tz": "Europe/Berlin"}]: a device matching a window's selector is only started inside it
                     (an end before the start spans midnight); a device matching no window's selector is not
                     restricted. The first window whose selector matches is the device's.
    late_joiners     "current_wave" (default): a device that enrolls, or starts matching the selector, while
                     the rollout runs joins the wave in progress; "last_wave": it waits for the last wave;
                     "none": the rollout's members stay those chosen at creation

The controller starts waiting members of the current wave each tick within these limits, and judges a wave
only once every member of it has been started (its bake counts from the last start), so a paced wave holds
with the reason "paced" and a wave outside its window holds with "outside the maintenance window".
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from edgepack.errors import ConfigError

LATE_JOINERS = ("current_wave", "last_wave", "none")
_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


@dataclass(frozen=True)
class Window:
    selector: Mapping[str, str]
    start: dt.time
    end: dt.time
    tz: str

    def matches(self, labels: Mapping[str, Any]) -> bool:
        return all(str(labels.get(key)) == str(value) for key, value in self.selector.items())

    def is_open(self, now: dt.datetime) -> bool:
        local = now.astimezone(ZoneInfo(self.tz)).time().replace(second=0, microsecond=0, tzinfo=None)
        if self.start <= self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end  # across midnight

    def to_dict(self) -> dict[str, Any]:
        return {"selector": dict(self.selector), "start": self.start.strftime("%H:%M"),
                "end": self.end.strftime("%H:%M"), "tz": self.tz}


@dataclass(frozen=True)
class Pacing:
    max_per_minute: int | None = None
    max_concurrent: int | None = None
    windows: tuple[Window, ...] = field(default_factory=tuple)
    late_joiners: str = "current_wave"

    @property
    def limits_starts(self) -> bool:
        return bool(self.max_per_minute or self.max_concurrent or self.windows)

    def window_for(self, labels: Mapping[str, Any]) -> Window | None:
        return next((w for w in self.windows if w.matches(labels)), None)

    def may_start(self, labels: Mapping[str, Any], now: dt.datetime) -> bool:
        window = self.window_for(labels)
        return window is None or window.is_open(now)

    def to_dict(self) -> dict[str, Any]:
        return {"max_per_minute": self.max_per_minute, "max_concurrent": self.max_concurrent,
                "windows": [w.to_dict() for w in self.windows], "late_joiners": self.late_joiners}


def _positive_int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} {value!r}: expected a whole number ≥ 1")
    return value


def _time(name: str, value: Any) -> dt.time:
    match = _HHMM.match(str(value)) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(f"maintenance window {name} {value!r}: expected HH:MM (24 h)")
    return dt.time(int(match.group(1)), int(match.group(2)))


def parse_pacing(max_per_minute: Any = None, max_concurrent: Any = None, windows: Sequence[Any] | None = None,
                 late_joiners: Any = "current_wave") -> Pacing:
    """Validate the pacing options of a rollout; a ConfigError names the first bad one."""
    parsed: list[Window] = []
    for index, raw in enumerate(windows or ()):
        if not isinstance(raw, Mapping):
            raise ConfigError(f"maintenance window {index + 1}: expected an object with selector, start, end, tz")
        unknown = set(raw) - {"selector", "start", "end", "tz"}
        if unknown:
            raise ConfigError(f"maintenance window {index + 1}: unknown field(s) {', '.join(sorted(unknown))}")
        selector = raw.get("selector") or {}
        if not isinstance(selector, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in selector.items()):
            raise ConfigError(f"maintenance window {index + 1}: selector must map label names to values")
        tz = raw.get("tz") or "UTC"
        try:
            ZoneInfo(str(tz))
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"maintenance window {index + 1}: unknown time zone {tz!r}") from None
        start, end = _time("start", raw.get("start")), _time("end", raw.get("end"))
        if start == end:
            raise ConfigError(f"maintenance window {index + 1}: start and end are the same time")
        parsed.append(Window(selector=dict(selector), start=start, end=end, tz=str(tz)))
    if late_joiners not in LATE_JOINERS:
        raise ConfigError(f"late_joiners {late_joiners!r}: expected one of {', '.join(LATE_JOINERS)}")
    return Pacing(max_per_minute=_positive_int("max_per_minute", max_per_minute),
                  max_concurrent=_positive_int("max_concurrent", max_concurrent), windows=tuple(parsed),
                  late_joiners=late_joiners)


def pacing_of(stored: Mapping[str, Any] | None) -> Pacing:
    """The Pacing a rollout stored (`rollouts.pacing`); none stored: no limits, late joiners join."""
    if not stored:
        return Pacing()
    return parse_pacing(stored.get("max_per_minute"), stored.get("max_concurrent"), stored.get("windows"),
                        stored.get("late_joiners", "current_wave"))


__all__ = ["LATE_JOINERS", "Pacing", "Window", "pacing_of", "parse_pacing"]
