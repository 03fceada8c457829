"""Who may speak on the device plane, enforced by the broker (DESIGN.md "Security of the device plane").

    device {id}  (username = id, password = its HTTP credential)   publish …/{id}/status, …/{id}/telemetry;
                                                                    subscribe (and receive) …/{id}/desired
    the fleet    (username `edgepack-fleet`)                        publish …/+/desired; read every device topic
    anyone else                                                     refused at CONNECT

`rights` holds the rules once; `dynsec` applies them to Mosquitto's dynamic security plugin, the embedded
broker (fleet/embedded_broker.py) checks them itself, `config` writes a production Mosquitto config.
The fleet tells the broker about identities through a `DeviceIdentities` (enroll, rotate, revoke).
"""

from __future__ import annotations

from typing import Protocol


class DeviceIdentities(Protocol):
    """The broker side of a device credential's life: called by fleet.services.devices."""

    def provision(self, device_id: str, password: str) -> None:
        """Create the device's MQTT identity, or replace its password; a session under the old one is closed."""

    def revoke(self, device_id: str) -> None:
        """Delete the device's MQTT identity and close its open session."""


class NoBrokerIdentities:
    """A broker the fleet does not manage (anonymous, or identities kept by someone else): nothing to do."""

    def provision(self, device_id: str, password: str) -> None:
        return None

    def revoke(self, device_id: str) -> None:
        return None


__all__ = ["DeviceIdentities", "NoBrokerIdentities"]
