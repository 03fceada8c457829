"""The production Mosquitto configuration: no anonymous clients, the dynamic security plugin holding the
fleet's identity, every device identity created by the fleet as it enrolls (fleet.broker.dynsec).

`edgepack fleet broker-config --out DIR` writes `mosquitto.conf`, `dynamic-security.json` (the plugin's
state: it rewrites this file on every change, so the broker needs write access to it) and
`fleet-mqtt-password` (mode 0600); `deploy/mosquitto.conf` is the same config for deploy/compose.yaml.
testbeds/mosquitto.py starts brokers in this mode for the tests.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from edgepack.errors import ConfigError
from edgepack.files import atomic_write
from fleet.broker.dynsec import bootstrap_config
from fleet.broker.rights import FLEET_USERNAME

PLUGIN_NAME = "mosquitto_dynamic_security.so"
# Debian/Ubuntu's mosquitto package, the eclipse-mosquitto image, a source build
PLUGIN_CANDIDATES = (f"/usr/lib/x86_64-linux-gnu/{PLUGIN_NAME}", f"/usr/lib/aarch64-linux-gnu/{PLUGIN_NAME}",
                     f"/usr/lib/{PLUGIN_NAME}", f"/usr/local/lib/{PLUGIN_NAME}")
DYNSEC_FILE = "dynamic-security.json"
CONFIG_FILE = "mosquitto.conf"
PASSWORD_FILE = "fleet-mqtt-password"


def find_dynsec_plugin() -> str:
    """The plugin's path on this machine: the known locations, then `dpkg -L mosquitto`."""
    for candidate in PLUGIN_CANDIDATES:
        if Path(candidate).is_file():
            return candidate
    if shutil.which("dpkg"):
        listed = subprocess.run(["dpkg", "-L", "mosquitto"], capture_output=True, text=True, check=False).stdout
        for line in listed.splitlines():
            if line.endswith(PLUGIN_NAME) and Path(line).is_file():
                return line
    raise ConfigError(f"Mosquitto's dynamic security plugin ({PLUGIN_NAME}) is not installed "
                      "(apt-get install mosquitto, or pass --plugin PATH)")


def mosquitto_config(*, plugin_path: str, dynsec_file: str, port: int = 1883, bind: str | None = None,
                     extra: str = "") -> str:
    """The broker config lines for a secured listener (TLS, when wanted, is added by the caller in `extra`)."""
    listener = f"listener {port}" + (f" {bind}" if bind else "")
    return (
        f"{listener}\n"
        "# no anonymous clients: every device connects as its id with its credential, the fleet as its own identity\n"
        "allow_anonymous false\n"
        "# device identities and their topic rights, created and deleted by the fleet over $CONTROL/dynamic-security/v1\n"
        f"plugin {plugin_path}\n"
        f"plugin_opt_config_file {dynsec_file}\n"
        "# answer at once: with Nagle's algorithm each PUBACK and dynsec response waits ~40 ms for a delayed ACK\n"
        "set_tcp_nodelay true\n"
        + extra
    )


@dataclass(frozen=True)
class BrokerConfigFiles:
    config: Path
    dynsec: Path
    password_file: Path
    fleet_username: str
    fleet_password: str


def write_broker_config(out: Path, *, plugin_path: str | None = None, port: int = 1883,
                        fleet_password: str | None = None, dynsec_path: str | None = None) -> BrokerConfigFiles:
    """Write the config, the plugin's bootstrap JSON and the fleet's password into `out`.

    An existing dynamic-security.json is never overwritten: it holds every enrolled device's identity.
    `dynsec_path` is where the broker will read it (e.g. `/mosquitto/config/…` inside a container)."""
    out.mkdir(parents=True, exist_ok=True)
    dynsec = out / DYNSEC_FILE
    password_file = out / PASSWORD_FILE
    if dynsec.exists():
        raise ConfigError(f"{dynsec} exists and holds the broker's device identities; "
                          "write the config into an empty folder")
    password = fleet_password or secrets.token_urlsafe(32)
    atomic_write(password_file, password + "\n", mode=0o600)
    atomic_write(dynsec, json.dumps(bootstrap_config(password), indent=2) + "\n", mode=0o600)
    config = out / CONFIG_FILE
    atomic_write(config, mosquitto_config(plugin_path=plugin_path or find_dynsec_plugin(),
                                          dynsec_file=dynsec_path or str(dynsec.resolve()), port=port))
    return BrokerConfigFiles(config=config, dynsec=dynsec, password_file=password_file,
                             fleet_username=FLEET_USERNAME, fleet_password=password)


__all__ = ["BrokerConfigFiles", "CONFIG_FILE", "DYNSEC_FILE", "PASSWORD_FILE", "find_dynsec_plugin",
           "mosquitto_config", "write_broker_config"]
