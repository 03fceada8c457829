"""`edgepack rollout start|status|list|pause|resume|abort|rollback`."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from edgepack.durations import parse_duration
from edgepack.errors import ConfigError
from edgepack.selectors import parse_selector
from fleet.cli.options import TOKEN, URL

app = typer.Typer(help="Roll a bundle out in percentage waves; follow, pause, abort or roll back.", no_args_is_help=True)
console = Console(highlight=False, soft_wrap=True)
FINAL = {"succeeded", "rolled_back", "aborted", "failed"}


def parse_waves(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"invalid waves {text!r}: use e.g. 10,50,100") from None


def render(status: dict[str, Any]) -> Group:
    bundle = status.get("bundle", {})
    head = Table.grid(padding=(0, 2))
    head.add_row("rollout", status["id"], "status", f"[bold]{status['status']}[/bold]")
    head.add_row("bundle", f"{bundle.get('name', '')} {bundle.get('version', '')} ({bundle.get('id', '')[:12]})",
                 "gates", ", ".join(status.get("gates", [])))
    waves = Table(title="waves", title_justify="left")
    for column in ("#", "percent", "members", "state", "phases", "decision"):
        waves.add_column(column)
    for wave in status.get("waves", []):
        phases = ", ".join(f"{k} {v}" for k, v in wave.get("counts", {}).items())
        waves.add_row(str(wave["index"]), f"{wave['percent']:g}%", str(wave["members"]), wave["state"], phases, wave.get("decision") or "")
    holdback = status.get("holdback") or {}
    if holdback.get("members"):
        phases = ", ".join(f"{k} {v}" for k, v in holdback.get("counts", {}).items())
        waves.add_row(str(holdback["index"]), "hold-back", str(holdback["members"]), holdback["state"], phases,
                      holdback.get("decision") or "")
    decisions = Table(title="decisions", title_justify="left")
    for column in ("wave", "decision", "by", "evidence"):
        decisions.add_column(column)
    for d in status.get("decisions", []):
        evidence = d.get("evidence", {})
        decisions.add_row(str(d["wave"]), d["decision"], d.get("actor", ""), evidence.get("reason") or json.dumps(evidence)[:120])
    members = Table(title="members", title_justify="left")
    for column in ("device", "profile", "wave", "phase", "error"):
        members.add_column(column)
    for m in status.get("members", []):
        members.add_row(m["device_id"], m.get("profile", ""), str(m["wave"]), m["phase"], m.get("error") or "")
    return Group(head, waves, decisions, evidence_table(status), members)


def _fmt(value: Any, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def evidence_table(status: dict[str, Any]) -> Table:
    """The latest decision's checks, one row per gate and profile: outcome, the two sides, the estimate with
    its interval against the limit, the p-value, and n (devices/windows/inferences) on both sides."""
    latest = (status.get("decisions") or [{}])[-1]
    evidence = latest.get("evidence") or {}
    looks = evidence.get("looks") or {}
    title = f"evidence of wave {latest.get('wave', '')} ({latest.get('decision', '')})"
    if looks.get("current"):
        title += f", look {looks['current']} of {len(looks.get('at_s') or [])} at α {looks.get('alpha_per_look')}"
    table = Table(title=title, title_justify="left")
    for column in ("gate", "profile", "outcome", "treatment", "control", "estimate [interval] vs limit", "p", "n treatment", "n control"):
        table.add_column(column)
    for check in evidence.get("checks", []):
        test = check.get("test") or {}
        if test.get("estimate") is not None:
            estimate = f"{_fmt(test['estimate'])} [{_fmt(test.get('low'))}, {_fmt(test.get('high'))}] vs {_fmt(test.get('limit'))}"
        else:
            estimate = f"{_fmt(check.get('value'))} vs {_fmt(check.get('limit'))}" if check.get("value") is not None else ""
        n_t = f"{check.get('reporting_devices', check.get('devices', ''))}/{check.get('windows', '')}/{check.get('inferences', '')}" \
            if "windows" in check else str(check.get("members", ""))
        n_c = (f"{check.get('control_reporting_devices', '')}/{check.get('control_windows', '')}/{check.get('control_inferences', '')}"
               if "control_windows" in check else "")
        outcome = check.get("outcome", "")
        if check.get("reason") and outcome != "pass":
            outcome += f" ({check['reason']})"
        table.add_row(check.get("gate", ""), check.get("profile", ""), outcome, _fmt(check.get("value"), 4),
                      _fmt(check.get("control"), 4), estimate, _fmt(test.get("p_value"), 2), n_t, n_c)
    table.caption = "n: devices/windows/inferences; interval at the look's level (see docs/ARCHITECTURE.md, judging a wave)"
    return table


def parse_window(text: str) -> dict:
    """'site=berlin@01:00-05:00/Europe/Berlin' → {selector, start, end, tz}; the server checks the values."""
    selector_text, at, times = text.rpartition("@")[0], "@" in text, text.rpartition("@")[2]
    span, _, tz = times.partition("/")
    start, dash, end = span.partition("-")
    if not at or not dash:
        raise typer.BadParameter(f"--window {text!r}: expected SELECTOR@HH:MM-HH:MM[/TZ]")
    return {"selector": parse_selector(selector_text) if selector_text else {}, "start": start, "end": end, "tz": tz or "UTC"}


@app.command("start")
def start(
    bundle: str = typer.Argument(..., help="Bundle id (or 8+ hex prefix), or a path to a .edgepack to upload first."),
    selector: Optional[str] = typer.Option(None, "--selector", "-l", help="Target devices by label, k=v,k2=v2."),
    waves: str = typer.Option("1,10,50,100", "--waves", help="Cumulative percentages."),
    gate: Optional[list[str]] = typer.Option(None, "--gate", help="Gate, e.g. 'install_failure_ratio<=0.1' (repeatable)."),
    bake: str = typer.Option("30s", "--bake", help="Time each wave bakes before its first decision."),
    max_bake: Optional[str] = typer.Option(None, "--max-bake", help="Longest a wave may stay inconclusive before the rollout pauses (default 10 bakes, at least bake + 60s)."),
    holdback: float = typer.Option(10.0, "--holdback", help="Percent of each profile kept on the old bundle through the last wave as its control (with relative gates)."),
    max_per_minute: Optional[int] = typer.Option(None, "--max-per-minute", min=1, help="Start at most this many devices in any minute."),
    max_concurrent: Optional[int] = typer.Option(None, "--max-concurrent", min=1, help="At most this many devices installing (downloading) at once."),
    window: Optional[list[str]] = typer.Option(None, "--window", help="Maintenance window 'SELECTOR@HH:MM-HH:MM[/TZ]', e.g. 'site=berlin@01:00-05:00/Europe/Berlin' ('@…' alone: every device); repeatable."),
    late_joiners: str = typer.Option("current_wave", "--late-joiners", help="Devices enrolling or matching mid-rollout: current_wave, last_wave or none."),
    min_reports: int = typer.Option(1, "--min-reports", help="Devices that must report before a decision."),
    install_timeout: str = typer.Option("5m", "--install-timeout", help="A device that has not installed by then counts as timed out."),
    json_output: bool = typer.Option(False, "--json"),
    fleet_url: Optional[str] = URL,
    token: Optional[str] = TOKEN,
) -> None:
    """Start a rollout of a bundle (its release: same name and version for each profile) to matching devices."""
    from fleet.client import FleetClient

    client = FleetClient(fleet_url, token)
    bundle_id = bundle
    if bundle.endswith(".edgepack") or Path(bundle).is_file():
        bundle_id = client.upload(Path(bundle))["id"]
    body = {"bundle_id": bundle_id, "selector": parse_selector(selector), "waves": parse_waves(waves), "gates": list(gate or []),
            "bake_s": parse_duration(bake), "min_reports": min_reports, "install_timeout_s": parse_duration(install_timeout),
            "holdback_percent": holdback, **({"max_bake_s": parse_duration(max_bake)} if max_bake else {}),
            "max_per_minute": max_per_minute, "max_concurrent": max_concurrent,
            "maintenance_windows": [parse_window(text) for text in window or []], "late_joiners": late_joiners}
    status = client.request("POST", "/rollouts", json=body)
    if json_output:
        sys.stdout.write(json.dumps(status, indent=2) + "\n")
    else:
        console.print(f"rollout {status['id']} started: {status.get('members_total', 0)} devices in waves "
                      + ",".join(f"{w:g}" for w in status["waves"]) + f"%  (follow with `edgepack rollout status {status['id']} --watch`)")


@app.command("status")
def status(
    rollout_id: str = typer.Argument(..., help="Rollout id."),
    watch: bool = typer.Option(False, "--watch", "-w", help="Follow it live until it ends."),
    interval: float = typer.Option(1.0, "--interval", help="Seconds between refreshes with --watch."),
    json_output: bool = typer.Option(False, "--json"),
    fleet_url: Optional[str] = URL,
    token: Optional[str] = TOKEN,
) -> None:
    """Waves, members and decisions with their evidence."""
    from fleet.client import FleetClient

    client = FleetClient(fleet_url, token)
    current = client.request("GET", f"/rollouts/{rollout_id}")
    if json_output and not watch:
        sys.stdout.write(json.dumps(current, indent=2) + "\n")
        return
    if not watch:
        console.print(render(current))
        return
    with Live(render(current), console=console, refresh_per_second=4) as live:
        while current["status"] not in FINAL and not _paused_by_controller(current):
            time.sleep(interval)
            current = client.request("GET", f"/rollouts/{rollout_id}")
            live.update(render(current))
    if json_output:
        sys.stdout.write(json.dumps(current, indent=2) + "\n")
    if current["status"] == "paused":
        console.print(f"rollout {rollout_id} paused: {current['decisions'][-1]['evidence'].get('reason', '')}; "
                      "look at the evidence, then resume (re-bakes the wave), rollback or abort")
        raise typer.Exit(2)
    raise typer.Exit(0 if current["status"] == "succeeded" else 1)


def _paused_by_controller(status: dict[str, Any]) -> bool:
    """Paused because a wave stayed inconclusive: nothing changes until a person acts, so stop watching."""
    decisions = status.get("decisions") or []
    return status["status"] == "paused" and bool(decisions) and decisions[-1]["decision"] == "pause"


@app.command("list")
def list_rollouts(
    json_output: bool = typer.Option(False, "--json"),
    fleet_url: Optional[str] = URL,
    token: Optional[str] = TOKEN,
) -> None:
    """Every rollout, newest first."""
    from fleet.client import FleetClient

    rollouts = FleetClient(fleet_url, token).request("GET", "/rollouts")
    if json_output:
        sys.stdout.write(json.dumps(rollouts, indent=2) + "\n")
        return
    table = Table(title=f"{len(rollouts)} rollouts", title_justify="left")
    table.add_column("id", no_wrap=True)
    for column in ("status", "bundle", "waves", "wave", "members"):
        table.add_column(column)
    for r in rollouts:
        b = r.get("bundle", {})
        table.add_row(r["id"], r["status"], f"{b.get('name', '')} {b.get('version', '')}", ",".join(f"{w:g}" for w in r["waves"]),
                      str(r["current_wave"]), str(r.get("members_total", "")))
    console.print(table)


def _action(name: str):
    def command(
        rollout_id: str = typer.Argument(..., help="Rollout id."),
        json_output: bool = typer.Option(False, "--json"),
        fleet_url: Optional[str] = URL,
        token: Optional[str] = TOKEN,
    ) -> None:
        from fleet.client import FleetClient

        result = FleetClient(fleet_url, token).request("POST", f"/rollouts/{rollout_id}/{name}")
        if json_output:
            sys.stdout.write(json.dumps(result, indent=2) + "\n")
        else:
            console.print(f"rollout {rollout_id}: {result['status']}")

    command.__doc__ = {"pause": "Stop starting new waves (installs in flight finish).",
                       "resume": "Continue a paused rollout; the current wave bakes and is judged again from now.",
                       "abort": "Stop the rollout where it is; devices keep what they run.",
                       "rollback": "Send every device the rollout touched back to its previous bundle."}[name]
    return command


for _name in ("pause", "resume", "abort", "rollback"):
    app.command(_name)(_action(_name))
