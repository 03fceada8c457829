"""Local safety: the device switches back to its previous bundle by itself, without a download, and says why.

Three triggers; each ends in status `rolled_back` with the reason in `error`:

1. **Error-rate jump right after a switch.** After an install switches bundles, the monitor watches
   the new bundle's requests for `safety.window_s` seconds. Once it has seen `safety.min_requests`
   of them, and as long as the watch lasts, it compares their error rate (failed / all requests,
   the fleet's definition) with

       threshold = max(safety.max_error_rate, safety.error_rate_factor × previous bundle's error rate)

   where the previous bundle's rate is what this process saw of it before the switch (recent requests,
   older ones decaying), 0 when it saw none. Above the threshold the agent rolls back through the
   installer's rollback path (re-verify the previous slot, switch the pointer; no download). Both
   kinds of error count: a model that stops accepting the inputs its callers send is as broken for
   them as one that fails inside the runtime.

2. **Crash loop.** `state_dir/safety.json` records the last switch made by an install (`bundle_id`,
   `switched_at`) and whether the agent process is running. Every start that finds `running` still
   set (the process before it died without stopping: SIGKILL, OOM, a segfault in the runtime) within
   `safety.crash_loop_window_s` of that switch counts as a crash restart. When there have been more
   than `safety.crash_loop_restarts` of them, the agent rolls back at start, after the state folder's
   recovery and before the engine loads a model, so the crashing model is never loaded again. A
   switch whose record a crash prevented (it died between the pointer switch and the record) is
   recognised by the active slot's `installed_at`. A clean stop (SIGTERM, `Agent.stop`) clears
   `running`, so restarts for upgrades do not count. `crash_loop_restarts: 0` turns this off.

3. **Self-test failure** is the installer's: a bundle that fails it never becomes active.

Only switches made by an `install` are watched: a rollback the fleet asked for, or one this module
made, is never undone locally (no ping-pong), and a bundle this module rolled back from is not rolled
back to. The desired state the device last applied keeps its seq, so the retained install is not
replayed; the fleet decides what comes next.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from device_agent.state import write_atomic
from edgepack.clock import SYSTEM_CLOCK, Clock

if TYPE_CHECKING:
    from device_agent.config import SafetyConfig
    from device_agent.inference import InferenceEvent
    from device_agent.installer import InstallOutcome

log = logging.getLogger(__name__)

RECORD_NAME = "safety.json"
_BASELINE_CAP = 1000  # the previous bundle's rate is over roughly its last 1000-2000 requests

SwitchBack = Callable[[str, str], "InstallOutcome | None"]
"""`switch_back(from_bundle_id, reason)`: roll back from that bundle if it is still active (the agent's)."""


@dataclass
class SwitchWatch:
    """The watch over one install's first `safety.window_s` seconds (`SafetyMonitor.watch` gives a copy)."""

    bundle_id: str
    previous_bundle_id: str
    threshold: float
    previous_rate: float
    started: float
    requests: int = 0
    errors: int = 0
    done: bool = False  # the window passed, or the watch triggered
    triggered: bool = False  # decided to roll back (the rollback itself runs on its own thread)


class SafetyMonitor:
    """Watches switches for an error-rate jump, and starts for crash loops. Thread-safe."""

    def __init__(self, state_dir: Path, settings: "SafetyConfig", *, switch_back: SwitchBack,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.record_path = Path(state_dir) / RECORD_NAME
        self.settings = settings
        self.switch_back = switch_back
        self._clock = clock  # monotonic() for the watch window; time() for switches recorded across restarts
        self._lock = threading.Lock()
        self._counts: dict[str, list[int]] = {}  # bundle id → [requests, errors], halved past the cap
        self._watch: SwitchWatch | None = None
        self._condemned: set[str] = set()  # bundles rolled back from here: never rolled back to
        self.rollbacks: list[str] = []  # the reasons, for tests and logs

    @property
    def watch(self) -> SwitchWatch | None:
        """A copy of the current switch watch (None when the last switch is not watched)."""
        with self._lock:
            return replace(self._watch) if self._watch is not None else None

    # -- (a) the error rate after a switch -----------------------------------------------------------

    def observe(self, event: "InferenceEvent") -> None:
        """An engine observer, on every request's thread: a few dictionary and attribute operations."""
        failed = event.error is not None
        counts = self._counts.get(event.bundle_id)
        if counts is None:
            with self._lock:
                if len(self._counts) >= 4:  # only the recent bundles matter
                    self._counts.pop(next(iter(self._counts)))
                counts = self._counts.setdefault(event.bundle_id, [0, 0])
        # Unlocked: a rare lost increment between threads does not matter to a baseline rate.
        counts[0] += 1
        if failed:
            counts[1] += 1
        if counts[0] >= 2 * _BASELINE_CAP:
            counts[0] //= 2
            counts[1] //= 2
        watch = self._watch
        if watch is None or watch.done or event.bundle_id != watch.bundle_id:
            return
        trigger = None
        with self._lock:  # the watch itself counts exactly
            if watch.done:
                return
            if self._clock.monotonic() - watch.started > self.settings.window_s:
                watch.done = True
                log.info("bundle %s passed its first %g s without an error-rate jump (%d/%d failed)",
                         watch.bundle_id[:12], self.settings.window_s, watch.errors, watch.requests)
                return
            watch.requests += 1
            watch.errors += failed
            if watch.requests >= self.settings.min_requests and watch.errors / watch.requests > watch.threshold:
                watch.done = watch.triggered = True
                trigger = watch
        if trigger is not None:
            rate = trigger.errors / trigger.requests
            reason = (f"local rollback: error rate {rate:.0%} ({trigger.errors} of the first {trigger.requests} requests) "
                      f"after switching to {trigger.bundle_id[:12]} exceeds {trigger.threshold:.0%} "
                      f"(previous bundle {trigger.previous_bundle_id[:12]}: {trigger.previous_rate:.1%})")
            # Not on the request's thread: re-verifying the slot and reloading the model take a while.
            threading.Thread(target=self._roll_back, args=(trigger.bundle_id, reason), name="safety-rollback",
                             daemon=True).start()

    def _roll_back(self, bundle_id: str, reason: str) -> None:
        log.warning("%s", reason)
        outcome = self.switch_back(bundle_id, reason)
        if outcome is not None and outcome.switched:
            self.rollbacks.append(reason)
            with self._lock:
                self._condemned.add(bundle_id)
            self._write_record({"bundle_id": outcome.current_bundle, "previous_bundle_id": bundle_id,
                                "switched_at": self._clock.time(), "cause": "safety", "running": True, "restarts": []})

    def after_switch(self, outcome: "InstallOutcome", cause: str) -> None:
        """Call after every install or rollback the agent applies: record a switch; watch one made by an install."""
        if not outcome.switched or outcome.current_bundle is None:
            return
        new, previous = outcome.current_bundle, outcome.previous_bundle
        self._write_record({"bundle_id": new, "previous_bundle_id": previous, "switched_at": self._clock.time(),
                            "cause": cause, "running": True, "restarts": []})
        with self._lock:
            if cause != "install" or previous is None or previous in self._condemned:
                self._watch = None
                return
            requests, errors = self._counts.get(previous, (0, 0))
            previous_rate = errors / requests if requests else 0.0
            threshold = max(self.settings.max_error_rate, self.settings.error_rate_factor * previous_rate)
            self._watch = SwitchWatch(bundle_id=new, previous_bundle_id=previous, threshold=threshold,
                                      previous_rate=previous_rate, started=self._clock.monotonic())

    def watching(self, handler: Callable[..., "InstallOutcome"], cause: str) -> Callable[..., "InstallOutcome"]:
        """Wrap one of the agent's action handlers (install, rollback) so the switches it makes are seen."""
        def watched(*args, **kwargs) -> "InstallOutcome":
            outcome = handler(*args, **kwargs)
            self.after_switch(outcome, cause)
            return outcome
        return watched

    # -- (b) crash loops -----------------------------------------------------------------------------

    def check_at_start(self, active_bundle_id: str | None, previous_bundle_id: str | None, *,
                       active_installed_at: float | None = None) -> str | None:
        """Count this start; the reason to roll back before serving, or None. Marks the process running."""
        now = self._clock.time()
        record = self._read_record()
        settings = self.settings
        if active_bundle_id is None:
            self._write_record({"bundle_id": None, "switched_at": now, "cause": "start", "running": True, "restarts": []})
            return None
        if record is None or record.get("bundle_id") != active_bundle_id:
            # The active bundle changed without a record (a crash right after the switch, or an older agent):
            # take the slot's install time as the switch when it is recent.
            recent = active_installed_at is not None and now - active_installed_at <= settings.crash_loop_window_s
            record = {"bundle_id": active_bundle_id, "previous_bundle_id": previous_bundle_id,
                      "switched_at": active_installed_at if recent else now, "cause": "install" if recent else "start",
                      "running": recent, "restarts": []}
        restarts = [float(t) for t in record.get("restarts") or [] if isinstance(t, (int, float))]
        switched_at = float(record.get("switched_at") or 0.0)
        if record.get("running") and now - switched_at <= settings.crash_loop_window_s:
            restarts.append(now)
        record.update({"running": True, "restarts": restarts})
        self._write_record(record)
        if (settings.crash_loop_restarts > 0 and record.get("cause") == "install" and previous_bundle_id is not None
                and len(restarts) > settings.crash_loop_restarts):
            return (f"local rollback: the agent restarted {len(restarts)} times within {now - switched_at:.0f} s of "
                    f"switching to {active_bundle_id[:12]} (limit {settings.crash_loop_restarts} in "
                    f"{settings.crash_loop_window_s:g} s): crash loop")
        return None

    def after_start_rollback(self, outcome: "InstallOutcome", from_bundle_id: str, reason: str) -> None:
        """Record a rollback made at start (a crash loop) so it is not counted or undone again."""
        if outcome.switched:
            self.rollbacks.append(reason)
            with self._lock:
                self._condemned.add(from_bundle_id)
            self._write_record({"bundle_id": outcome.current_bundle, "previous_bundle_id": from_bundle_id,
                                "switched_at": self._clock.time(), "cause": "safety", "running": True, "restarts": []})

    def mark_clean_stop(self) -> None:
        """The agent stopped on purpose: the next start is not a crash restart."""
        record = self._read_record()
        if record is not None and record.get("running"):
            record["running"] = False
            self._write_record(record)

    # -- the record ----------------------------------------------------------------------------------

    def _read_record(self) -> dict | None:
        try:
            document = json.loads(self.record_path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            log.warning("%s is damaged; starting a fresh one", self.record_path)
            return None
        return document if isinstance(document, dict) else None

    def _write_record(self, document: dict) -> None:
        document = {"schema_version": 1, **document}
        try:
            write_atomic(self.record_path, json.dumps(document, sort_keys=True).encode() + b"\n")
        except OSError as exc:  # the record only guards against crash loops; serving goes on without it
            log.error("cannot write %s: %s", self.record_path, exc.strerror or exc)
