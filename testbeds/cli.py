"""`edgepack testbed run SCENARIO --devices N`: a simulated fleet against a real broker and fleet server."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(help="Simulated fleets that exercise rollouts, gates and faults end to end.", no_args_is_help=True)
console = Console(stderr=True, highlight=False, soft_wrap=True)
# A testbed builds releases, serves a fleet and runs agents: it needs all three extras.
EXTRAS = ("builder", "fleet", "agent")


@app.command("list")
def list_scenarios() -> None:
    """The bundled scenarios."""
    from testbeds.sim import list_scenarios as names, load_scenario

    for name in names():
        console.print(f"[bold]{name}[/bold]: {load_scenario(name).description}")


@app.command("run")
def run(
    scenario: str = typer.Argument(..., help="Scenario name (edgepack testbed list) or path to a scenario YAML."),
    devices: Optional[int] = typer.Option(None, "--devices", "-n", help="Number of simulated devices (default: the scenario's)."),
    mqtt_url: Optional[str] = typer.Option(None, "--mqtt-url", help="Use this broker instead of starting Mosquitto."),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="Keep state here (default: a temporary folder)."),
    json_output: bool = typer.Option(False, "--json", help="Print the result as one JSON document on stdout."),
    per_process: int = typer.Option(250, "--per-process", min=1,
                                    help="Devices per process; larger fleets run the rest in worker processes "
                                         "(paho-mqtt's select() loop holds about 300 clients per process)."),
    tls: bool = typer.Option(False, "--tls", help="mqtts:// and HTTPS on loopback with a lab CA made for the run."),
    max_bake: Optional[float] = typer.Option(None, "--max-bake", min=0.0,
                                             help="Override the scenario's maximum bake in seconds (its six looks come closer together)."),
) -> None:
    """Run a scenario: build releases, start a broker, a fleet and N agents, roll out, inject faults, report."""
    import logging

    # The builder, the fleet and the agent, imported before anything starts: without one of their extras
    # the run ends in one line naming it instead of after building releases.
    import builder.pipeline  # noqa: F401
    import device_agent.agent  # noqa: F401
    import fleet.app  # noqa: F401
    from testbeds.sim import SimulatedFleet, load_scenario

    logging.basicConfig(level=logging.ERROR)
    _raise_open_file_limit()
    spec = load_scenario(scenario)
    if max_bake is not None:
        if spec.rollout is None or max_bake < spec.rollout.bake_s:
            raise typer.BadParameter(f"--max-bake {max_bake:g}: the scenario has no rollout, or it bakes longer "
                                     f"({spec.rollout.bake_s if spec.rollout else 0:g} s)")
        spec = spec.model_copy(update={"rollout": spec.rollout.model_copy(update={"max_bake_s": max_bake})})
    count = devices or spec.devices.count
    folder = work_dir or Path(tempfile.mkdtemp(prefix=f"edgepack-testbed-{spec.name}-"))
    console.print(f"[bold]{spec.name}[/bold] with {count} devices: {spec.description}")
    fleet = SimulatedFleet(spec, count, folder, mqtt_url=mqtt_url, per_process=per_process, tls=tls,
                           on_event=lambda t, text: console.print(f"[dim]{t:7.1f}s[/dim]  {text}"))
    result = fleet.run()
    rollout = result["rollout"]
    if rollout:
        console.print(f"final decision: [bold]{rollout['status']}[/bold] "
                      + " ".join(f"{w['percent']:g}%→{w['decision'] or '—'}" for w in rollout["waves"]))
    if result["alerts"]:
        console.print(f"alerts: {len(result['alerts'])}; webhook calls: {result['webhook_calls']}")
    messages = result.get("messages") or {}
    if messages and result["duration_s"]:
        total = sum(messages.values())
        console.print(f"fleet MQTT messages: {messages.get('status', 0):.0f} status, {messages.get('telemetry', 0):.0f} telemetry, "
                      f"{messages.get('desired', 0):.0f} desired = {total / result['duration_s']:.0f} msg/s over the run")
    if result.get("broker_msg_per_s"):
        rates = result["broker_msg_per_s"]
        console.print(f"broker during the rollout ({result['rollout_s']} s): {rates.get('received', 0):g} msg/s received, "
                      f"{rates.get('sent', 0):g} msg/s sent")
    console.print(_describe_fidelity(result["fidelity"]))
    console.print(f"converged: {result['converged']}; expectation met: {result['expectation_met']}; {result['duration_s']} s")
    if result["saturated"]:
        console.print(f"[bold red]{result['fidelity']['reason']}[/bold red]")
    if json_output:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    # 3, not 1: a saturated host says nothing about the release, so a script must not read it as a failed expectation
    raise typer.Exit(3 if result["saturated"] else 0 if result["expectation_met"] else 1)


def _describe_fidelity(report: dict) -> str:
    """One line: each profile's real part of the latency against its simulated one, and the workload's rate."""
    parts = []
    for profile, row in report["profiles"].items():
        if row["requests"]:
            parts.append(f"{profile} real part p50 {row['real_part_p50_ms']:.2f} / p95 {row['real_part_p95_ms']:.2f} ms of "
                         f"{row['claimed_ms']:g} ms simulated ({row['judged_on']} {row['distortion'] * 100:.1f} %, {row['requests']} requests)")
        else:
            parts.append(f"{profile} answered no request")
    rate = report["rate"]
    parts.append(f"workload {rate['achieved_hz']:g} of {rate['planned_hz']:g} req/s planned")
    verdict = "[green]faithful[/green]" if report["ok"] else "[red]saturated[/red]"
    return f"fidelity: {'; '.join(parts)} — {verdict}"


def _raise_open_file_limit() -> None:
    """Hundreds of agents in one process (and the broker it starts) hold thousands of sockets and files."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
