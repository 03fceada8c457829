"""A worker process of the simulated fleet: runs a slice of the devices (agents, simulated device speed,
workload at the per-device rate the parent chose within the host budget) until it is terminated. Started
by `testbeds.sim.SimulatedFleet` for fleets larger than one process holds (paho-mqtt's select() loop
limits a process to about 300 clients). On SIGTERM it writes its workload's summary (`WorkloadStats`) as
JSON to the path the parent gave, which reads it for the fidelity check after the worker exited."""

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
    workload = fleet._start_workload(agents, stop, spec["rate_hz"])
    while not stop.wait(1.0):
        pass
    workload.join(timeout=10)
    summary = Path(spec["summary"])
    temporary = summary.with_suffix(".tmp")
    temporary.write_text(json.dumps(fleet.workload_stats.to_json()))
    temporary.replace(summary)  # the parent reads a whole summary or none
    for agent in agents:
        agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
