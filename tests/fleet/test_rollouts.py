"""Rollouts end to end below HTTP: membership, the controller's waves with a fake clock, rollback,
restarts, and operator actions — real SQLite, real services, a recording publisher."""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, defaultdict

import pytest
from sqlalchemy import select

from edgepack.errors import ConfigError, Conflict, NotFound
from edgepack.protocol import DeviceStatus
from fleet.controller import RolloutController
from fleet.models import AuditEntry, Device, Rollout, RolloutDecision, RolloutMember
from fleet.services import rollouts
from fleet.services.rollouts import WavePercent, assign_waves, create_rollout, parse_waves, rollout_status
from fleet.services.status import apply_status
from tests.fleet.rollout_helpers import (
    FakeClock, RecordingPublisher, SimulatedDevices, add_bundle, add_device, devices_by_id, session_factory_at,
)

PROFILES = {"rpi5": 7, "x86-avx2": 23, "jetson-orin-nano": 3}


@pytest.fixture
def fleet_db(tmp_path):
    """Release v1 and v2 built for three profiles; devices of each on v1, plus two that must never be
    targeted (a profile the release lacks, and a label outside the selector), and one on no bundle yet."""
    session_factory = session_factory_at(tmp_path)
    with session_factory() as session:
        v1 = {p: add_bundle(session, "digits", "1.0.0", p).id for p in PROFILES}
        v2 = {p: add_bundle(session, "digits", "2.0.0", p).id for p in PROFILES}
        for profile, count in PROFILES.items():
            for i in range(count):
                add_device(session, f"{profile}-{i:02d}", profile, {"site": "lab"}, current_bundle=v1[profile])
        add_device(session, "coral-00", "coral-devboard", {"site": "lab"})
        add_device(session, "x86-elsewhere", "x86-avx2", {"site": "field"}, current_bundle=v1["x86-avx2"])
        add_device(session, "rpi5-fresh", "raspberry-pi-5", {"site": "lab"})  # an alias, and nothing installed
    return session_factory, v1, v2


def _create(session_factory, bundle_id, **overrides):
    values = dict(selector={"site": "lab"}, waves=[10, 50, 100], gates=["install_failure_ratio<=0.1", "active_ratio>=1.0"],
                  bake_s=60.0, min_reports=1, install_timeout_s=300.0)
    values.update(overrides)
    with session_factory() as session:
        return create_rollout(session, "alice", bundle_id, **values)


def _drive(controller, devices, clock, until, max_ticks=200):
    """Tick, let the devices answer, let time pass, until the rollout's status is one of `until`."""
    for _ in range(max_ticks):
        controller.tick()
        devices.answer()
        clock.advance(10)
        with controller.session_factory() as session:
            statuses = {r.status for r in session.scalars(select(Rollout))}
        if statuses <= set(until):
            return
    raise AssertionError(f"rollouts still {statuses} after {max_ticks} ticks")


# ------------------------------------------------------------------ membership


def test_wave_percent_checks_itself_and_counts_exactly():
    assert WavePercent(70).cumulative_count(10) == 7  # 0.7 × 10 in floating point is 7.000000000000001
    assert WavePercent(1).cumulative_count(3) == 1
    assert WavePercent(12.5).cumulative_count(9) == 2
    for bad in (0, -5, 100.5, float("nan"), "10"):
        with pytest.raises(ConfigError):
            WavePercent(bad)


@pytest.mark.parametrize("waves, fragment", [
    ([10, 10, 100], "larger than the one before"),
    ([50, 10, 100], "larger than the one before"),
    ([10, 50], "last wave must be 100"),
    ([0, 100], "above 0"),
])
def test_waves_must_increase_to_100(waves, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_waves(waves)


def test_default_waves():
    assert [w.percent for w in parse_waves(None)] == [1, 10, 50, 100]


def test_membership_is_deterministic_and_every_wave_holds_every_profile(fleet_db):
    session_factory, v1, v2 = fleet_db
    with session_factory() as session:
        devices = [d for d in session.scalars(select(Device)) if d.profile in PROFILES and d.labels["site"] == "lab"]
    waves = parse_waves([1, 10, 50, 100])

    first = assign_waves("rollout-a", devices, waves)
    again = assign_waves("rollout-a", list(reversed(devices)), waves)
    other = assign_waves("rollout-b", devices, waves)

    assert first == again
    assert first != other
    for profile, size in PROFILES.items():
        in_profile = [d.id for d in devices if d.profile == profile]
        for index, wave in enumerate(waves):
            cumulative = sum(1 for device_id in in_profile if first[device_id] <= index)
            assert cumulative == max(1, math.ceil(wave.percent * size / 100)), (profile, wave)
            assert cumulative >= 1


def test_targets_match_selector_and_profile_by_name_or_alias(fleet_db):
    session_factory, v1, v2 = fleet_db

    created = _create(session_factory, v2["rpi5"])

    targeted = {m["device_id"] for m in created["members"]}
    assert "coral-00" not in targeted  # no bundle of this release for coral-devboard
    assert "x86-elsewhere" not in targeted  # outside the selector
    assert "rpi5-fresh" in targeted  # raspberry-pi-5 is an alias of rpi5
    assert len(targeted) == sum(PROFILES.values()) + 1
    assert created["profiles"] == {"jetson-orin-nano": 3, "rpi5": 8, "x86-avx2": 23}
    assert created["status"] == "pending" and created["counts"] == {"waiting": 34}
    with session_factory() as session:
        entry = session.scalars(select(AuditEntry).where(AuditEntry.action == "rollout.create")).one()
    assert entry.actor == "alice" and entry.target == created["id"] and entry.details["targets"] == 34


def test_a_profile_mismatch_is_never_targeted_even_when_selected(fleet_db):
    session_factory, v1, v2 = fleet_db
    with session_factory() as session:
        lonely = add_bundle(session, "vad", "1.0.0", "rpi4")

    with pytest.raises(ConfigError, match="no enrolled device matches"):
        _create(session_factory, lonely.id)
    created = _create(session_factory, v2["x86-avx2"], selector={"site": "lab", "profile": "x86-64-v3"})
    assert {m["profile"] for m in created["members"]} == {"x86-avx2"}


def test_create_validates_its_input(fleet_db):
    session_factory, v1, v2 = fleet_db
    with pytest.raises(NotFound):
        _create(session_factory, "0" * 64)
    with pytest.raises(ConfigError, match="gate 'latency<=5'"):
        _create(session_factory, v2["rpi5"], gates=["latency<=5"])
    with pytest.raises(ConfigError, match="last wave must be 100"):
        _create(session_factory, v2["rpi5"], waves=[10, 50])
    with pytest.raises(ConfigError, match="install_timeout_s"):
        _create(session_factory, v2["rpi5"], install_timeout_s=0)


def test_a_second_rollout_on_the_same_devices_is_refused(fleet_db):
    session_factory, v1, v2 = fleet_db
    first = _create(session_factory, v2["rpi5"])

    with pytest.raises(Conflict, match=first["id"]):
        _create(session_factory, v1["rpi5"], selector={"profile": "rpi5"})
    with session_factory() as session:
        rollouts.abort(session, "alice", first["id"])
    assert _create(session_factory, v1["rpi5"], selector={"profile": "rpi5"})["status"] == "pending"


# ------------------------------------------------------------------ the controller


def test_a_healthy_rollout_promotes_wave_by_wave_to_succeeded(fleet_db):
    session_factory, v1, v2 = fleet_db
    rollout_id = _create(session_factory, v2["x86-avx2"])["id"]
    clock, publisher = FakeClock(), RecordingPublisher()
    controller = RolloutController(session_factory, publisher, clock=clock)
    devices = SimulatedDevices(session_factory, publisher, clock)

    _drive(controller, devices, clock, until=("succeeded",))

    with session_factory() as session:
        status = rollout_status(session, rollout_id)
        everyone = devices_by_id(session)
        actions = [e.action for e in session.scalars(select(AuditEntry).where(AuditEntry.target == rollout_id)
                                                     .order_by(AuditEntry.id))]
    assert status["status"] == "succeeded" and status["finished_at"]
    assert [w["decision"] for w in status["waves"]] == ["promote", "promote", "promote"]
    assert status["counts"] == {"active": 34}
    for member in status["members"]:
        device = everyone[member["device_id"]]
        assert device.current_bundle_id == v2[{"raspberry-pi-5": "rpi5"}.get(device.profile, device.profile)]
        assert member["previous_bundle_id"] == device.previous_bundle_id
    # every device got exactly one desired state: its install, once, with the bundle built for its profile
    per_device = Counter(device_id for device_id, _ in publisher.messages)
    assert set(per_device.values()) == {1} and len(per_device) == 34
    assert all(d.action == "install" and d.rollout_id == rollout_id for _, d in publisher.messages)
    assert publisher.latest()["jetson-orin-nano-00"].bundle.id == v2["jetson-orin-nano"]
    assert publisher.latest()["jetson-orin-nano-00"].bundle.url == f"/api/v1/bundles/{v2['jetson-orin-nano']}/download"
    # each wave waited out its bake time, and each decision is in the audit log
    promotes = [d for d in status["decisions"] if d["decision"] == "promote"]
    assert all(d["evidence"]["bake"]["elapsed_s"] >= 60 for d in promotes)
    assert actions.count("rollout.promote") == 3 and actions.count("rollout.wave_started") == 3
    assert actions[0] == "rollout.create"


def test_the_controller_thread_judges_each_wave_when_its_bake_ends_not_at_its_next_full_pass(fleet_db):
    """Full passes 60 s apart, and yet every wave is decided soon after its bake: by the quick pass at the
    bake's end, or by the one the last device's answer asks for (notify(), as the MQTT bridge calls it). No
    quick pass judges a wave early: no hold is recorded and every promotion waited out the bake."""
    session_factory, v1, v2 = fleet_db
    rollout_id = _create(session_factory, v2["x86-avx2"], waves=[50, 100], bake_s=0.3)["id"]
    publisher = RecordingPublisher()
    controller = RolloutController(session_factory, publisher, settle_s=0.02)
    devices = SimulatedDevices(session_factory, publisher, time.time)
    stop = threading.Event()
    thread = controller.start_thread(stop, interval_s=60)
    started, status = time.monotonic(), None
    try:
        while time.monotonic() - started < 30 and status != "succeeded":
            if devices.answer():
                controller.notify()
            with session_factory() as session:
                status = session.get(Rollout, rollout_id).status
            time.sleep(0.02)
    finally:
        stop.set()
        controller.notify()
        thread.join(10)
    assert not thread.is_alive()

    with session_factory() as session:
        decisions = rollout_status(session, rollout_id)["decisions"]
    assert status == "succeeded"  # within 30 s: only quick passes came after the first full one
    assert [d["decision"] for d in decisions] == ["promote", "promote"]
    assert all(d["evidence"]["bake"]["elapsed_s"] >= 0.3 for d in decisions)


def test_a_failing_wave_rolls_every_touched_device_back(fleet_db):
    session_factory, v1, v2 = fleet_db
    rollout_id = _create(session_factory, v2["rpi5"])["id"]
    clock, publisher = FakeClock(), RecordingPublisher()
    controller = RolloutController(session_factory, publisher, clock=clock)
    devices = SimulatedDevices(session_factory, publisher, clock)
    devices.fail = {f"rpi5-{i:02d}" for i in range(7)} | {"rpi5-fresh"}  # v2's self-test fails on rpi5

    _drive(controller, devices, clock, until=("rolled_back",))

    with session_factory() as session:
        status = rollout_status(session, rollout_id)
        everyone = devices_by_id(session)
    assert status["status"] == "rolled_back"
    decision = status["decisions"][-1]
    assert decision["decision"] == "rollback" and decision["wave"] == 0 and decision["actor"] == "controller"
    failing = decision["evidence"]["gates"][0]
    assert failing["metric"] == "install_failure_ratio" and failing["profiles"]["rpi5"]["outcome"] == "fail"
    touched = {m["device_id"] for m in status["members"] if m["desired_seq"] > 0}
    assert touched == {device_id for device_id, _ in publisher.messages}
    assert 3 <= len(touched) < 34  # wave 0 only: the rollout never reached the others
    for device_id in touched:
        first, last = publisher.for_device(device_id)
        assert (first.action, last.action) == ("install", "rollback") and last.seq == first.seq + 1
        previous = v1.get(everyone[device_id].profile)
        assert (last.bundle.id if last.bundle else None) == previous
        assert everyone[device_id].current_bundle_id == previous  # ends where it started
    assert {m["phase"] for m in status["members"] if m["device_id"] not in touched} == {"skipped"}


def test_a_device_with_no_previous_bundle_is_told_to_roll_back_to_nothing(fleet_db):
    session_factory, v1, v2 = fleet_db
    rollout_id = _create(session_factory, v2["rpi5"], selector={"site": "lab", "profile": "rpi5"}, waves=[100])["id"]
    clock, publisher = FakeClock(), RecordingPublisher()
    controller = RolloutController(session_factory, publisher, clock=clock)
    devices = SimulatedDevices(session_factory, publisher, clock)
    devices.fail = {"rpi5-03"}

    _drive(controller, devices, clock, until=("rolled_back",))

    fresh = publisher.for_device("rpi5-fresh")
    assert [d.action for d in fresh] == ["install", "rollback"]
    assert fresh[-1].bundle is None and fresh[-1].rollout_id == rollout_id


def test_install_timeouts_are_marked_and_gated(fleet_db):
    session_factory, v1, v2 = fleet_db
    rollout_id = _create(session_factory, v2["jetson-orin-nano"], selector={"profile": "jetson"}, waves=[100],
                         gates=["install_timeout_ratio<=0"], install_timeout_s=120)["id"]
    clock, publisher = FakeClock(), RecordingPublisher()
    controller = RolloutController(session_factory, publisher, clock=clock)
    devices = SimulatedDevices(session_factory, publisher, clock)
    devices.silent = {"jetson-orin-nano-01"}

    controller.tick()
    devices.answer()
    clock.advance(119)
    assert controller.tick()["decisions"] == [(rollout_id, 0, "hold")]
    clock.advance(2)
    assert controller.tick()["decisions"] == [(rollout_id, 0, "rollback")]

    with session_factory() as session:
        member = session.scalars(select(RolloutMember).where(RolloutMember.device_id == "jetson-orin-nano-01")).one()
        decision = session.scalars(select(RolloutDecision).where(RolloutDecision.decision == "rollback")).one()
    assert member.error == "no final install status within 120 s"
    assert decision.evidence["gates"][0]["values"] == {"jetson-orin-nano": pytest.approx(1 / 3, abs=1e-6)}


def test_holds_are_recorded_once_per_reason(fleet_db):
    session_factory, v1, v2 = fleet_db
    rollout_id = _create(session_factory, v2["rpi5"], selector={"profile": "rpi5"}, waves=[100])["id"]
    clock, publisher = FakeClock(), RecordingPublisher()
    controller = RolloutController(session_factory, publisher, clock=clock)

    for _ in range(5):
        controller.tick()
        clock.advance(1)

    with session_factory() as session:
        holds = session.scalars(select(RolloutDecision).where(RolloutDecision.rollout_id == rollout_id)).all()
    assert [(h.decision, h.evidence["reason"]) for h in holds] == [
        ("hold", "baking; waiting for installs; waiting for reports")]


def test_a_restarted_controller_resumes_without_conflicting_commands(fleet_db, tmp_path):
    session_factory, v1, v2 = fleet_db
    rollout_id = _create(session_factory, v2["x86-avx2"])["id"]
    clock, publisher = FakeClock(), RecordingPublisher()
    first = RolloutController(session_factory, publisher, clock=clock)
    devices = SimulatedDevices(session_factory, publisher, clock)
    for _ in range(8):  # into wave 1
        first.tick()
        devices.answer()
        clock.advance(10)
    with session_factory() as session:
        assert session.get(Rollout, rollout_id).current_wave == 1
    # The broker goes away just as the next wave starts: its states are stored but never acknowledged.
    publisher.down = True
    clock.advance(60)
    first.tick()
    with session_factory() as session:
        assert session.get(Rollout, rollout_id).current_wave == 2
        stored = {d.id: d.desired for d in session.scalars(select(Device)) if d.desired}
    publisher.down = False

    # A new server process: a new engine on the same database file, a new controller.
    restarted = session_factory_at(tmp_path)
    second = RolloutController(restarted, publisher, clock=clock)
    _drive(second, SimulatedDevices(restarted, publisher, clock), clock, until=("succeeded",))

    by_device_seq = defaultdict(set)
    for device_id, desired in publisher.messages:
        by_device_seq[(device_id, desired.seq)].add(desired.model_dump_json())
    assert all(len(payloads) == 1 for payloads in by_device_seq.values())  # a repeat is the same message
    installs = defaultdict(set)
    for device_id, desired in publisher.messages:
        installs[device_id].add((desired.seq, desired.bundle.id))
    assert all(len(seen) == 1 for seen in installs.values())  # one state per device for the rollout
    assert len(installs) == 34
    for device_id, desired in publisher.latest().items():  # what went out after the restart was what was stored
        if device_id in stored:
            assert desired.model_dump(mode="json") == stored[device_id]


def test_two_controllers_on_one_database_never_start_a_wave_twice(fleet_db):
    session_factory, v1, v2 = fleet_db
    rollout_id = _create(session_factory, v2["x86-avx2"], bake_s=0)["id"]
    clock, publisher = FakeClock(), RecordingPublisher()
    a = RolloutController(session_factory, publisher, clock=clock)
    b = RolloutController(session_factory, publisher, clock=clock)
    devices = SimulatedDevices(session_factory, publisher, clock)

    for _ in range(20):
        a.tick()
        b.tick()
        devices.answer()
        clock.advance(1)

    with session_factory() as session:
        assert session.get(Rollout, rollout_id).status == "succeeded"
        promotes = session.scalars(select(RolloutDecision).where(RolloutDecision.decision == "promote")).all()
    assert sorted(d.wave_index for d in promotes) == [0, 1, 2]
    assert len({(d, m.seq) for d, m in publisher.messages}) == 34


# ------------------------------------------------------------------ operator actions


def test_pause_resume_abort(fleet_db):
    session_factory, v1, v2 = fleet_db
    rollout_id = _create(session_factory, v2["x86-avx2"], bake_s=0)["id"]
    clock, publisher = FakeClock(), RecordingPublisher()
    controller = RolloutController(session_factory, publisher, clock=clock)
    devices = SimulatedDevices(session_factory, publisher, clock)
    controller.tick()
    with session_factory() as session:
        assert rollouts.pause(session, "bob", rollout_id)["status"] == "paused"

    for _ in range(5):
        devices.answer()
        controller.tick()
    with session_factory() as session:
        assert session.get(Rollout, rollout_id).current_wave == 0  # paused: no promotion
        with pytest.raises(Conflict, match="it is paused"):
            rollouts.pause(session, "bob", rollout_id)
        assert rollouts.resume(session, "bob", rollout_id)["status"] == "running"
    controller.tick()  # a resumed wave bakes again from now (by the controller's clock)
    with session_factory() as session:
        assert session.get(Rollout, rollout_id).current_wave == 0
        assert session.get(Rollout, rollout_id).wave_started_at is not None
    controller.tick()  # bake 0: promoted
    with session_factory() as session:
        assert session.get(Rollout, rollout_id).current_wave == 1
        aborted = rollouts.abort(session, "bob", rollout_id)
        with pytest.raises(Conflict):
            rollouts.resume(session, "bob", rollout_id)
        actions = [e.action for e in session.scalars(select(AuditEntry).where(AuditEntry.actor == "bob"))]
    sent = len(publisher.messages)
    controller.tick()
    assert aborted["status"] == "aborted" and aborted["counts"]["skipped"] > 0
    assert len(publisher.messages) == sent  # devices keep what they run; nothing more is sent
    assert actions == ["rollout.pause", "rollout.resume", "rollout.abort"]
    with session_factory() as session, pytest.raises(NotFound):
        rollouts.pause(session, "bob", "no-such-rollout")


def test_manual_rollback_after_success(fleet_db):
    session_factory, v1, v2 = fleet_db
    rollout_id = _create(session_factory, v2["jetson-orin-nano"], selector={"profile": "jetson-orin-nano"},
                         waves=[100], bake_s=0)["id"]
    clock, publisher = FakeClock(), RecordingPublisher()
    controller = RolloutController(session_factory, publisher, clock=clock)
    devices = SimulatedDevices(session_factory, publisher, clock)
    _drive(controller, devices, clock, until=("succeeded",))

    with session_factory() as session:
        requested = rollouts.manual_rollback(session, "carol", rollout_id)
    _drive(controller, devices, clock, until=("rolled_back",))

    assert requested["status"] == "rolling_back"
    assert requested["decisions"][-1]["actor"] == "carol"
    with session_factory() as session:
        status = rollout_status(session, rollout_id)
        everyone = devices_by_id(session)
    with session_factory() as session, pytest.raises(Conflict, match="it is rolled_back"):
        rollouts.manual_rollback(session, "carol", rollout_id)
    assert status["counts"] == {"rolled_back": 3}
    for i in range(3):
        assert publisher.latest()[f"jetson-orin-nano-0{i}"].action == "rollback"
        assert everyone[f"jetson-orin-nano-0{i}"].current_bundle_id == v1["jetson-orin-nano"]


# ------------------------------------------------------------------ status from devices


def test_stale_statuses_are_ignored_and_members_follow_their_seq(fleet_db):
    session_factory, v1, v2 = fleet_db
    rollout_id = _create(session_factory, v2["rpi5"], selector={"profile": "rpi5"}, waves=[100])["id"]
    clock, publisher = FakeClock(), RecordingPublisher()
    RolloutController(session_factory, publisher, clock=clock).tick()
    seq = publisher.latest()["rpi5-00"].seq

    with session_factory() as session:
        assert apply_status(session, DeviceStatus(device_id="rpi5-00", seq=seq, rollout_id=rollout_id, phase="downloading"))
        assert not apply_status(session, DeviceStatus(device_id="rpi5-00", seq=seq - 1, phase="active",
                                                      current_bundle=v1["rpi5"]))
        assert apply_status(session, DeviceStatus(device_id="rpi5-00", state="offline", seq=0))
        device = session.get(Device, "rpi5-00")
        member = session.scalars(select(RolloutMember).where(RolloutMember.device_id == "rpi5-00")).one()
        assert (device.phase, device.acked_seq, device.online) == ("downloading", seq, False)
        assert member.phase == "downloading"
        with pytest.raises(Exception, match="not enrolled"):
            apply_status(session, DeviceStatus(device_id="ghost", seq=1))
