"""Paced and dynamic rollouts (issue 12): a start rate cap, a cap on installs in progress, maintenance windows
per label, and devices that join the selector while the rollout runs — the real controller on SQLite with
a fake clock and a recording publisher."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select

from edgepack.errors import ConfigError
from fleet.controller import RolloutController
from fleet.models import Device, Rollout, RolloutDecision, RolloutMember
from fleet.services.gates import IN_PROGRESS_PHASES
from fleet.services.pacing import parse_pacing
from fleet.services.rollouts import create_rollout
from tests.fleet.rollout_helpers import FakeClock, RecordingPublisher, SimulatedDevices, add_bundle, add_device, session_factory_at

GATES = ["install_failure_ratio<=0.1", "active_ratio>=1.0"]


class TimedPublisher(RecordingPublisher):
    """Also records when (on the fake clock) each desired state went out."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock
        self.times: list[tuple[float, str, str]] = []

    def publish_desired(self, device_id, desired):
        self.times.append((self.clock(), device_id, desired.action))
        return super().publish_desired(device_id, desired)


@pytest.fixture
def fleet(tmp_path):
    factory = session_factory_at(tmp_path)
    with factory() as session:
        v1 = add_bundle(session, "det", "1.0", "x86-avx2").id
        v2 = add_bundle(session, "det", "2.0", "x86-avx2").id
        for i in range(20):
            add_device(session, f"x86-{i:02d}", "x86-avx2", {"site": "berlin" if i < 10 else "tokyo"}, current_bundle=v1)
    clock = FakeClock()
    publisher = TimedPublisher(clock)
    controller = RolloutController(factory, publisher, clock=clock)
    return factory, v1, v2, clock, publisher, controller, SimulatedDevices(factory, publisher, clock)


def _create(factory, bundle_id, waves=(10, 50, 100), **pacing):
    with factory() as session:
        return create_rollout(session, "alice", bundle_id, selector={}, waves=list(waves), gates=GATES, bake_s=5,
                              **pacing)["id"]


def _status(factory, rollout_id):
    with factory() as session:
        return session.get(Rollout, rollout_id).status


def _drive(controller, devices, clock, factory, rollout_id, *, step_s=5.0, ticks=400, each=None):
    for _ in range(ticks):
        controller.tick()
        if each is not None:
            each()
        devices.answer()
        clock.advance(step_s)
        if _status(factory, rollout_id) not in ("pending", "running"):
            return _status(factory, rollout_id)
    raise AssertionError(f"rollout still {_status(factory, rollout_id)} after {ticks} ticks")


def test_a_rollout_capped_at_n_a_minute_never_starts_more_than_n_in_any_minute(fleet):
    factory, v1, v2, clock, publisher, controller, devices = fleet
    rollout_id = _create(factory, v2, max_per_minute=4)
    assert _drive(controller, devices, clock, factory, rollout_id) == "succeeded"
    starts = [t for t, _, action in publisher.times if action == "install"]
    assert len(starts) == 20
    assert max(sum(1 for u in starts if t <= u < t + 60) for t in starts) <= 4
    # and it did not crawl: 20 devices at 4 a minute take about five minutes, not much more
    assert starts[-1] - starts[0] <= 6 * 60
    with factory() as session:
        reasons = {d.evidence.get("reason", "") for d in session.scalars(select(RolloutDecision)) if d.decision == "hold"}
    assert any(r.startswith("paced") for r in reasons)


def test_a_cap_on_installs_in_progress_holds_the_rest_back(fleet):
    factory, v1, v2, clock, publisher, controller, devices = fleet
    rollout_id = _create(factory, v2, max_concurrent=3)
    slow = {f"x86-{i:02d}" for i in range(20)}
    seen: list[int] = []

    def check():
        with factory() as session:
            busy = session.scalars(select(RolloutMember).where(RolloutMember.rollout_id == rollout_id,
                                                               RolloutMember.desired_seq > 0,
                                                               RolloutMember.phase.in_(IN_PROGRESS_PHASES))).all()
        seen.append(len(busy))
        # devices answer only every other tick, so installs stay in progress for a while
        devices.silent = slow if len(seen) % 2 else set()

    assert _drive(controller, devices, clock, factory, rollout_id, each=check) == "succeeded"
    assert max(seen) <= 3 and max(seen) == 3


def test_a_maintenance_window_holds_its_devices_until_it_opens(fleet):
    factory, v1, v2, clock, publisher, controller, devices = fleet
    now = dt.datetime.fromtimestamp(clock(), dt.timezone.utc)
    opens = (now + dt.timedelta(hours=2)).replace(minute=0, second=0, microsecond=0)
    closes = opens + dt.timedelta(hours=1)
    window = {"selector": {"site": "berlin"}, "start": opens.strftime("%H:%M"), "end": closes.strftime("%H:%M"),
              "tz": "UTC"}
    # One wave of every device: which ones a 10 % wave holds depends on the rollout id's hash, and a first
    # wave of berlin devices only would start nothing outside the window.
    rollout_id = _create(factory, v2, waves=[100], maintenance_windows=[window])
    for _ in range(60):  # an hour outside the window: tokyo devices go, berlin ones wait
        controller.tick()
        devices.answer()
        clock.advance(60)
    started = {device_id for _, device_id, action in publisher.times if action == "install"}
    with factory() as session:
        berlin = {d.id for d in session.scalars(select(Device)) if d.labels.get("site") == "berlin"}
        rollout = session.get(Rollout, rollout_id)
        last = session.scalars(select(RolloutDecision).where(RolloutDecision.rollout_id == rollout_id)
                               .order_by(RolloutDecision.id.desc())).first()
    assert not started & berlin and started  # only devices outside the window's selector started
    assert rollout.status == "running" and last.decision == "hold" and "maintenance window" in last.evidence["reason"]
    clock.now = opens.timestamp() + 1
    assert _drive(controller, devices, clock, factory, rollout_id) == "succeeded"
    berlin_starts = [t for t, d, a in publisher.times if a == "install" and d in berlin]
    assert berlin_starts and all(opens.timestamp() <= t < closes.timestamp() for t in berlin_starts)


@pytest.mark.parametrize("policy", ["current_wave", "last_wave", "none"])
def test_a_device_enrolled_mid_rollout_that_matches_the_selector_ends_on_the_new_bundle(fleet, policy):
    factory, v1, v2, clock, publisher, controller, devices = fleet
    rollout_id = _create(factory, v2, late_joiners=policy)
    controller.tick()
    devices.answer()
    with factory() as session:
        add_device(session, "x86-late", "x86-avx2", {"site": "tokyo"}, current_bundle=v1)
        add_device(session, "x86-other", "x86-avx2", {"site": "tokyo"}, current_bundle=v1)
        session.get(Device, "x86-other").revoked_at = dt.datetime.now(dt.timezone.utc)  # revoked: never joins
        session.commit()
    assert _drive(controller, devices, clock, factory, rollout_id) == "succeeded"
    with factory() as session:
        member = session.scalars(select(RolloutMember).where(RolloutMember.device_id == "x86-late")).first()
        late = session.get(Device, "x86-late")
        assert session.scalars(select(RolloutMember).where(RolloutMember.device_id == "x86-other")).first() is None
    if policy == "none":
        assert member is None and late.current_bundle_id == v1
        return
    assert member is not None and late.current_bundle_id == v2
    assert member.wave_index == (2 if policy == "last_wave" else member.wave_index)
    if policy == "current_wave":
        assert member.wave_index < 2


@pytest.mark.parametrize("kwargs, fragment", [
    ({"max_per_minute": 0}, "max_per_minute"),
    ({"windows": [{"start": "25:00", "end": "03:00"}]}, "HH:MM"),
    ({"windows": [{"start": "01:00", "end": "03:00", "tz": "Mars/Olympus"}]}, "time zone"),
    ({"windows": [{"start": "01:00", "end": "01:00"}]}, "same time"),
    ({"late_joiners": "sometimes"}, "late_joiners"),
])
def test_bad_pacing_is_one_clear_error(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_pacing(**kwargs)


def test_a_window_across_midnight_is_open_on_both_sides_of_it():
    window = parse_pacing(windows=[{"start": "22:00", "end": "04:00", "tz": "Europe/Berlin"}]).windows[0]
    at = lambda h: dt.datetime(2026, 12, 2, h, 30, tzinfo=dt.timezone.utc)  # noqa: E731 (Berlin is UTC+1 in December)
    assert [window.is_open(at(h)) for h in (20, 21, 2, 3, 12)] == [False, True, True, False, False]


def test_the_cli_window_option_reads_selector_times_and_zone():
    import typer

    from fleet.cli.rollout import parse_window

    assert parse_window("site=berlin@01:00-05:00/Europe/Berlin") == {
        "selector": {"site": "berlin"}, "start": "01:00", "end": "05:00", "tz": "Europe/Berlin"}
    assert parse_window("@22:00-04:00") == {"selector": {}, "start": "22:00", "end": "04:00", "tz": "UTC"}
    with pytest.raises(typer.BadParameter):
        parse_window("site=berlin 01:00")
