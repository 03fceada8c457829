"""A process that installs bundles and gets killed: `python -m tests.device_agent.install_child SPEC_JSON`.

SPEC: {"state_dir", "public_key", "fleet_url", "credential", "refs": [BundleRef json, …],
       "kill_at": fault point or null, "loop": bool}. With `kill_at`, it SIGKILLs itself at that point
of installing refs[0]; with `loop`, it installs the refs in turn until it is killed from outside.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from device_agent.downloader import Downloader, DownloadSettings
from device_agent.fleet_api import FleetClient
from device_agent.installer import Installer
from device_agent.state import AgentState
from edgepack.protocol import BundleRef
from edgepack.signing import load_public_key


def main() -> int:
    spec = json.loads(sys.argv[1])
    kill_at = spec.get("kill_at")

    def fault(point: str) -> None:
        if point == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    state = AgentState(Path(spec["state_dir"]), [load_public_key(Path(spec["public_key"]))], fault=fault)
    state.recover()
    downloader = Downloader(state.downloads_dir, FleetClient(spec["fleet_url"], "dev-1", credential=spec["credential"]),
                            DownloadSettings(backoff_s=0.01, retries=2, timeout_s=5, chunk_bytes=4096))
    installer = Installer(state, downloader, profile="rpi4", selftest_timeout_s=30)
    refs = [BundleRef.model_validate(ref) for ref in spec["refs"]]
    if not spec.get("loop"):
        outcome = installer.install(refs[0])
        print(json.dumps({"phase": outcome.phase, "error": outcome.error}))
        return 0
    print("ready", flush=True)
    index = 0
    while True:
        outcome = installer.install(refs[index % len(refs)])
        print(json.dumps({"phase": outcome.phase, "error": outcome.error}), flush=True)
        index += 1


if __name__ == "__main__":
    sys.exit(main())
