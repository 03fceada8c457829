"""The agent over a real Mosquitto: phases in order, refusals with reasons, rollback, idempotence."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt
import pytest
import yaml

from device_agent.agent import Agent
from edgepack.protocol import DesiredState, encode
from tests.device_agent.conftest import StatusWatcher, agent_config, publish_desired
from tests.support import REPO

INSTALL_PHASES = ["downloading", "verifying", "installing", "selftest", "active"]


@pytest.fixture
def fleet(bundle_server, bundles):
    for bundle in bundles.all():
        bundle_server.add(bundle)
    bundle_server.enrollment_tokens.add("et_first")
    return bundle_server


@pytest.fixture
def run_agent(tmp_path, bundles, fleet, mosquitto, request):
    """Start agents (each test gets its own device id); stopped at teardown."""
    started: list[Agent] = []
    watchers: list[StatusWatcher] = []

    def start(device_id: str | None = None, *, fault=None, **overrides) -> tuple[Agent, StatusWatcher]:
        device_id = device_id or f"{request.node.name[5:40].replace('_', '-')}-{secrets.token_hex(2)}"
        overrides.setdefault("enrollment_token", "et_first")
        overrides.setdefault("selftest_isolation", "thread")  # cheaper; the first test below runs the default, a process
        config = agent_config(tmp_path, bundles, fleet_url=fleet.url, mqtt_url=mosquitto.url, device_id=device_id, **overrides)
        watcher = StatusWatcher(mosquitto.url, device_id)
        agent = Agent(config, fault=fault)
        agent.start()
        assert agent.wait_connected(10)
        started.append(agent)
        watchers.append(watcher)
        return agent, watcher

    yield start
    for agent in started:
        agent.stop()
    for watcher in watchers:
        watcher.close()


def _wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def _take_session_over(mosquitto, agent: Agent) -> None:
    """Connect with the agent's client id: the broker drops the agent's connection and publishes its will."""
    port = int(mosquitto.url.rsplit(":", 1)[1])
    thief = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgepack-agent-{agent.device_id}")
    thief.connect("127.0.0.1", port)
    thief.disconnect()


def desire(mosquitto, agent: Agent, seq: int, bundle=None, action: str = "install", rollout_id: str = "r-1", retain=True) -> None:
    message = DesiredState(rollout_id=rollout_id, seq=seq, action=action, bundle=bundle.ref if bundle else None)
    publish_desired(mosquitto.url, agent.device_id, encode(message), retain=retain)


def test_an_agent_enrolls_installs_and_reports_every_phase_in_order(run_agent, mosquitto, fleet, bundles):
    agent, watcher = run_agent(selftest_isolation="process", report_status_over_http=True)
    watcher.wait_for(lambda s: s.state == "online" and s.phase == "idle")

    desire(mosquitto, agent, 1, bundles.v1)
    final = watcher.wait_for(lambda s: s.seq == 1 and s.phase in ("active", "failed"))

    assert final.phase == "active", final.error
    assert watcher.phases(1) == INSTALL_PHASES
    assert (final.rollout_id, final.current_bundle, final.previous_bundle) == ("r-1", bundles.v1.ref.id, None)
    assert (final.profile, final.device_id) == ("rpi4", agent.device_id)
    assert agent.active_bundle().bundle_id == bundles.v1.ref.id and agent.active_bundle().version == "1.0.0"
    credential = agent.state.read_credential()
    assert credential == fleet.credentials[agent.device_id]
    assert oct(agent.state.credential_path.stat().st_mode & 0o777) == "0o600"
    assert {r.authorization for r in fleet.downloads()} == {f"Bearer {credential}"}
    # The optional HTTP copy goes out right after the MQTT one the watcher saw: give it time to land.
    _wait_until(lambda: [s["phase"] for s in fleet.statuses if s["seq"] == 1] == INSTALL_PHASES)


def test_bad_bundles_are_refused_with_the_reason_and_the_old_one_stays_active(run_agent, mosquitto, bundles):
    agent, watcher = run_agent()
    desire(mosquitto, agent, 1, bundles.v1)
    watcher.wait_for(lambda s: s.seq == 1 and s.phase == "active")

    for seq, bad, reason in [(2, bundles.tampered, "sha256 mismatch"), (3, bundles.wrong_profile, "built for profile 'rpi5'"),
                             (4, bundles.selftest_fails, "self-test failed")]:
        desire(mosquitto, agent, seq, bad)
        final = watcher.wait_for(lambda s, seq=seq: s.seq == seq and s.phase in ("active", "failed"))
        assert final.phase == "failed" and reason in final.error, (seq, final.error)
        assert final.current_bundle == bundles.v1.ref.id
    assert watcher.phases(4) == ["downloading", "verifying", "installing", "selftest", "failed"]
    assert agent.active_bundle().bundle_id == bundles.v1.ref.id
    assert agent.state.read_journal().last_seq == 4


def test_rollback_switches_back_without_a_download(run_agent, mosquitto, fleet, bundles):
    agent, watcher = run_agent()
    changes = []
    agent.on_active_change(changes.append)
    desire(mosquitto, agent, 1, bundles.v1)
    watcher.wait_for(lambda s: s.seq == 1 and s.phase == "active")  # else seq 2 may supersede it before it starts
    desire(mosquitto, agent, 2, bundles.v2)
    watcher.wait_for(lambda s: s.seq == 2 and s.phase == "active")
    downloads = len(fleet.downloads())

    desire(mosquitto, agent, 3, bundles.v1, action="rollback", rollout_id="r-2")
    final = watcher.wait_for(lambda s: s.seq == 3 and s.phase in ("rolled_back", "failed"))

    assert final.phase == "rolled_back", final.error
    assert watcher.phases(3) == ["verifying", "rolled_back"]
    assert (final.current_bundle, final.previous_bundle) == (bundles.v1.ref.id, bundles.v2.ref.id)
    assert len(fleet.downloads()) == downloads
    assert [c.version for c in changes if c is not None][-3:] == ["1.0.0", "2.0.0", "1.0.0"]


def test_duplicates_and_retained_replays_after_a_reconnect_or_restart_do_nothing(run_agent, mosquitto, fleet, bundles):
    agent, watcher = run_agent()
    desire(mosquitto, agent, 1, bundles.v1)
    watcher.wait_for(lambda s: s.seq == 1 and s.phase == "active")
    agent.wait_idle(5)

    desire(mosquitto, agent, 1, bundles.v1, retain=False)  # a duplicate delivery
    desire(mosquitto, agent, 0, bundles.v2, retain=False)  # an older one
    publish_desired(mosquitto.url, agent.device_id, b'{"schema_version": 1, "seq": "x"}', retain=False)
    _wait_until(lambda: agent.ignored_desired == 2 and agent.malformed_messages == 1)
    # A second connection with the agent's client id takes its session over: the broker publishes the
    # agent's last will, the agent reconnects and gets the retained desired state again.
    _take_session_over(mosquitto, agent)
    first_will = watcher.wait_for(lambda s: s.state == "offline")
    count = len(watcher.statuses)
    back = watcher.wait_for(lambda s: s.state == "online" and watcher.statuses.index(s) >= count)

    assert first_will.current_bundle is None  # the will of a connection is fixed when it connects …
    assert (back.seq, back.phase, back.current_bundle) == (1, "active", bundles.v1.ref.id)
    count = len(watcher.statuses)
    _take_session_over(mosquitto, agent)
    second_will = watcher.wait_for(lambda s: s.state == "offline" and watcher.statuses.index(s) >= count)
    assert (second_will.seq, second_will.phase, second_will.current_bundle) == (1, "active", bundles.v1.ref.id)  # … and renewed
    _wait_until(lambda: agent.ignored_desired == 4)  # one retained replay per reconnect
    assert len(fleet.downloads()) == 1 and agent.applied_desired == 1

    # a restart on the same state folder: recovered, not enrolled again, the retained seq 1 ignored
    agent.stop()
    again, _ = run_agent(agent.device_id, enrollment_token=None)
    _wait_until(lambda: again.ignored_desired == 1)
    assert again.wait_idle(2) and again.applied_desired == 0
    assert again.active_bundle().bundle_id == bundles.v1.ref.id
    assert len(fleet.downloads()) == 1


def test_a_newer_desired_state_supersedes_a_queued_older_one(run_agent, mosquitto, bundles):
    release = threading.Event()

    def hold_first_install(point: str) -> None:
        if point == "install.downloaded" and not release.is_set():
            release.wait(10)

    agent, watcher = run_agent(fault=hold_first_install)
    desire(mosquitto, agent, 1, bundles.v1)
    watcher.wait_for(lambda s: s.seq == 1 and s.phase == "downloading")
    desire(mosquitto, agent, 2, bundles.v2)
    desire(mosquitto, agent, 3, bundles.onnx)
    _wait_until(lambda: agent._pending is not None and agent._pending.seq == 3)  # seq 3 replaced the queued seq 2
    release.set()

    final = watcher.wait_for(lambda s: s.seq == 3 and s.phase in ("active", "failed"))

    assert final.phase == "active" and final.current_bundle == bundles.onnx.ref.id, final.error
    assert watcher.phases(1)[-1] == "active"
    assert watcher.phases(2) == []


def test_a_download_that_gives_up_is_retried_later_and_resumes(run_agent, mosquitto, fleet, bundles):
    fleet.drop_once[bundles.v1.ref.id] = bundles.v1.ref.size // 3
    agent, watcher = run_agent(download={"retries": 0, "backoff_s": 0.01, "retry_interval_s": 0.2})

    desire(mosquitto, agent, 1, bundles.v1)
    retrying = watcher.wait_for(lambda s: s.seq == 1 and s.phase == "downloading" and s.error is not None)
    final = watcher.wait_for(lambda s: s.seq == 1 and s.phase in ("active", "failed"))

    assert "retrying in 0.2 s" in retrying.error
    assert final.phase == "active" and final.error is None
    assert [r.range for r in fleet.downloads()] == [None, f"bytes={bundles.v1.ref.size // 3}-"]


def test_the_agent_process_reports_offline_by_its_last_will_and_on_sigterm(tmp_path, mosquitto, fleet, bundles):
    config = agent_config(tmp_path, bundles, fleet_url=fleet.url, mqtt_url=mosquitto.url, device_id="proc-1",
                          enrollment_token="et_first").model_dump(mode="json")
    config_path = tmp_path / "agent.yaml"
    config_path.write_text(yaml.safe_dump(config))
    watcher = StatusWatcher(mosquitto.url, "proc-1")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        process = subprocess.Popen([sys.executable, "-m", "device_agent", "--config", str(config_path)], cwd=REPO, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        watcher.wait_for(lambda s: s.state == "online")
        process.kill()
        process.wait(10)
        watcher.wait_for(lambda s: s.state == "offline")  # the broker published the last will

        count = len(watcher.statuses)
        process = subprocess.Popen([sys.executable, "-m", "device_agent", "--config", str(config_path)], cwd=REPO, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        watcher.wait_for(lambda s: s.state == "online" and watcher.statuses.index(s) >= count)
        count = len(watcher.statuses)
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0, process.stderr.read().decode()[-1000:]
        offline = watcher.wait_for(lambda s: s.state == "offline" and watcher.statuses.index(s) >= count)
        assert offline.device_id == "proc-1"
    finally:
        if process.poll() is None:
            process.kill()
        watcher.close()
