"""The rollout controller: moves every running rollout one step at a time, from the database alone.

    tick():  for each rollout that is pending, running or rolling_back
               pending                → start wave 0
               running                → mark install timeouts, evaluate_wave():
                                          promote  → start the next wave; after the last, the hold-back
                                                     step (when there is a hold-back), then `succeeded`
                                          hold     → record it (once per reason), wait
                                          pause    → inconclusive past the maximum bake: `paused`, for a person
                                          rollback → store rollback states for every touched device, `rolled_back`
               rolling_back (manual)  → store rollback states, `rolled_back`
             then publish every stored, unacknowledged desired state

When it ticks. `run()` makes a full pass every `interval_s`, and a quick one as soon as a wave could be
decided: when the bake of a running wave ends, and when a device ends an install (`notify()`, which the MQTT
bridge calls for every stored `active`, `failed` or `rolled_back`; a burst of them is one pass, at most every
`settle_s`). A quick pass does everything a full one does but evaluate a wave that is still baking or
still has members installing (the gates could only hold it). So a wave whose devices finish early is judged
the moment its bake ends, not up to `interval_s` later, and a wave still installing at the end of its bake
is judged when its last device answers.

Restart safety. A desired state is first stored (`Device.desired`, `Device.desired_seq`, the member's
`desired_seq` and phase `assigned`) and committed, and only then published; the member becomes `pending`
once the broker acknowledged it. A controller that crashed in between finds the member still `assigned`
and publishes the stored payload again: the same seq, the same bytes, retained. Every transition is a
conditional UPDATE on (status, current_wave), so two controllers (or a controller and an operator's
pause) cannot both start the same wave: no device ever gets two different desired states for one wave.

The publisher is a seam: anything with `publish_desired(device_id, DesiredState) -> bool` (True once
the broker has it), and optionally `publish_desired_many([(device_id, state)]) -> [bool]`, which puts them
all on the wire before it waits for the acknowledgements (the MQTT bridge, the real one, does: a wave of
8,000 states no longer waits one round trip per device).

Signing. With a `signer` (fleet.director.FleetDirector, which `fleet serve` always passes) every desired
state is signed when it is stored: addressed to its device, issued now, valid `signer.validity_s`. A
retained state must outlive a device that is offline for a while, so `refresh_expiring()` (every
`refresh_interval_s`) re-signs a state its device has not finished before half its validity is gone —
the same seq with a new issued_at/expires_at — and publishes it again.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from typing import Any, Callable, Protocol

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from edgepack.protocol import BundleRef, DesiredState
from fleet.models import Bundle, Device, Rollout, RolloutDecision, RolloutMember
from fleet.services import audit
from fleet.services.bundles import download_path
from fleet.services.gates import (
    ASSIGNED, IN_PROGRESS_PHASES, PENDING, SKIPPED, TIMED_OUT, WAITING, WaveVerdict, canonical_profile,
    evaluate_gates, holdback_step, rollout_bundles, step_percent, utc,
)
from fleet.services.pacing import Pacing, pacing_of

log = logging.getLogger(__name__)

ACTOR = "controller"
JOIN_SCAN_S = 5.0  # how often a running rollout looks for devices that joined its selector


class DesiredStatePublisher(Protocol):
    def publish_desired(self, device_id: str, desired: DesiredState) -> bool:
        """Publish retained; True once the broker acknowledged it."""


class DesiredStateSigner(Protocol):
    validity_s: float
    rotating: bool  # a next key is announced: finished states are re-signed too, to carry it

    def sign(self, desired: DesiredState, *, device_id: str, now: float) -> DesiredState:
        """`desired` addressed to `device_id`, issued `now`, and signed."""

    def needs_refresh(self, desired: DesiredState, now: float) -> bool:
        """True when a stored state should be signed again before it expires."""


def count_metric(name: str, **labels: str) -> None:
    """Increment `fleet.metrics.<name>` (with labels, when the counter has them) if that module has it."""
    try:
        from fleet import metrics  # the API side's registry; imported when first counted
    except ImportError:
        return
    counter = getattr(metrics, name, None)
    if counter is None:
        return
    try:
        (counter.labels(**labels) if labels and getattr(counter, "_labelnames", ()) else counter).inc()
    except Exception:  # metrics are best effort: never let a counter break a tick or a message
        log.debug("fleet.metrics.%s could not be incremented", name, exc_info=True)


def publish_all(publisher: Any, items: list[tuple[str, DesiredState]]) -> list[bool]:
    """Publish every (device_id, state); True for each the broker acknowledged. Pipelined when the
    publisher can (`publish_desired_many`), one by one otherwise; a failure counts as not published."""
    many = getattr(publisher, "publish_desired_many", None)
    if many is not None:
        try:
            return list(many(items))
        except Exception as exc:  # a broker outage: every member stays `assigned` and goes out next tick
            log.warning("publishing %d desired states failed: %s", len(items), exc)
            return [False] * len(items)
    results = []
    for device_id, desired in items:
        try:
            results.append(bool(publisher.publish_desired(device_id, desired)))
        except Exception as exc:
            log.warning("device %s: publishing desired seq %s failed: %s", device_id, desired.seq, exc)
            results.append(False)
    return results


def observe_metric(name: str, value: float) -> None:
    """Observe `value` in the histogram `fleet.metrics.<name>`, best effort like count_metric."""
    try:
        from fleet import metrics
        histogram = getattr(metrics, name, None)
        if histogram is not None:
            histogram.observe(value)
    except Exception:
        log.debug("fleet.metrics.%s could not be observed", name, exc_info=True)


def default_bundle_url(bundle: Bundle) -> str:
    """The API's download route, relative: the agent resolves it against its fleet URL."""
    return download_path(bundle.id)


def bundle_ref(bundle: Bundle, url: str) -> BundleRef:
    return BundleRef(id=bundle.id, name=bundle.name, version=bundle.version, profile=bundle.profile,
                     sha256=bundle.id, size=bundle.size_bytes, url=url)


class RolloutController:
    """Drives rollouts from the database; `tick()` is one idempotent step, `run()` loops it."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        publisher: DesiredStatePublisher,
        clock: Callable[[], float] = time.time,
        bundle_url: Callable[[Bundle], str] = default_bundle_url,
        signer: DesiredStateSigner | None = None,
        refresh_interval_s: float = 60.0,
        leadership: Any = None,
        settle_s: float = 0.1,
    ) -> None:
        # fleet.leader.Leadership: with several replicas on one database only the one holding it ticks
        self.leadership = leadership
        self._join_scans: dict[str, float] = {}  # rollout id -> when it last looked for late joiners
        self.signer = signer
        self.refresh_interval_s = refresh_interval_s
        self._last_refresh: float | None = None
        self._refresh_unpublished: set[str] = set()  # re-signed and stored, but the broker did not take it
        self.session_factory = session_factory
        self.publisher = publisher
        self.clock = clock
        self.bundle_url = bundle_url
        self.settle_s = settle_s
        self._notified = threading.Event()  # a device ended an install: a wave may be decidable
        self._bake_ends: dict[str, float] = {}  # running rollout id -> when its current wave's bake ends (clock)

    def notify(self) -> None:
        """A device ended an install (or the server is stopping): pass over the rollouts soon."""
        self._notified.set()

    # ------------------------------------------------------------ the loop

    def run(self, stop_event: threading.Event, interval_s: float = 1.0) -> None:
        """A full tick() every `interval_s`, quick ones in between when a wave may be decidable (see the
        module docstring), until `stop_event` is set (the body of the controller thread)."""
        next_full = 0.0
        while not stop_event.is_set():
            full = time.monotonic() >= next_full
            if full:
                next_full = time.monotonic() + interval_s
            try:
                if self.leadership is None or self.leadership.is_leader():
                    self.tick(quick=not full)
            except Exception:  # the loop must outlive a bad tick (a database hiccup); the next one retries
                log.exception("rollout controller tick failed")
            self._wait(stop_event, next_full)

    def _wait(self, stop_event: threading.Event, next_full: float) -> None:
        """Until the next full tick, the next end of a bake, or a notify() (then `settle_s` more, so a burst
        of answers is one tick), whichever comes first."""
        timeout = next_full - time.monotonic()
        now = self.clock()
        upcoming = [end - now for end in self._bake_ends.values() if end > now]
        if upcoming:
            timeout = min(timeout, min(upcoming) + 0.01)
        if self._notified.wait(max(0.0, timeout)):
            self._notified.clear()
            stop_event.wait(self.settle_s)

    def start_thread(self, stop_event: threading.Event, interval_s: float = 1.0) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(stop_event, interval_s), name="rollout-controller", daemon=True)
        thread.start()
        return thread

    def tick(self, quick: bool = False) -> dict[str, Any]:
        """One step for every active rollout, then publish what is stored but unacknowledged. `quick`: judge
        only the waves that could be decided now (their bake is over and no member is still installing).

        Returns what happened: {"decisions": [(rollout_id, wave, decision)], "published": n, "unpublished": n}.
        """
        now = self.clock()
        decisions: list[tuple[str, int, str]] = []
        with self.session_factory() as session:
            rollout_ids = session.scalars(
                select(Rollout.id).where(Rollout.status.in_(("pending", "running", "rolling_back"))).order_by(Rollout.created_at)
            ).all()
        for gone in set(self._bake_ends) - set(rollout_ids):
            del self._bake_ends[gone]
        for rollout_id in rollout_ids:
            try:
                with self.session_factory() as session:
                    decision = self.step(session, rollout_id, now, quick=quick)
                    if decision:
                        decisions.append(decision)
            except Exception:
                log.exception("rollout %s: step failed; retrying next tick", rollout_id)
        published, unpublished = self.publish_assigned()
        refreshed = 0
        if self.signer is not None and (self._last_refresh is None or now - self._last_refresh >= self.refresh_interval_s):
            self._last_refresh = now
            refreshed = self.refresh_expiring(now)
        return {"decisions": decisions, "published": published, "unpublished": unpublished, "refreshed": refreshed}

    def step(self, session: Session, rollout_id: str, now: float, quick: bool = False) -> tuple[str, int, str] | None:
        """Advance one rollout; returns (rollout_id, wave, decision) when a decision was taken. `quick`: leave
        a wave unjudged while it bakes or has members installing."""
        rollout = session.get(Rollout, rollout_id)
        if rollout is None:
            return None
        if rollout.status == "rolling_back":
            self._finish_manual_rollback(session, rollout, now)
            return None
        if rollout.status not in ("pending", "running"):
            return None
        if rollout.current_wave < 0:
            if self._claim(session, rollout, ("pending", "running"), -1, now, current_wave=0, status="running",
                           wave_started_at=utc(now)):
                self._assign_wave(session, rollout, 0, now)
                session.commit()
            return None
        if rollout.wave_started_at is None:  # resumed: the wave bakes and is judged again from now
            if self._claim(session, rollout, ("running",), rollout.current_wave, now, wave_started_at=utc(now)):
                session.commit()
            return None
        self._mark_timeouts(session, rollout, now)
        self._take_in_late_joiners(session, rollout, now)
        held = self._start_paced(session, rollout, now)
        if held is not None:  # members of this wave still wait for their start: it is not judged yet
            return (rollout.id, rollout.current_wave, "hold") if self._hold(session, rollout, held, now) else None
        bake_end = utc(rollout.wave_started_at).timestamp() + float(rollout.bake_s or 0.0)
        self._bake_ends[rollout.id] = bake_end
        if quick and (now < bake_end or self._installing(session, rollout)):
            return None
        verdict = self.evaluate_wave(session, rollout, now)
        wave = rollout.current_wave
        if verdict.decision == "promote":
            return (rollout.id, wave, "promote") if self._promote(session, rollout, verdict, now) else None
        if verdict.decision == "rollback":
            return (rollout.id, wave, "rollback") if self._roll_back(session, rollout, verdict, now) else None
        if verdict.decision == "pause":
            return (rollout.id, wave, "pause") if self._pause(session, rollout, verdict, now) else None
        return (rollout.id, wave, "hold") if self._hold(session, rollout, verdict, now) else None

    @staticmethod
    def _installing(session: Session, rollout: Rollout) -> bool:
        """Whether a member of the current wave has not ended its install yet (one query, stopping at the first)."""
        return session.scalar(select(RolloutMember.id).where(
            RolloutMember.rollout_id == rollout.id, RolloutMember.wave_index == rollout.current_wave,
            RolloutMember.phase.in_(IN_PROGRESS_PHASES)).limit(1)) is not None

    def evaluate_wave(self, session: Session, rollout: Rollout, now: float | None = None) -> WaveVerdict:
        """The gates' verdict on the rollout's current wave (its CPU and wall time go to /metrics)."""
        cpu, wall = time.thread_time(), time.perf_counter()
        verdict = evaluate_gates(session, rollout, rollout.current_wave, self.clock() if now is None else now)
        observe_metric("WAVE_EVALUATION_CPU_SECONDS", time.thread_time() - cpu)
        observe_metric("WAVE_EVALUATION_SECONDS", time.perf_counter() - wall)
        return verdict

    # ------------------------------------------------------------ transitions

    def _claim(self, session: Session, rollout: Rollout, statuses: tuple[str, ...], wave: int, now: float,
               **values: Any) -> bool:
        """Apply `values` only if the rollout is still in `statuses` at `wave`; False (and nothing changed)
        when someone else moved it first."""
        changed = session.execute(
            update(Rollout)
            .where(Rollout.id == rollout.id, Rollout.status.in_(statuses), Rollout.current_wave == wave)
            .values(updated_at=utc(now), **values)
            .execution_options(synchronize_session=False)
        ).rowcount
        if changed != 1:
            session.rollback()
            return False
        session.refresh(rollout)
        return True

    def _decide(self, session: Session, rollout: Rollout, wave: int, verdict: WaveVerdict, now: float) -> None:
        session.add(RolloutDecision(rollout_id=rollout.id, wave_index=wave, decision=verdict.decision,
                                    evidence=verdict.evidence, actor=ACTOR, at=utc(now)))
        audit.record(session, ACTOR, f"rollout.{verdict.decision}", rollout.id,
                     {"wave": wave, "percent": step_percent(rollout, wave), "reason": verdict.reason,
                      "status": rollout.status})
        count_metric("ROLLOUT_DECISIONS", decision=verdict.decision)

    def _promote(self, session: Session, rollout: Rollout, verdict: WaveVerdict, now: float) -> bool:
        wave = rollout.current_wave
        final = holdback_step(rollout)
        if wave == final - 1 and not self._has_holdback(session, rollout):
            final -= 1
        last = wave >= final
        values = ({"status": "succeeded", "finished_at": utc(now)} if last
                  else {"current_wave": wave + 1, "wave_started_at": utc(now)})
        if not self._claim(session, rollout, ("running",), wave, now, **values):
            return False
        self._decide(session, rollout, wave, verdict, now)
        if not last:
            self._assign_wave(session, rollout, wave + 1, now)
        session.commit()
        log.info("rollout %s: wave %d promoted%s", rollout.id, wave, " — succeeded" if last else "")
        return True

    @staticmethod
    def _has_holdback(session: Session, rollout: Rollout) -> bool:
        return session.scalar(
            select(RolloutMember.id).where(RolloutMember.rollout_id == rollout.id,
                                           RolloutMember.wave_index == holdback_step(rollout)).limit(1)
        ) is not None

    def _pause(self, session: Session, rollout: Rollout, verdict: WaveVerdict, now: float) -> bool:
        """Inconclusive past the maximum bake: stop here for a person (resume re-bakes the wave, rollback
        or abort end it). Never a promotion by default."""
        wave = rollout.current_wave
        if not self._claim(session, rollout, ("running",), wave, now, status="paused"):
            return False
        self._decide(session, rollout, wave, verdict, now)
        session.commit()
        log.warning("rollout %s: wave %d paused, inconclusive: %s", rollout.id, wave, verdict.reason)
        return True

    def _roll_back(self, session: Session, rollout: Rollout, verdict: WaveVerdict, now: float) -> bool:
        wave = rollout.current_wave
        if not self._claim(session, rollout, ("running",), wave, now, status="rolled_back", finished_at=utc(now)):
            return False
        self._decide(session, rollout, wave, verdict, now)
        touched = self._assign_rollbacks(session, rollout, now)
        session.commit()
        log.warning("rollout %s: wave %d rolled back (%s); %d devices sent back", rollout.id, wave, verdict.reason, touched)
        return True

    def _finish_manual_rollback(self, session: Session, rollout: Rollout, now: float) -> None:
        if not self._claim(session, rollout, ("rolling_back",), rollout.current_wave, now, status="rolled_back",
                           finished_at=utc(now)):
            return
        touched = self._assign_rollbacks(session, rollout, now)
        audit.record(session, ACTOR, "rollout.rolled_back", rollout.id,
                     {"wave": rollout.current_wave, "devices": touched, "manual": True})
        session.commit()

    def _hold(self, session: Session, rollout: Rollout, verdict: WaveVerdict, now: float) -> bool:
        """Record a hold once per wave and reason (a hold repeats every tick; the log should not)."""
        last = session.scalars(
            select(RolloutDecision).where(RolloutDecision.rollout_id == rollout.id,
                                          RolloutDecision.wave_index == rollout.current_wave)
            .order_by(RolloutDecision.id.desc()).limit(1)
        ).first()
        if last is not None and last.decision == "hold" and (last.evidence or {}).get("reason") == verdict.reason:
            return False
        if not self._claim(session, rollout, ("running",), rollout.current_wave, now):
            return False
        self._decide(session, rollout, rollout.current_wave, verdict, now)
        session.commit()
        return True

    # ------------------------------------------------------------ desired states

    def _store_desired(self, device: Device, member: RolloutMember, action: str, ref: BundleRef | None, now: float) -> None:
        """Store the next desired state for a device; publish_assigned() sends it."""
        seq = max(device.desired_seq or 0, device.acked_seq or 0) + 1
        desired = DesiredState(rollout_id=member.rollout_id, seq=seq, action=action, bundle=ref, issued_at=now)
        if self.signer is not None:
            desired = self.signer.sign(desired, device_id=device.id, now=now)
        device.desired_seq = seq
        device.desired = desired.model_dump(mode="json")
        member.desired_seq = seq
        member.assigned_at = utc(now)
        member.phase = ASSIGNED
        if action == "install":
            member.error = None  # a rollback keeps the error that explains it

    def _start_budget(self, session: Session, rollout: Rollout, pacing: Pacing, now: float) -> int | None:
        """How many more devices the rollout's pacing lets start now (None: no limit)."""
        budget: int | None = None
        live = (RolloutMember.rollout_id == rollout.id, RolloutMember.rolled_back.is_(False))
        if pacing.max_per_minute:
            recent = session.scalar(select(func.count()).select_from(RolloutMember).where(
                *live, RolloutMember.desired_seq > 0, RolloutMember.assigned_at > utc(now) - dt.timedelta(seconds=60)))
            budget = max(0, pacing.max_per_minute - (recent or 0))
        if pacing.max_concurrent:
            busy = session.scalar(select(func.count()).select_from(RolloutMember).where(
                *live, RolloutMember.desired_seq > 0, RolloutMember.phase.in_(IN_PROGRESS_PHASES)))
            room = max(0, pacing.max_concurrent - (busy or 0))
            budget = room if budget is None else min(budget, room)
        return budget

    def _assign_wave(self, session: Session, rollout: Rollout, wave: int, now: float, *, first: bool = True) -> int:
        """Start the wave's waiting members, as many as the rollout's pacing allows now (all without one);
        the controller starts the rest on later ticks (`_start_paced`)."""
        bundles = rollout_bundles(session, rollout)
        rows = session.execute(
            select(RolloutMember, Device).join(Device, Device.id == RolloutMember.device_id)
            .where(RolloutMember.rollout_id == rollout.id, RolloutMember.wave_index == wave,
                   RolloutMember.phase == WAITING)
            .order_by(RolloutMember.id)
        ).all()
        pacing = pacing_of(rollout.pacing)
        if pacing.limits_starts:
            at = utc(now)
            rows = [(member, device) for member, device in rows if pacing.may_start(device.labels or {}, at)]
            budget = self._start_budget(session, rollout, pacing, now)
            if budget is not None:
                rows = rows[:budget]
        if not first and not rows:
            return 0
        refs: dict[str, BundleRef] = {}
        for member, device in rows:
            bundle = bundles[canonical_profile(device.profile)]  # targets were chosen by these bundles
            if bundle.id not in refs:
                refs[bundle.id] = bundle_ref(bundle, self.bundle_url(bundle))
            member.previous_bundle_id = device.current_bundle_id
            self._store_desired(device, member, "install", refs[bundle.id], now)
        if not first:
            log.info("rollout %s: %d more devices of wave %d started", rollout.id, len(rows), wave)
            return len(rows)
        audit.record(session, ACTOR, "rollout.wave_started", rollout.id,
                     {"wave": wave, "percent": step_percent(rollout, wave), "devices": len(rows),
                      **({"holdback": True} if wave == holdback_step(rollout) else {})})
        log.info("rollout %s: %s started on %d devices", rollout.id,
                 "the hold-back step" if wave == holdback_step(rollout) else f"wave {wave} ({rollout.waves[wave]}%)", len(rows))
        return len(rows)

    def _start_paced(self, session: Session, rollout: Rollout, now: float) -> WaveVerdict | None:
        """Start more of the current wave's waiting members (pacing, maintenance windows, late joiners); a
        hold verdict while some still wait, None once every member of the wave was started. The wave's bake
        counts from its last start."""
        wave = rollout.current_wave
        waiting = session.scalar(select(func.count()).select_from(RolloutMember).where(
            RolloutMember.rollout_id == rollout.id, RolloutMember.wave_index == wave, RolloutMember.phase == WAITING))
        if not waiting:
            return None
        started = self._assign_wave(session, rollout, wave, now, first=False)
        if started:
            if not self._claim(session, rollout, ("running",), wave, now, wave_started_at=utc(now)):
                return None
            session.commit()
        still = waiting - started
        if not still:
            return None
        pacing = pacing_of(rollout.pacing)
        budget = self._start_budget(session, rollout, pacing, now) if pacing.limits_starts else None
        reason = ("paced: waiting for the start budget (max_per_minute / max_concurrent)" if budget == 0
                  else "outside the maintenance window: waiting devices start when their window opens")
        return WaveVerdict("hold", {"reason": reason, "waiting": still, "pacing": pacing.to_dict()})

    def _take_in_late_joiners(self, session: Session, rollout: Rollout, now: float) -> int:
        """Devices that enrolled, or started matching the selector, after the rollout was created become
        members (pacing.late_joiners): of the wave in progress, or of the last wave. At most every
        JOIN_SCAN_S per rollout, and never a device another active rollout holds."""
        pacing = pacing_of(rollout.pacing)
        if pacing.late_joiners == "none":
            return 0
        last = self._join_scans.get(rollout.id)
        if last is not None and now - last < JOIN_SCAN_S:
            return 0
        self._join_scans[rollout.id] = now
        from fleet.services.rollouts import matches_selector

        bundles = rollout_bundles(session, rollout)
        members = select(RolloutMember.device_id).join(Rollout, Rollout.id == RolloutMember.rollout_id).where(
            (RolloutMember.rollout_id == rollout.id) | Rollout.status.in_(("pending", "running", "paused", "rolling_back")))
        candidates = session.scalars(select(Device).where(Device.revoked_at.is_(None), Device.id.not_in(members))).all()
        joiners = [d for d in candidates if canonical_profile(d.profile) in bundles and matches_selector(d, rollout.selector or {})]
        if not joiners:
            return 0
        wave = len(rollout.waves) - 1 if pacing.late_joiners == "last_wave" else rollout.current_wave
        for device in joiners:
            session.add(RolloutMember(rollout_id=rollout.id, device_id=device.id, wave_index=wave, cohort="treatment",
                                      phase=WAITING, desired_seq=0))
        audit.record(session, ACTOR, "rollout.joined", rollout.id, {"wave": wave, "devices": [d.id for d in joiners][:100],
                                                                    "count": len(joiners)})
        session.commit()
        log.info("rollout %s: %d late joiner(s) added to wave %d", rollout.id, len(joiners), wave)
        return len(joiners)

    def _assign_rollbacks(self, session: Session, rollout: Rollout, now: float) -> int:
        """Every device the rollout sent something goes back to the bundle it ran before (bundle None when
        it ran none, or one the fleet does not store); members not reached yet are skipped."""
        rows = session.execute(
            select(RolloutMember, Device).join(Device, Device.id == RolloutMember.device_id)
            .where(RolloutMember.rollout_id == rollout.id, RolloutMember.desired_seq > 0,
                   RolloutMember.rolled_back.is_(False))
            .order_by(RolloutMember.id)
        ).all()
        for member, device in rows:
            previous = session.get(Bundle, member.previous_bundle_id) if member.previous_bundle_id else None
            ref = bundle_ref(previous, self.bundle_url(previous)) if previous else None
            member.rolled_back = True
            self._store_desired(device, member, "rollback", ref, now)
        session.execute(update(RolloutMember).where(RolloutMember.rollout_id == rollout.id, RolloutMember.phase == WAITING)
                        .values(phase=SKIPPED).execution_options(synchronize_session=False))
        return len(rows)

    def _mark_timeouts(self, session: Session, rollout: Rollout, now: float) -> int:
        deadline = utc(now) - dt.timedelta(seconds=rollout.install_timeout_s)
        late = session.scalars(
            select(RolloutMember).where(
                RolloutMember.rollout_id == rollout.id, RolloutMember.wave_index <= rollout.current_wave,
                RolloutMember.phase.in_(IN_PROGRESS_PHASES), RolloutMember.rolled_back.is_(False),
                RolloutMember.assigned_at < deadline)
        ).all()
        for member in late:
            member.phase = TIMED_OUT
            member.error = f"no final install status within {rollout.install_timeout_s:g} s"
        if late:
            session.commit()
            log.warning("rollout %s: %d devices timed out installing", rollout.id, len(late))
        return len(late)

    def publish_assigned(self) -> tuple[int, int]:
        """Publish every stored desired state the broker has not acknowledged yet: (published, not published).

        What goes out is exactly `Device.desired` as stored, so a repeat after a crash or a broker outage
        is the same message, never a new state for the same wave.
        """
        with self.session_factory() as session:
            rows = session.execute(
                select(RolloutMember.id, RolloutMember.desired_seq, Device.id, Device.desired)
                .join(Device, Device.id == RolloutMember.device_id)
                .where(RolloutMember.phase == ASSIGNED).order_by(RolloutMember.id)
            ).all()
        published, unpublished = [], 0
        outgoing: list[tuple[int, int, str, DesiredState]] = []
        for member_id, seq, device_id, stored in rows:
            if not stored or stored.get("seq") != seq:
                # The device got a newer desired state elsewhere; this one must never go out again.
                log.warning("device %s: stored desired seq %s supersedes member seq %s; not publishing",
                            device_id, (stored or {}).get("seq"), seq)
                published.append((member_id, seq, SKIPPED))
                continue
            outgoing.append((member_id, seq, device_id, DesiredState.model_validate(stored)))
        # a broker outage: the members not acknowledged stay `assigned` and go out next tick
        results = publish_all(self.publisher, [(device_id, desired) for _, _, device_id, desired in outgoing])
        for (member_id, seq, _, _), ok in zip(outgoing, results):
            if ok:
                published.append((member_id, seq, PENDING))
            else:
                unpublished += 1
        if published:
            with self.session_factory() as session:
                for member_id, seq, phase in published:
                    # Only if the device has not answered in the meantime (its phase then says more).
                    session.execute(
                        update(RolloutMember)
                        .where(RolloutMember.id == member_id, RolloutMember.phase == ASSIGNED,
                               RolloutMember.desired_seq == seq)
                        .values(phase=phase).execution_options(synchronize_session=False))
                session.commit()
        return sum(1 for *_, phase in published if phase == PENDING), unpublished

    def refresh_expiring(self, now: float | None = None) -> int:
        """Re-sign and publish again the stored desired state of every device that has not finished it and
        whose signature is past half its validity (or by another key); returns how many went out.

        Finished states are left alone (the device's journal keeps their seq, so it never needs them again),
        except during a key rotation (`signer.rotating`), when every state carries the next key to its device."""
        if self.signer is None:
            return 0
        now = self.clock() if now is None else now
        due: list[tuple[str, DesiredState]] = []
        with self.session_factory() as session:
            rows = session.execute(
                select(Device.id, Device.desired, Device.desired_seq, Device.acked_seq, Device.phase)
                .where(Device.desired.is_not(None), Device.desired_seq > 0)
            ).all()
            for device_id, stored, desired_seq, acked_seq, phase in rows:
                if not stored:
                    continue  # a JSON null passes IS NOT NULL
                unfinished = (acked_seq or 0) < desired_seq or phase in IN_PROGRESS_PHASES
                try:
                    current = DesiredState.model_validate(stored)
                except ValueError:
                    log.warning("device %s: stored desired state is not valid; not re-signing it", device_id)
                    continue
                if device_id in self._refresh_unpublished:
                    due.append((device_id, current))
                    continue
                # During a key rotation finished states are re-signed too: that is how every device learns
                # the next key (the agent reads `next_key` even from a state at or below its seq floor).
                rotating = self.signer.rotating
                if (not unfinished and not rotating) or current.seq != desired_seq \
                        or not self.signer.needs_refresh(current, now):
                    continue
                fresh = self.signer.sign(current, device_id=device_id, now=now)
                # Only over the state it re-signs: a newer one stored meanwhile must not be replaced.
                changed = session.execute(
                    update(Device).where(Device.id == device_id, Device.desired_seq == desired_seq)
                    .values(desired=fresh.model_dump(mode="json")).execution_options(synchronize_session=False)
                ).rowcount
                if changed == 1:
                    due.append((device_id, fresh))
            session.commit()
        sent = 0
        for (device_id, desired), ok in zip(due, publish_all(self.publisher, due)):  # failures: next refresh
            if ok:
                self._refresh_unpublished.discard(device_id)
                sent += 1
            else:
                self._refresh_unpublished.add(device_id)
        if sent:
            log.info("re-signed and re-published %d desired states before they expire", sent)
        return sent


__all__ = ["DesiredStatePublisher", "DesiredStateSigner", "RolloutController", "bundle_ref", "count_metric", "default_bundle_url"]
