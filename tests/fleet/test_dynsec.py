"""fleet.broker: the dynsec bootstrap Mosquitto reads, and `edgepack fleet broker-config` starting a real broker
that refuses anonymous clients and lets the fleet's identity manage devices."""

from __future__ import annotations

import base64
import json
import subprocess
import time

import paho.mqtt.client as mqtt
import pytest
from typer.testing import CliRunner

from edgepack.cli import app as root_app
from edgepack.errors import BrokerUnavailable
from edgepack.mqtt import MqttEndpoint
from fleet.broker.dynsec import DynsecIdentities, device_acls, password_entry, provision_commands
from fleet.broker.rights import may_publish, may_subscribe, topic_matches
from testbeds.mosquitto import find_mosquitto, free_port


def test_password_entries_hash_as_mosquitto_ctrl_does() -> None:
    # `mosquitto_ctrl dynsec init ds.json admin secretpw` wrote this salt and hash (Mosquitto 2.0.11)
    salt = base64.b64decode("wf6SCNezbfIdUHeF")
    entry = password_entry("secretpw", salt=salt)
    assert entry == {"password": "e0vxUXCFIqGtv1NeNPX6gI6naSgGg4Be5KjAoZfr5lRNuf+ZvrCYjEV3cDqcR2jLqvSajCJiA3GJbo7jXsi6yg==",
                     "salt": "wf6SCNezbfIdUHeF", "iterations": 101}


def test_a_device_role_names_only_its_own_topics() -> None:
    topics = {(acl["acltype"], acl["topic"]) for acl in device_acls("cam-1")}
    assert topics == {("publishClientSend", "edgepack/v1/devices/cam-1/status"),
                      ("publishClientSend", "edgepack/v1/devices/cam-1/telemetry"),
                      ("subscribeLiteral", "edgepack/v1/devices/cam-1/desired"),
                      ("publishClientReceive", "edgepack/v1/devices/cam-1/desired")}
    assert [c["command"] for c in provision_commands("cam-1", "pw")] == [
        "deleteClient", "deleteRole", "createRole", "createClient"]


@pytest.mark.parametrize("user, action, topic, allowed", [
    ("cam-1", "pub", "edgepack/v1/devices/cam-1/status", True),
    ("cam-1", "pub", "edgepack/v1/devices/cam-2/status", False),
    ("cam-1", "pub", "edgepack/v1/devices/cam-1/desired", False),
    ("cam-1", "sub", "edgepack/v1/devices/cam-1/desired", True),
    ("cam-1", "sub", "edgepack/#", False),
    ("cam-1", "sub", "edgepack/v1/devices/+/desired", False),
    ("edgepack-fleet", "pub", "edgepack/v1/devices/cam-2/desired", True),
    ("edgepack-fleet", "pub", "edgepack/v1/devices/cam-2/status", False),
    ("edgepack-fleet", "sub", "edgepack/v1/devices/+/telemetry", True),
    ("edgepack-fleet", "sub", "$share/fleet/edgepack/v1/devices/+/status", True),
    ("edgepack-fleet", "sub", "#", False),
    (None, "sub", "edgepack/v1/devices/cam-1/desired", False),
])
def test_rights(user, action, topic, allowed) -> None:
    assert (may_publish if action == "pub" else may_subscribe)(user, topic) is allowed


def test_a_wildcard_request_is_not_covered_by_a_narrower_pattern() -> None:
    assert topic_matches("a/+/c", "a/b/c") and not topic_matches("a/+/c", "a/#")
    assert topic_matches("a/#", "a/b/c") and not topic_matches("a/b", "a/b/c")


def test_broker_config_starts_a_mosquitto_that_refuses_anonymous_clients(tmp_path) -> None:
    out, port = tmp_path / "broker", free_port()
    result = CliRunner().invoke(root_app, ["fleet", "broker-config", "--out", str(out), "--port", str(port)])
    assert result.exit_code == 0, result.output
    password = (out / "fleet-mqtt-password").read_text().strip()
    assert (out / "fleet-mqtt-password").stat().st_mode & 0o077 == 0
    assert "allow_anonymous false" in (out / "mosquitto.conf").read_text()
    assert json.loads((out / "dynamic-security.json").read_text())["clients"][0]["username"] == "edgepack-fleet"
    again = CliRunner().invoke(root_app, ["fleet", "broker-config", "--out", str(out)])
    assert again.exit_code != 0  # never overwritten: it holds every enrolled device's identity
    assert "holds the broker's device identities" in str(again.exception) + again.output

    config = out / "mosquitto.conf"
    config.write_text(config.read_text().replace(f"listener {port}", f"listener {port} 127.0.0.1") + "user root\n")
    broker = subprocess.Popen([find_mosquitto(), "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        answers: list[str] = []
        for username, secret in ((None, None), ("edgepack-fleet", "wrong"), ("edgepack-fleet", password)):
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"probe-{len(answers)}")
            if username:
                client.username_pw_set(username, secret)
            client.on_connect = lambda c, u, f, rc, p: answers.append(str(rc))
            deadline = time.monotonic() + 10
            while True:
                try:
                    client.connect("127.0.0.1", port)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            count = len(answers)
            client.loop_start()
            while len(answers) == count and time.monotonic() < deadline:
                time.sleep(0.02)
            client.loop_stop()
            client.disconnect()
        assert answers == ["Not authorized", "Not authorized", "Success"]
        identities = DynsecIdentities(MqttEndpoint.from_url(f"mqtt://edgepack-fleet:{password}@127.0.0.1:{port}"))
        identities.provision("cam-1", "pw")
        identities.provision("cam-2", "pw")  # the second change reuses the connection the first one opened
        identities.close()
        assert "cam-1" in (out / "dynamic-security.json").read_text()  # the plugin saved the new identity
    finally:
        broker.terminate()
        broker.wait(10)


def test_an_unreachable_broker_is_one_line() -> None:
    identities = DynsecIdentities(MqttEndpoint.from_url(f"mqtt://edgepack-fleet:x@127.0.0.1:{free_port()}"), timeout_s=1)
    with pytest.raises(BrokerUnavailable, match="did not take the device identity change"):
        identities.provision("cam-1", "pw")
