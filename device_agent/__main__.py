"""`python -m device_agent --config agent.yaml`: the agent without the rest of the edgepack CLI."""

from __future__ import annotations

import argparse
import logging
import sys

from edgepack.errors import EdgepackError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m device_agent", description="Run the edgepack device agent.")
    parser.add_argument("--config", "-c", default="agent.yaml", help="the agent's config file")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from device_agent.agent import run_agent
    from device_agent.config import AgentConfig

    try:
        return run_agent(AgentConfig.from_yaml(args.config))
    except EdgepackError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
