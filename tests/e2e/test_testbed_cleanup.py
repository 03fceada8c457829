"""The simulated fleet stops everything it started when a step fails early: here the fleet refuses the first
upload (it accepts no bundle over 1 KiB), before any device starts. Broker and fleet server are real
child processes; after the failure neither may be left running."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fleet.client import FleetRequestFailed
from testbeds.sim import SimulatedFleet, load_scenario


def _children() -> dict[int, str]:
    """This process's live child processes: pid → command line (from /proc, zombies left out)."""
    children = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue  # it exited while we looked
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == os.getpid() and state != "Z":
            children[int(entry.name)] = cmdline
    return children


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_refused_upload_leaves_no_broker_or_fleet_process_running(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPACK_MAX_BUNDLE_BYTES", "1024")  # read by the fleet server the testbed starts
    running: dict[int, str] = {}

    def on_event(_t: float, text: str) -> None:
        if text.startswith("fleet at"):  # broker and fleet are up; the uploads come next
            running.update(_children())

    sim = SimulatedFleet(load_scenario("input-drift"), 2, tmp_path / "sim", on_event=on_event)
    with pytest.raises(FleetRequestFailed, match="413|larger"):
        sim.run()

    started = {pid: cmd for pid, cmd in running.items() if "mosquitto" in cmd or "fleet serve" in cmd}
    assert any("mosquitto" in cmd for cmd in started.values()), running
    assert any("fleet serve" in cmd for cmd in started.values()), running
    assert {pid: cmd for pid, cmd in started.items() if _alive(pid)} == {}
