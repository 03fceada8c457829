"""The fleet's director key: generated once per data folder, signs every stored desired state, and the
controller re-signs a state its device has not finished before it expires (retained states outlive offline devices)."""

from __future__ import annotations

import os
import stat

import pytest
from sqlalchemy import select

from device_agent.director import DesiredVerifier
from edgepack.errors import ConfigError
from edgepack.protocol import DesiredState
from fleet.controller import RolloutController
from fleet.director import FleetDirector, director_for
from fleet.models import Device
from fleet.services.rollouts import create_rollout
from tests.fleet.rollout_helpers import (
    FakeClock, RecordingPublisher, SimulatedDevices, add_bundle, add_device, session_factory_at,
)

VALIDITY_S = 3600.0


def test_the_key_is_made_once_per_data_folder_private_and_kept(tmp_path):
    first = FleetDirector.load_or_create(tmp_path)
    key_file = tmp_path / "director" / "edgepack.key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert FleetDirector.load_or_create(tmp_path).key_id == first.key_id  # a restart signs with the same key
    assert director_for(tmp_path).key_id == first.key_id
    assert FleetDirector.load_or_create(tmp_path / "other").key_id != first.key_id


def _fleet(tmp_path, devices: int = 3):
    session_factory = session_factory_at(tmp_path)
    with session_factory() as session:
        v1 = add_bundle(session, "digits", "1.0.0", "x86-avx2").id
        v2 = add_bundle(session, "digits", "2.0.0", "x86-avx2").id
        for i in range(devices):
            add_device(session, f"dev-{i}", "x86-avx2", {"site": "lab"}, current_bundle=v1)
        create_rollout(session, "alice", v2, selector={"site": "lab"}, waves=[100], gates=["install_failure_ratio<=0.1"],
                       bake_s=0.0, min_reports=1, install_timeout_s=10 * VALIDITY_S)
    return session_factory


def test_every_stored_state_is_signed_for_its_device_and_verifies_on_the_device(tmp_path):
    director = FleetDirector.load_or_create(tmp_path, validity_s=VALIDITY_S)
    clock, publisher = FakeClock(), RecordingPublisher()
    controller = RolloutController(_fleet(tmp_path), publisher, clock=clock, signer=director)

    controller.tick()

    assert len(publisher.messages) == 3
    for device_id, desired in publisher.messages:
        assert desired.device_id == device_id and desired.sig.key_id == director.key_id
        assert desired.expires_at == clock.now + VALIDITY_S
        verifier = DesiredVerifier(device_id, director.public().model_dump(), clock=clock)
        assert verifier.check(desired) is None
        assert "addressed to device" in DesiredVerifier("dev-9", director.public().model_dump(), clock=clock).check(desired)


def test_unfinished_states_are_re_signed_before_they_expire_finished_ones_are_not(tmp_path):
    director = FleetDirector.load_or_create(tmp_path, validity_s=VALIDITY_S)
    session_factory = _fleet(tmp_path)
    clock, publisher = FakeClock(), RecordingPublisher()
    controller = RolloutController(session_factory, publisher, clock=clock, signer=director, refresh_interval_s=60)
    devices = SimulatedDevices(session_factory, publisher, clock)
    devices.silent = {"dev-1", "dev-2"}  # offline: they never answer
    controller.tick()
    devices.answer()  # dev-0 installs and reports active
    first = {device_id: desired for device_id, desired in publisher.messages}

    clock.advance(VALIDITY_S * 0.4)
    assert controller.tick()["refreshed"] == 0  # still well within its validity

    clock.advance(VALIDITY_S * 0.2)
    publisher.down = True  # the broker is away when the refresh is due: the stored re-signed copy is retried
    assert controller.tick()["refreshed"] == 0
    resigned_at = clock.now
    publisher.down = False
    clock.advance(60)
    assert controller.tick()["refreshed"] == 2

    again = publisher.messages[3:]
    assert sorted(device_id for device_id, _ in again) == ["dev-1", "dev-2"]
    for device_id, desired in again:
        assert desired.seq == first[device_id].seq and desired.bundle == first[device_id].bundle  # the same state
        assert desired.issued_at == resigned_at and desired.expires_at == resigned_at + VALIDITY_S
        with session_factory() as session:
            assert DesiredState.model_validate(session.get(Device, device_id).desired) == desired
    # long after the first signature expired, an offline device that comes back accepts the retained copy
    clock.advance(VALIDITY_S * 0.6)
    verifier = DesiredVerifier("dev-1", director.public().model_dump(), clock=clock)
    assert "expired" in verifier.check(first["dev-1"])
    assert verifier.check(dict(again)["dev-1"]) is None
    with session_factory() as session:
        assert all(d.desired["sig"]["key_id"] == director.key_id for d in session.scalars(select(Device)))


def test_a_key_rotation_re_signs_every_stored_state_then_the_next_key_takes_over(tmp_path):
    from fleet.director import begin_rotation, finish_rotation

    data_dir = tmp_path / "data"
    old = FleetDirector.load_or_create(data_dir, validity_s=VALIDITY_S)
    session_factory = _fleet(tmp_path)
    clock, publisher = FakeClock(), RecordingPublisher()
    devices = SimulatedDevices(session_factory, publisher, clock)
    RolloutController(session_factory, publisher, clock=clock, signer=old).tick()
    devices.answer()  # every device finished its install

    announced = begin_rotation(data_dir)
    assert begin_rotation(data_dir) == announced
    during = FleetDirector.load_or_create(data_dir, validity_s=VALIDITY_S)
    assert during.key_id == old.key_id and during.next_key == announced
    clock.advance(60)
    # finished states too: that is how every device hears of the next key
    assert RolloutController(session_factory, publisher, clock=clock, signer=during).tick()["refreshed"] == 3
    for device_id, desired in publisher.messages[3:]:
        assert desired.next_key == announced and desired.sig.key_id == old.key_id

    assert finish_rotation(data_dir) == announced.key_id
    after = FleetDirector.load_or_create(data_dir, validity_s=VALIDITY_S)
    assert after.key_id == announced.key_id and after.next_key is None
    assert (data_dir / f"director-retired-{old.key_id}" / "edgepack.key").exists()
    with pytest.raises(ConfigError, match="no key rotation in progress"):
        finish_rotation(data_dir)


def test_rotate_key_command_announces_then_promotes_the_next_key_in_one_line_steps(tmp_path):
    from tests.support import run_cli

    data_dir = tmp_path / "fleet-data"
    refused = run_cli("fleet", "rotate-key", "--data-dir", str(data_dir))
    assert refused.returncode == 2 and "holds no fleet key" in refused.stderr
    current = FleetDirector.load_or_create(data_dir)  # what `fleet serve` makes on its first start

    begun = run_cli("fleet", "rotate-key", "--data-dir", str(data_dir))
    assert begun.returncode == 0, begun.stderr
    announced = FleetDirector.load_or_create(data_dir)
    assert announced.key_id == current.key_id and announced.next_key is not None  # announced, not yet current
    assert announced.next_key.key_id in begun.stdout + begun.stderr  # the command prints on stderr, as serve does

    finished = run_cli("fleet", "rotate-key", "--data-dir", str(data_dir), "--finish")
    assert finished.returncode == 0, finished.stderr
    assert FleetDirector.load_or_create(data_dir).key_id == announced.next_key.key_id
    assert (data_dir / f"director-retired-{current.key_id}").is_dir()
    again = run_cli("fleet", "rotate-key", "--data-dir", str(data_dir), "--finish")
    assert again.returncode == 2 and "no key rotation in progress" in again.stderr
