"""Mosquitto's dynamic security plugin (`mosquitto_dynamic_security.so`), managed by the fleet.

The fleet connects as its own identity, which holds the `edgepack-admin` role (publish on
`$CONTROL/dynamic-security/v1`, read `$CONTROL/dynamic-security/v1/response`), and sends one JSON command
batch per change; every command carries a `correlationData` so its answer is found among the responses.

Per-device rights are one role per device, `edgepack-device:{id}`, whose ACLs name the literal device id:
Mosquitto 2.0.11's dynsec does not substitute `%u`/`%c` in ACL topics (tried: a role with
`edgepack/v1/devices/%u/status` let device A publish nothing, the literal topic works), so a shared role
with patterns would not do. Deleting a client makes Mosquitto disconnect its open sessions at once
(`deleteClient` kicks by username), which is how a revocation closes the device's MQTT session.

Passwords in the bootstrap JSON are stored as Mosquitto does: PBKDF2-SHA512 over a 12-byte salt, 101
iterations, both base64 (`password_entry`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import threading
from typing import Any

from edgepack.errors import BrokerUnavailable
from edgepack.mqtt import MqttEndpoint
from fleet.broker.rights import (
    FLEET_PUBLISH, FLEET_SUBSCRIBE, FLEET_USERNAME, device_publish_topics, device_subscribe_topics,
)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = "$CONTROL/dynamic-security/v1/response"
ADMIN_ROLE = "edgepack-admin"
FLEET_ROLE = "edgepack-fleet"
DEVICE_ROLE_PREFIX = "edgepack-device:"
PBKDF2_ITERATIONS = 101  # what mosquitto_ctrl and the plugin write


def device_role_name(device_id: str) -> str:
    return DEVICE_ROLE_PREFIX + device_id


def _acl(acltype: str, topic: str) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "allow": True}


def device_acls(device_id: str) -> list[dict[str, Any]]:
    """The device may send its status and telemetry and subscribe to (and receive) its own desired state."""
    acls = [_acl("publishClientSend", topic) for topic in device_publish_topics(device_id)]
    for topic in device_subscribe_topics(device_id):
        acls += [_acl("subscribeLiteral", topic), _acl("publishClientReceive", topic)]
    return acls


def fleet_acls() -> list[dict[str, Any]]:
    acls = [_acl("publishClientSend", topic) for topic in FLEET_PUBLISH]
    for topic in FLEET_SUBSCRIBE:
        acls += [_acl("subscribePattern", topic), _acl("publishClientReceive", topic)]
    return acls + [_acl("unsubscribePattern", "#")]


def admin_acls() -> list[dict[str, Any]]:
    return [_acl("publishClientSend", CONTROL_TOPIC), _acl("subscribeLiteral", RESPONSE_TOPIC),
            _acl("publishClientReceive", RESPONSE_TOPIC)]


def password_entry(password: str, *, salt: bytes | None = None) -> dict[str, Any]:
    """`password`, `salt`, `iterations` of a client in the plugin's JSON file."""
    salt = salt if salt is not None else os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, PBKDF2_ITERATIONS)
    return {"password": base64.b64encode(digest).decode("ascii"), "salt": base64.b64encode(salt).decode("ascii"),
            "iterations": PBKDF2_ITERATIONS}


def bootstrap_config(fleet_password: str, *, fleet_username: str = FLEET_USERNAME) -> dict[str, Any]:
    """The plugin's JSON file before any device enrolled: the fleet identity (fleet + admin roles), nothing
    allowed by default. `publishClientReceive` is denied by default too, so a client receives only what its
    role names (the plugin's own default lets everyone receive what they managed to subscribe to)."""
    return {
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False, "subscribe": False,
                             "unsubscribe": True},
        "clients": [{"username": fleet_username, "textname": "edgepack fleet server",
                     "roles": [{"rolename": FLEET_ROLE}, {"rolename": ADMIN_ROLE}], **password_entry(fleet_password)}],
        "groups": [],
        "roles": [{"rolename": FLEET_ROLE, "acls": fleet_acls()}, {"rolename": ADMIN_ROLE, "acls": admin_acls()}],
    }


def provision_commands(device_id: str, password: str) -> list[dict[str, Any]]:
    """Replace whatever the broker knows of the device by a fresh identity and role: the deletes may fail
    (a first enrollment), the creates must not. Deleting first also disconnects a session under the old
    password, as a rotation should."""
    role = device_role_name(device_id)
    return [
        {"command": "deleteClient", "username": device_id},
        {"command": "deleteRole", "rolename": role},
        {"command": "createRole", "rolename": role, "acls": device_acls(device_id)},
        {"command": "createClient", "username": device_id, "password": password, "roles": [{"rolename": role}]},
    ]


def revoke_commands(device_id: str) -> list[dict[str, Any]]:
    return [{"command": "deleteClient", "username": device_id},
            {"command": "deleteRole", "rolename": device_role_name(device_id)}]


_MAY_FAIL = {"deleteClient", "deleteRole"}  # "not found" is what an absent identity answers


class _Batch:
    """One command batch waiting for its answers (matched by correlationData)."""

    def __init__(self, wanted: set[str]) -> None:
        self.wanted = wanted
        self.answers: dict[str, dict[str, Any]] = {}
        self.done = threading.Event()


class DynsecClient:
    """Sends command batches to the plugin over one MQTT connection of its own, opened on first use and kept
    (paho reconnects it), apart from the bridge's session and threads. A short connection per batch cost ~45 ms,
    and enrollments, which hold a database transaction around it, queued behind each other for that long."""

    def __init__(self, endpoint: MqttEndpoint, *, timeout_s: float = 5.0) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._lock = threading.Lock()  # guards _client and _batches
        self._client: Any = None
        self._subscribed = threading.Event()
        self._refused: list[str] = []
        self._batches: dict[str, _Batch] = {}

    def execute(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Run the commands; their responses in the same order. BrokerUnavailable if the broker does not
        answer them all in time; a response may carry `error` (the caller decides)."""
        tagged = [{**command, "correlationData": secrets.token_hex(8)} for command in commands]
        batch = _Batch({command["correlationData"] for command in tagged})
        client = self._connected()
        with self._lock:
            for key in batch.wanted:
                self._batches[key] = batch
        try:
            client.publish(CONTROL_TOPIC, json.dumps({"commands": tagged}), qos=1)
            if not batch.done.wait(self.timeout_s):
                raise self._unavailable(self._refused[-1] if self._refused else "no answer to the commands")
        finally:
            with self._lock:
                for key in batch.wanted:
                    self._batches.pop(key, None)
        return [batch.answers[command["correlationData"]] for command in tagged]

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()

    def _connected(self) -> Any:
        """The client, connected and subscribed to the responses (connecting on first use)."""
        import paho.mqtt.client as mqtt

        with self._lock:
            if self._client is None:
                self._subscribed.clear()
                self._refused.clear()
                client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgepack-dynsec-{secrets.token_hex(4)}",
                                     protocol=mqtt.MQTTv311, clean_session=True)
                client.on_connect, client.on_subscribe = self._on_connect, self._on_subscribe
                client.on_message, client.on_disconnect = self._on_message, self._on_disconnect
                self.endpoint.apply(client)
                try:
                    client.connect(self.endpoint.host, self.endpoint.port, keepalive=30)
                except OSError as exc:
                    raise self._unavailable(exc.strerror or type(exc).__name__) from None
                client.loop_start()
                self._client = client
            client = self._client
        if not self._subscribed.wait(self.timeout_s):
            reason = self._refused[-1] if self._refused else "no answer to the subscription"
            self.close()  # the next call starts over with a fresh connection
            raise self._unavailable(reason)
        return client

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refused.append(str(reason_code))
            return
        client.subscribe(RESPONSE_TOPIC, qos=1)  # again on every reconnect: the session is clean

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if any(code.is_failure for code in reason_codes):
            self._refused.append("subscription to the dynsec responses refused")
            return
        self._subscribed.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._subscribed.clear()  # callers wait for the resubscription after paho reconnects

    def _on_message(self, client, userdata, message) -> None:
        try:
            responses = json.loads(message.payload).get("responses", [])
        except (ValueError, AttributeError):
            return
        with self._lock:
            for response in responses:
                key = response.get("correlationData") if isinstance(response, dict) else None
                batch = self._batches.get(key) if isinstance(key, str) else None
                if batch is not None:
                    batch.answers[key] = response
                    if batch.wanted <= batch.answers.keys():
                        batch.done.set()

    def _unavailable(self, reason: str) -> BrokerUnavailable:
        return BrokerUnavailable(f"MQTT broker {self.endpoint.redacted()} did not take the device identity change: "
                                 f"{reason}", url=self.endpoint.redacted())

    def run_checked(self, commands: list[dict[str, Any]]) -> None:
        """Execute; an error on a command that must succeed is BrokerUnavailable naming it."""
        for command, response in zip(commands, self.execute(commands)):
            if response.get("error") and command["command"] not in _MAY_FAIL:
                raise self._unavailable(f"{command['command']}: {response['error']}")


class DynsecIdentities:
    """`DeviceIdentities` for Mosquitto with the dynamic security plugin."""

    def __init__(self, endpoint: MqttEndpoint, *, timeout_s: float = 5.0) -> None:
        self.client = DynsecClient(endpoint, timeout_s=timeout_s)

    def provision(self, device_id: str, password: str) -> None:
        self.client.run_checked(provision_commands(device_id, password))

    def revoke(self, device_id: str) -> None:
        self.client.run_checked(revoke_commands(device_id))

    def close(self) -> None:
        self.client.close()


__all__ = ["ADMIN_ROLE", "CONTROL_TOPIC", "DEVICE_ROLE_PREFIX", "DynsecClient", "DynsecIdentities", "FLEET_ROLE",
           "RESPONSE_TOPIC", "admin_acls", "bootstrap_config", "device_acls", "device_role_name", "fleet_acls",
           "password_entry", "provision_commands", "revoke_commands"]
