"""`edgepack agent` commands: run the device agent, or show its state folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

app = typer.Typer(help="Run the device agent that installs what the fleet asks for.", no_args_is_help=True)
# The extras these commands need; the root CLI names them when one of their modules is missing.
EXTRAS = ("agent",)

_CONFIG_OPTION = typer.Option(Path("agent.yaml"), "--config", "-c", help="The agent's config file (agent.yaml).")


@app.command("run")
def run(
    config_path: Path = _CONFIG_OPTION,
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
) -> None:
    """Enroll on first start, then follow the fleet's desired state until SIGTERM."""
    # MQTT is imported only once enrolled; without it (no agent extra) the agent would spend its one-use
    # enrollment token and then fail, so it is imported here, before anything starts. The model runtimes stay
    # optional: a device reports the runtimes it has and refuses bundles for the others.
    import paho.mqtt.client  # noqa: F401

    from device_agent.agent import run_agent
    from device_agent.config import AgentConfig
    from edgepack.errors import ConfigError

    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        raise ConfigError(f"--log-level must be debug, info, warning or error, not {log_level!r}")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = AgentConfig.from_yaml(config_path)
    raise typer.Exit(run_agent(config))


@app.command("status")
def status(
    config_path: Path = _CONFIG_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of text."),
) -> None:
    """Show the active and previous bundle and the last desired state handled, from the state folder."""
    from device_agent.config import AgentConfig
    from device_agent.state import AgentState

    config = AgentConfig.from_yaml(config_path)
    document = AgentState(config.state_dir, trusted_keys=[]).describe()
    document["device_id"] = config.device_id
    if as_json:
        typer.echo(json.dumps(document, indent=2, sort_keys=True))
        return
    pointer, journal = document["pointer"], document["journal"]

    def describe(ref: dict | None) -> str:
        if not ref:
            return "none"
        record = document["slots"].get(ref["slot"]) or {}
        return f"{record.get('name', '?')} {record.get('version', '?')} (bundle {ref['bundle_id'][:12]}, slot {ref['slot']})"

    typer.echo(f"device:    {config.device_id}")
    typer.echo(f"active:    {describe(pointer['active'])}")
    typer.echo(f"previous:  {describe(pointer['previous'])}")
    last = "none" if journal["last_seq"] < 0 else f"seq {journal['last_seq']} → {journal['phase']}"
    typer.echo(f"last desired state: {last}" + (f" ({journal['error']})" if journal.get("error") else ""))
