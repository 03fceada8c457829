"""A worker process of the simulated fleet: runs a slice of the devices (agents, simulated device speed,
workload) until it is terminated. Started by `testbeds.sim.SimulatedFleet` for fleets larger than one
process holds (paho-mqtt's select() loop limits a process to about 300 clients)."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    from testbeds.fleet_harness import agent_configs
    from testbeds.sim import Scenario, SimulatedFleet

    spec = json.loads(argv[0])
    scenario = Scenario.model_validate(spec["scenario"])
    root = Path(spec["root"])
    fleet = SimulatedFleet(scenario, spec["count"], root)
    fleet._t0 = time.monotonic()
    fleet.baseline_ids, fleet.candidate_ids = spec["baseline_ids"], spec["candidate_ids"]
    agents = agent_configs(root, spec["count"], spec["profiles"], spec["fleet_url"], spec["mqtt_url"], spec["token"],
                           Path(spec["public"]), extra=spec["agent_extra"], start=spec["start"])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    for agent in agents:
        agent.start()
        fleet._hook(agent)
    workload = fleet._start_workload(agents, stop)
    while not stop.wait(1.0):
        pass
    workload.join(timeout=10)
    for agent in agents:
        agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
