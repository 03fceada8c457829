"""Issue 10 item 2, end to end on loopback: a Mosquitto TLS listener and `edgepack fleet serve` over HTTPS,
certificates from the lab CA (`edgepack certs`); real agents enroll over HTTPS, receive a desired state over
mqtts, download and install a bundle over HTTPS. The fleet and agents given the wrong CA refuse with one line.

Two CAs, as a site may have: one signed the fleet's certificate, the other the broker's (the agents trust both
through one PEM bundle). So an agent trusting only the fleet's CA enrolls, then refuses the broker, which shows
that both planes are verified on their own."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from edgepack.signing import generate_keypair
from edgepack.tls import create_lab_ca, issue_certificate
from testbeds.fleet_harness import FleetProcess, agent_configs, build_release, wait_for
from testbeds.mosquitto import BrokerTls, MosquittoBroker, free_port
from tests.support import REPO, run_cli

PROFILE = "x86-avx2"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    for ca, name in (("fleet-ca", "fleet"), ("broker-ca", "broker")):
        create_lab_ca(root / ca, common_name=f"{ca} (edgepack lab)")
        issue_certificate(root / ca, name)
    create_lab_ca(root / "other-ca")
    trust = root / "trust.pem"  # what the agents trust: both CAs
    trust.write_text((root / "fleet-ca" / "ca.pem").read_text() + (root / "broker-ca" / "ca.pem").read_text())
    return root


def _agent_run(tmp_path, name: str, fleet_url: str, mqtt_url: str, token: str, ca_file, pub) -> subprocess.CompletedProcess:
    """`edgepack agent run` as a device runs it; returns once the process ended (here: refused)."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "agent.yaml").write_text(yaml.safe_dump({
        "device_id": name, "profile": PROFILE, "fleet_url": fleet_url, "mqtt_url": mqtt_url, "enrollment_token": token,
        "state_dir": str(folder / "state"), "trusted_keys": [str(pub)], "ca_file": str(ca_file)}))
    return subprocess.run([sys.executable, "-m", "edgepack", "agent", "run", "-c", str(folder / "agent.yaml")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_agents_fleet_and_broker_over_tls_and_wrong_cas_refused_in_one_line(tmp_path, pki):
    private, public = generate_keypair(tmp_path / "keys")
    (bundle,) = build_release(tmp_path, private, "1.0.0", [PROFILE])
    broker_tls = BrokerTls(pki / "broker-ca" / "ca.pem", pki / "broker-ca" / "broker.pem", pki / "broker-ca" / "broker.key")
    fleet_tls = (pki / "fleet-ca" / "fleet.pem", pki / "fleet-ca" / "fleet.key", pki / "fleet-ca" / "ca.pem")
    with MosquittoBroker(tls=broker_tls) as broker:
        assert broker.url.startswith("mqtts://")

        # The fleet refuses a broker its --mqtt-ca does not vouch for, before anything starts.
        refused = run_cli("fleet", "serve", "--port", str(free_port()), "--data-dir", str(tmp_path / "refused-data"),
                          "--mqtt-url", broker.url, "--mqtt-ca", str(pki / "fleet-ca" / "ca.pem"),
                          "--trusted-key", str(public), env={"EDGEPACK_ADMIN_TOKEN": "tls-e2e-admin-token-0123456789"})
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.strip().splitlines()[-1] == (
            f"error: broker certificate not trusted by CA {pki / 'fleet-ca' / 'ca.pem'}: "
            f"self-signed certificate in certificate chain ({broker.url})")

        with FleetProcess(tmp_path, broker.url, trusted_key=public, tls=fleet_tls,
                          extra_args=["--mqtt-ca", str(broker_tls.cafile)]) as fleet:
            assert fleet.url.startswith("https://")
            # The operator CLI reaches the HTTPS API with the CA in SSL_CERT_FILE (httpx reads it).
            env = {"EDGEPACK_FLEET_URL": fleet.url, "EDGEPACK_TOKEN": fleet.admin_token, "SSL_CERT_FILE": str(fleet_tls[2])}
            pushed = run_cli("fleet", "push", str(bundle), "--json", env=env)
            assert pushed.returncode == 0, pushed.stderr
            bundle_id = yaml.safe_load(pushed.stdout)["id"]
            token = run_cli("devices", "enroll-token", "--labels", "site=lab", "--uses", "4", env=env)
            assert token.returncode == 0, token.stderr
            token = token.stdout.strip()

            # Wrong CA for the fleet: enrollment over HTTPS refuses the server, one line, exit 2, token unspent.
            lost = _agent_run(tmp_path, "cam-lost", fleet.url, broker.url, token, pki / "other-ca" / "ca.pem", public)
            assert lost.returncode == 2, lost.stderr
            assert re.fullmatch(rf"error: fleet certificate not trusted by CA {re.escape(str(pki / 'other-ca' / 'ca.pem'))}: "
                                rf"[^\n]+ \({re.escape(fleet.url)}\)", lost.stderr.strip().splitlines()[-1]), lost.stderr
            # Trusting the fleet's CA only: it enrolls over HTTPS, then refuses the broker's certificate.
            half = _agent_run(tmp_path, "cam-half", fleet.url, broker.url, token, fleet_tls[2], public)
            assert half.returncode == 2, half.stderr
            # (the URL names the device's MQTT identity, never its password)
            assert half.stderr.strip().splitlines()[-1] == (
                f"error: broker certificate not trusted by CA {fleet_tls[2]}: self-signed certificate in certificate "
                f"chain ({broker.url.replace('://', '://cam-half:***@')})"), half.stderr
            assert (tmp_path / "cam-half" / "state" / "credential").exists()

            # Real agents trusting both CAs: enroll, connect over mqtts, install what the fleet asks for.
            agents = agent_configs(tmp_path, 2, [PROFILE], fleet.url, broker.url, token, public,
                                   extra={"ca_file": str(pki / "trust.pem")})
            try:
                for agent in agents:
                    agent.start()
                for agent in agents:
                    wait_for(lambda: agent.agent is not None and agent.agent.is_connected(), 60,
                             what=f"{agent.device_id} connected over mqtts")
                listed = run_cli("devices", "list", "--selector", "site=lab", "--json", env=env)
                enrolled = {d["id"] for d in yaml.safe_load(listed.stdout)}
                assert {"dev-000", "dev-001", "cam-half"} <= enrolled and "cam-lost" not in enrolled
                started = run_cli("rollout", "start", bundle_id[:12], "--selector", "site=lab", "--waves", "100",
                                  "--gate", "install_failure_ratio<=1", "--bake", "1s", "--json", env=env)
                assert started.returncode == 0, started.stderr
                for agent in agents:
                    wait_for(lambda: agent.active_version() == bundle_id, 120,
                             what=f"{agent.device_id} to install the bundle over HTTPS")
            finally:
                for agent in agents:
                    agent.stop()
