"""Rollouts: create one, see where it stands, pause, resume, abort or roll it back.

A rollout ships one release (a bundle, plus the bundles of the same name and version built for other
profiles) to the enrolled devices that match a label selector and whose hardware profile has a bundle
in the release; a device whose profile matches none is never targeted. Its members and their waves are
fixed when it is created:

    rank(device)  = sha256(rollout_id + device_id), ascending, within the device's hardware profile
    wave(device)  = first wave i whose cumulative count for that profile, ceil(percent_i × size / 100)
                    (at least 1), exceeds the device's rank

so every wave holds every profile present, and the same rollout id always gives the same waves. When
the rollout has relative gates, the highest-ranked members of each profile's last wave form its hold-back
(`holdback_percent` of the profile, see fleet.services.gates.holdback_count): they stay on the old bundle
as the last wave's control and are moved in step len(waves) once the last wave passed.

Every function here commits its own unit of work and writes an `AuditEntry`. None of them publishes
anything: the rollout controller is the only writer of desired states (`fleet/controller.py`), so a
manual rollback moves the rollout to `rolling_back` and the controller's next tick sends the states.

Errors: `NotFound` for an unknown rollout or bundle, `Conflict` for an action the rollout's status does
not allow or targets another active rollout holds, `ConfigError` for bad input.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterable, Mapping, Sequence

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from edgepack.errors import ConfigError, Conflict, NotFound
from fleet.models import Bundle, Device, Rollout, RolloutDecision, RolloutMember, utcnow
from fleet.services import audit
from fleet.services.devices import matches, parse_selector
from fleet.services.pacing import parse_pacing
from fleet.services.gates import (
    DEFAULT_GATES, DEFAULT_HOLDBACK_PERCENT, SKIPPED, WAITING, canonical_profile, has_relative_gates, holdback_count,
    holdback_step, look_times, max_bake_s, parse_gates, rollout_bundles, utc,
)

DEFAULT_WAVES: tuple[float, ...] = (1, 10, 50, 100)
# Statuses in which a rollout still owns its devices (a second rollout may not touch them).
ACTIVE_STATUSES = ("pending", "running", "paused", "rolling_back")
FINISHED_STATUSES = ("succeeded", "rolled_back", "aborted")


@dataclass(frozen=True)
class WavePercent:
    """A wave's cumulative share of the targets, in percent: 0 < percent ≤ 100."""

    percent: float

    def __post_init__(self) -> None:
        value = self.percent
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"wave {value!r}: a wave is a percentage, e.g. 10 or 12.5")
        if not 0 < value <= 100:
            raise ConfigError(f"wave {value:g}%: a wave must be above 0 and at most 100 percent")
        object.__setattr__(self, "percent", int(value) if float(value).is_integer() else float(value))

    def cumulative_count(self, profile_size: int) -> int:
        """How many of a profile's devices are in by this wave: ceil(percent × size), at least 1."""
        exact = Fraction(str(self.percent)) * profile_size / 100  # exact: 0.7 × 10 must give 7, not 8
        return min(profile_size, max(1, math.ceil(exact)))


def parse_waves(waves: Sequence[float] | None) -> tuple[WavePercent, ...]:
    """Cumulative wave percentages: strictly increasing, the last one 100 (default 1, 10, 50, 100)."""
    values = list(DEFAULT_WAVES if not waves else waves)
    parsed = tuple(WavePercent(v) for v in values)
    for before, after in zip(parsed, parsed[1:]):
        if after.percent <= before.percent:
            raise ConfigError(f"waves {', '.join(f'{w.percent:g}' for w in parsed)}: each wave must be larger than the one before (they are cumulative)")
    if parsed[-1].percent != 100:
        raise ConfigError(f"waves {', '.join(f'{w.percent:g}' for w in parsed)}: the last wave must be 100 percent")
    return parsed


def matches_selector(device: Device, selector: Mapping[str, str]) -> bool:
    """Every selector label equals the device's (`fleet.services.devices.matches`); a `profile` key the
    device has no label for matches its hardware profile by name or alias."""
    labels = device.labels or {}
    if "profile" in selector and "profile" not in labels:
        if canonical_profile(device.profile) != canonical_profile(selector["profile"]):
            return False
        selector = {key: value for key, value in selector.items() if key != "profile"}
    return matches(labels, selector)


def rank_key(rollout_id: str, device_id: str) -> str:
    return hashlib.sha256((rollout_id + device_id).encode()).hexdigest()


def assign_waves(rollout_id: str, devices: Iterable[Device], waves: Sequence[WavePercent],
                 holdback_percent: float = 0.0) -> dict[str, int]:
    """Wave index per device id: hash ranking within each hardware profile (see the module docstring);
    the hold-back's members get index len(waves)."""
    by_profile: dict[str, list[str]] = defaultdict(list)
    for device in devices:
        by_profile[canonical_profile(device.profile)].append(device.id)
    assignment: dict[str, int] = {}
    for device_ids in by_profile.values():
        ranked = sorted(device_ids, key=lambda device_id: (rank_key(rollout_id, device_id), device_id))
        counts = [wave.cumulative_count(len(ranked)) for wave in waves]
        new_in_last = counts[-1] - (counts[-2] if len(counts) > 1 else 0)
        held = holdback_count(len(ranked), new_in_last, holdback_percent)
        for rank, device_id in enumerate(ranked):
            if rank >= len(ranked) - held:
                assignment[device_id] = len(waves)
            else:
                assignment[device_id] = next(i for i, count in enumerate(counts) if rank < count)
    return assignment


def _audit(session: Session, actor: str, action: str, target: str | None, **details: Any) -> None:
    audit.record(session, actor, action, target, details)


def _get_rollout(session: Session, rollout_id: str) -> Rollout:
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        raise NotFound(f"no rollout {rollout_id!r}", rollout_id=rollout_id)
    return rollout


def create_rollout(
    session: Session,
    actor: str,
    bundle_id: str,
    selector: Mapping[str, Any] | None = None,
    waves: Sequence[float] | None = None,
    gates: Sequence[Any] | None = None,
    bake_s: float = 30.0,
    min_reports: int = 1,
    install_timeout_s: float = 300.0,
    max_bake_s: float | None = None,
    holdback_percent: float = DEFAULT_HOLDBACK_PERCENT,
    max_per_minute: int | None = None,
    max_concurrent: int | None = None,
    maintenance_windows: Sequence[Any] | None = None,
    late_joiners: str = "current_wave",
) -> dict[str, Any]:
    """Validate, choose the targets and their waves, store the rollout (status `pending`; the controller
    starts its first wave on its next tick). No gates given means `DEFAULT_GATES`; the hold-back exists
    only when some gate is relative."""
    bundle = session.get(Bundle, bundle_id)
    if bundle is None:
        raise NotFound(f"no bundle {bundle_id!r}", bundle_id=bundle_id)
    wave_plan = parse_waves(waves)
    specs = parse_gates(gates or DEFAULT_GATES)
    labels = parse_selector(selector)
    for name, value, minimum in (("bake_s", bake_s, 0.0), ("install_timeout_s", install_timeout_s, 1e-9)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
            raise ConfigError(f"{name} {value!r}: expected a {'non-negative' if minimum == 0 else 'positive'} number of seconds")
    if isinstance(min_reports, bool) or not isinstance(min_reports, int) or min_reports < 0:
        raise ConfigError(f"min_reports {min_reports!r}: expected a whole number ≥ 0")
    if max_bake_s is not None and (isinstance(max_bake_s, bool) or not isinstance(max_bake_s, (int, float))
                                   or not math.isfinite(max_bake_s) or max_bake_s < bake_s):
        raise ConfigError(f"max_bake_s {max_bake_s!r}: expected seconds at least the bake time ({bake_s:g} s)")
    if isinstance(holdback_percent, bool) or not isinstance(holdback_percent, (int, float)) \
            or not math.isfinite(holdback_percent) or not 0 <= holdback_percent < 100:
        raise ConfigError(f"holdback_percent {holdback_percent!r}: expected a percentage from 0 to below 100")

    pacing = parse_pacing(max_per_minute, max_concurrent, maintenance_windows, late_joiners)
    paced = pacing.limits_starts or pacing.late_joiners != "current_wave"

    rollout = Rollout(
        id=str(uuid.uuid4()), pacing=pacing.to_dict() if paced else None, bundle_id=bundle.id, selector=labels, waves=[w.percent for w in wave_plan],
        gates=[s.to_dict() for s in specs], bake_s=float(bake_s), min_reports=min_reports,
        install_timeout_s=float(install_timeout_s), status="pending", current_wave=-1, created_by=actor,
        created_at=utcnow(), max_bake_s=None if max_bake_s is None else float(max_bake_s),
        holdback_percent=float(holdback_percent) if has_relative_gates(specs) else 0.0,
    )
    bundles = rollout_bundles(session, rollout)
    targets = [
        device for device in session.scalars(select(Device).order_by(Device.id))
        if canonical_profile(device.profile) in bundles and matches_selector(device, labels)
    ]
    if not targets:
        raise ConfigError(
            f"no enrolled device matches selector {labels or '{}'} with a profile this release was built for "
            f"({', '.join(sorted(bundles))})", bundle_id=bundle.id)
    busy = session.execute(
        select(RolloutMember.rollout_id, func.count())
        .join(Rollout, Rollout.id == RolloutMember.rollout_id)
        .where(Rollout.status.in_(ACTIVE_STATUSES), RolloutMember.device_id.in_([d.id for d in targets]))
        .group_by(RolloutMember.rollout_id)
    ).all()
    if busy:
        listing = ", ".join(f"{rollout_id} ({count} devices)" for rollout_id, count in busy)
        raise Conflict(f"the targets overlap active rollout(s) {listing}: finish, abort or roll them back first")

    session.add(rollout)
    session.flush()
    assignment = assign_waves(rollout.id, targets, wave_plan, rollout.holdback_percent)
    for device in targets:
        wave = assignment[device.id]
        session.add(RolloutMember(rollout_id=rollout.id, device_id=device.id, wave_index=wave,
                                  cohort="holdback" if wave == len(wave_plan) else "treatment", phase=WAITING,
                                  desired_seq=0))
    per_profile = Counter(canonical_profile(d.profile) for d in targets)
    _audit(session, actor, "rollout.create", rollout.id, bundle_id=bundle.id,
           bundles={profile: b.id for profile, b in sorted(bundles.items())}, selector=labels,
           waves=rollout.waves, gates=[s.text for s in specs], bake_s=rollout.bake_s, max_bake_s=rollout.max_bake_s,
           holdback_percent=rollout.holdback_percent, holdback=sum(1 for w in assignment.values() if w == len(wave_plan)),
           min_reports=min_reports, pacing=rollout.pacing,
           install_timeout_s=rollout.install_timeout_s, targets=len(targets), profiles=dict(sorted(per_profile.items())))
    session.commit()
    return rollout_status(session, rollout.id)


def _iso(value) -> str | None:
    value = utc(value)
    return None if value is None else value.isoformat()


def _summary(session: Session, rollout: Rollout, phase_counts: Mapping[str, int]) -> dict[str, Any]:
    bundle = session.get(Bundle, rollout.bundle_id)
    specs = parse_gates(rollout.gates or DEFAULT_GATES)
    return {
        "id": rollout.id,
        "status": rollout.status,
        "bundle": {"id": bundle.id, "name": bundle.name, "version": bundle.version, "profile": bundle.profile}
        if bundle else {"id": rollout.bundle_id},
        "selector": rollout.selector or {},
        "waves": list(rollout.waves),
        "current_wave": rollout.current_wave,
        "gates": [spec.text for spec in specs],
        "bake_s": rollout.bake_s,
        "max_bake_s": max_bake_s(rollout),
        "looks_at_s": [round(t, 3) for t in look_times(rollout.bake_s, max_bake_s(rollout))],
        "holdback_percent": rollout.holdback_percent,
        "pacing": rollout.pacing,
        "min_reports": rollout.min_reports,
        "install_timeout_s": rollout.install_timeout_s,
        "counts": dict(sorted(phase_counts.items())),
        "members_total": sum(phase_counts.values()),
        "created_by": rollout.created_by,
        "created_at": _iso(rollout.created_at),
        "updated_at": _iso(rollout.updated_at),
        "wave_started_at": _iso(rollout.wave_started_at),
        "finished_at": _iso(rollout.finished_at),
    }


def list_rollouts(session: Session, status: str | None = None) -> list[dict[str, Any]]:
    """Every rollout (newest first) with its counts per member phase; optionally of one status."""
    query = select(Rollout).order_by(Rollout.created_at.desc(), Rollout.id)
    if status:
        query = query.where(Rollout.status == status)
    rollouts = session.scalars(query).all()
    counts: dict[str, Counter] = defaultdict(Counter)
    if rollouts:
        for rollout_id, phase, count in session.execute(
            select(RolloutMember.rollout_id, RolloutMember.phase, func.count())
            .where(RolloutMember.rollout_id.in_([r.id for r in rollouts]))
            .group_by(RolloutMember.rollout_id, RolloutMember.phase)
        ):
            counts[rollout_id][phase] = count
    return [_summary(session, rollout, counts[rollout.id]) for rollout in rollouts]


def rollout_status(session: Session, rollout_id: str) -> dict[str, Any]:
    """A rollout with its waves (percent, members, last decision), members, decisions with evidence, and
    counts per phase."""
    rollout = _get_rollout(session, rollout_id)
    rows = session.execute(
        select(RolloutMember, Device.profile).join(Device, Device.id == RolloutMember.device_id)
        .where(RolloutMember.rollout_id == rollout.id).order_by(RolloutMember.wave_index, RolloutMember.device_id)
    ).all()
    decisions = session.scalars(
        select(RolloutDecision).where(RolloutDecision.rollout_id == rollout.id).order_by(RolloutDecision.id)
    ).all()
    phase_counts = Counter(member.phase for member, _ in rows)
    result = _summary(session, rollout, phase_counts)
    last_decision = {d.wave_index: d.decision for d in decisions}
    result["waves"] = []
    cumulative = 0
    for index, percent in enumerate(rollout.waves):
        in_wave = [member for member, _ in rows if member.wave_index == index]
        cumulative += len(in_wave)
        state = ("done" if index < rollout.current_wave else "current" if index == rollout.current_wave else "waiting")
        result["waves"].append({
            "index": index, "percent": percent, "members": len(in_wave), "cumulative": cumulative, "state": state,
            "counts": dict(sorted(Counter(m.phase for m in in_wave).items())),
            "decision": last_decision.get(index),
        })
    held = [member for member, _ in rows if member.wave_index == holdback_step(rollout)]
    index = holdback_step(rollout)
    result["holdback"] = {
        "index": index, "members": len(held),
        "state": ("waiting" if rollout.current_wave < index else "done" if rollout.status == "succeeded" else "current"),
        "counts": dict(sorted(Counter(m.phase for m in held).items())), "decision": last_decision.get(index),
    }
    result["members"] = [{
        "device_id": member.device_id, "profile": profile, "wave": member.wave_index, "cohort": member.cohort,
        "phase": member.phase, "desired_seq": member.desired_seq, "previous_bundle_id": member.previous_bundle_id,
        "rolled_back": member.rolled_back, "error": member.error,
    } for member, profile in rows]
    result["profiles"] = dict(sorted(Counter(canonical_profile(profile) for _, profile in rows).items()))
    result["decisions"] = [{
        "wave": d.wave_index, "decision": d.decision, "actor": d.actor, "at": _iso(d.at), "evidence": d.evidence,
    } for d in decisions]
    return result


def _transition(session: Session, rollout: Rollout, allowed: Sequence[str], action: str, **values: Any) -> None:
    """Move the rollout on only if its status is still one of `allowed` (the controller may be writing
    too: the conditional UPDATE makes the check and the change one step)."""
    done = session.execute(
        update(Rollout).where(Rollout.id == rollout.id, Rollout.status.in_(allowed))
        .values(updated_at=utcnow(), **values).execution_options(synchronize_session=False)
    ).rowcount
    if done != 1:
        session.rollback()
        session.refresh(rollout)
        raise Conflict(f"cannot {action} rollout {rollout.id}: it is {rollout.status}", rollout_id=rollout.id)
    session.refresh(rollout)


def _skip_waiting(session: Session, rollout: Rollout) -> None:
    session.execute(update(RolloutMember).where(RolloutMember.rollout_id == rollout.id, RolloutMember.phase == WAITING)
                    .values(phase=SKIPPED).execution_options(synchronize_session=False))


def pause(session: Session, actor: str, rollout_id: str) -> dict[str, Any]:
    """Stop advancing waves; states already sent stay sent."""
    rollout = _get_rollout(session, rollout_id)
    _transition(session, rollout, ("pending", "running"), "pause", status="paused")
    _audit(session, actor, "rollout.pause", rollout.id, wave=rollout.current_wave)
    session.commit()
    return rollout_status(session, rollout.id)


def resume(session: Session, actor: str, rollout_id: str) -> dict[str, Any]:
    """Go on from a pause. The current wave's bake and looks start again from now: telemetry from before
    the pause is not judged again (a wave paused as inconclusive gets a fresh, independent sample)."""
    rollout = _get_rollout(session, rollout_id)
    # no start time: the controller restarts the wave on its next tick, by its own clock
    restart = {"wave_started_at": None} if rollout.current_wave >= 0 else {}
    _transition(session, rollout, ("paused",), "resume",
                status="pending" if rollout.current_wave < 0 else "running", **restart)
    _audit(session, actor, "rollout.resume", rollout.id, wave=rollout.current_wave)
    session.commit()
    return rollout_status(session, rollout.id)


def abort(session: Session, actor: str, rollout_id: str) -> dict[str, Any]:
    """Stop the rollout where it is: no further waves, devices keep what they run now (no rollback)."""
    rollout = _get_rollout(session, rollout_id)
    _transition(session, rollout, ("pending", "running", "paused"), "abort", status="aborted", finished_at=utcnow())
    _skip_waiting(session, rollout)
    _audit(session, actor, "rollout.abort", rollout.id, wave=rollout.current_wave)
    session.commit()
    return rollout_status(session, rollout.id)


def manual_rollback(session: Session, actor: str, rollout_id: str) -> dict[str, Any]:
    """Send every device the rollout touched back to its previous bundle.

    Allowed while the rollout runs and after it succeeded or was aborted, as long as no later desired
    state went to its devices since. The rollout becomes `rolling_back`; the controller's next tick stores
    and publishes the rollback states and marks it `rolled_back`.
    """
    rollout = _get_rollout(session, rollout_id)
    moved_on = session.scalars(
        select(RolloutMember.device_id).join(Device, Device.id == RolloutMember.device_id)
        .where(RolloutMember.rollout_id == rollout.id, RolloutMember.desired_seq > 0,
               Device.desired_seq != RolloutMember.desired_seq)
    ).all()
    if moved_on:
        raise Conflict(f"cannot roll back rollout {rollout.id}: {len(moved_on)} of its devices received a newer "
                       f"desired state since (e.g. {moved_on[0]})", rollout_id=rollout.id)
    _transition(session, rollout, ("pending", "running", "paused", "succeeded", "aborted"), "roll back",
                status="rolling_back")
    session.add(RolloutDecision(rollout_id=rollout.id, wave_index=rollout.current_wave, decision="rollback",
                                actor=actor, evidence={"reason": f"manual rollback by {actor}",
                                                       "wave": rollout.current_wave}))
    _audit(session, actor, "rollout.rollback", rollout.id, wave=rollout.current_wave, manual=True)
    session.commit()
    return rollout_status(session, rollout.id)


__all__ = [
    "ACTIVE_STATUSES", "DEFAULT_WAVES", "FINISHED_STATUSES", "WavePercent", "abort", "assign_waves",
    "create_rollout", "list_rollouts", "manual_rollback", "matches_selector", "parse_waves",
    "pause", "rank_key", "resume", "rollout_status",
]
