"""Canary judgement benchmark: how often the gates catch a regression, and how often they roll back a good release.

Runs the simulated fleet (`edgepack testbed run SCENARIO --devices N --json`, each run a fresh broker, fleet
server and N real agents) repeatedly, interleaving the scenarios so a busy host hits every one alike:

  latency-regression   rpi5 answers 1.5x slower with the candidate; gate p95_latency_ms<=1.3x control
  healthy              the same rollout without the fault
  latency-minor        rpi5 1.1x slower under the same 1.3x gate (must not roll back)

and prints per fleet size and scenario:
  - detection rate: runs rolled back within the first two waves with rpi5 named and x86-avx2 not blamed
    (regression), and the wave it happened in;
  - false rollback rate: runs of a good release (healthy, latency-minor) that rolled back;
  - paused (inconclusive past the maximum bake), saturated (the simulator refused to judge: its own
    latencies were off), and the median time from rollout start to the final decision.

Numbers are printed, never asserted.

    python benchmarks/bench_canary.py [--sizes 60,200] [--runs 10] [--scenarios latency-regression,healthy]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GOOD = {"healthy", "latency-minor", "healthy-large"}


def run_once(scenario: str, devices: int, timeout_s: float) -> dict[str, Any]:
    started = time.monotonic()
    try:
        result = subprocess.run([sys.executable, "-m", "edgepack", "testbed", "run", scenario, "--devices", str(devices), "--json"],
                                cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout_s:g} s", "wall_s": time.monotonic() - started}
    try:
        report = json.loads(result.stdout)
    except ValueError:
        return {"error": (result.stderr or result.stdout)[-400:], "wall_s": time.monotonic() - started}
    report["wall_s"] = time.monotonic() - started
    return report


def classify(scenario: str, report: dict[str, Any]) -> dict[str, Any]:
    """What one run shows: its end state, the first rollback's wave and the profiles it blamed."""
    if "error" in report:
        return {"outcome": "error", "detail": report["error"]}
    rollout = report.get("rollout") or {}
    if report.get("saturated"):  # no verdict on the release; what the rollout did is kept for the record
        return {"outcome": "saturated", "detail": f"rollout {rollout.get('status')}; {report['fidelity'].get('reason')}"}
    waves = rollout.get("waves") or []
    rolled = [i for i, wave in enumerate(waves) if wave.get("decision") == "rollback"]
    blamed: set[str] = set()
    if rolled:
        evidence = waves[rolled[0]].get("evidence") or {}
        blamed = {c["profile"] for c in evidence.get("checks", []) if c.get("outcome") == "fail"}
    return {"outcome": rollout.get("status", "none"), "rollback_wave": rolled[0] + 1 if rolled else None,
            "blamed": sorted(blamed), "rollout_s": report.get("rollout_s")}


def summarize(scenario: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(runs)
    counts: dict[str, int] = defaultdict(int)
    for run in runs:
        counts[run["outcome"]] += 1
    times = [run["rollout_s"] for run in runs if run.get("rollout_s") is not None]
    row: dict[str, Any] = {"runs": n, "outcomes": dict(counts),
                           "median_time_to_decision_s": round(statistics.median(times), 1) if times else None}
    if scenario in GOOD:
        row["false_rollback_rate"] = counts["rolled_back"] / n if n else None
    else:
        detected = [run for run in runs if run["outcome"] == "rolled_back" and run["rollback_wave"] is not None
                    and run["rollback_wave"] <= 2 and "rpi5" in run["blamed"] and "x86-avx2" not in run["blamed"]]
        row["detection_rate"] = len(detected) / n if n else None
        row["detected_in_wave"] = dict(sorted(Counter(run["rollback_wave"] for run in detected).items()))
        row["x86_blamed"] = sum(1 for run in runs if "x86-avx2" in run.get("blamed", []))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="60,200", help="Fleet sizes, comma separated.")
    parser.add_argument("--runs", type=int, default=10, help="Runs per scenario and size.")
    parser.add_argument("--scenarios", default="latency-regression,healthy")
    parser.add_argument("--timeout", type=float, default=1200.0, help="Seconds one run may take.")
    parser.add_argument("--json", dest="json_out", type=Path, help="Also write every run's classification here.")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]

    results: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    for size in sizes:
        for round_index in range(args.runs):
            for scenario in scenarios:  # interleaved: a busy spell of the host hits every scenario alike
                report = run_once(scenario, size, args.timeout)
                run = classify(scenario, report)
                results[(size, scenario)].append(run)
                print(f"[{size} devices, run {round_index + 1}/{args.runs}] {scenario}: {run['outcome']}"
                      + (f" at wave {run['rollback_wave']} blaming {','.join(run['blamed'])}" if run.get("rollback_wave") else "")
                      + (f" in {run['rollout_s']} s" if run.get("rollout_s") else "")
                      + (f" ({run['detail']})" if run.get("detail") else ""), flush=True)

    print()
    print(f"{'devices':>7}  {'scenario':<20} {'runs':>4}  {'detection':>9}  {'in wave':<12} {'false rollback':>14}  "
          f"{'paused':>6}  {'saturated':>9}  {'median s to decision':>20}")
    for (size, scenario), runs in sorted(results.items()):
        row = summarize(scenario, runs)
        detection = f"{row['detection_rate']:.0%}" if "detection_rate" in row else "—"
        waves = ",".join(f"w{w}:{c}" for w, c in row.get("detected_in_wave", {}).items()) or "—"
        false = f"{row['false_rollback_rate']:.0%}" if "false_rollback_rate" in row else "—"
        print(f"{size:>7}  {scenario:<20} {row['runs']:>4}  {detection:>9}  {waves:<12} {false:>14}  "
              f"{row['outcomes'].get('paused', 0):>6}  {row['outcomes'].get('saturated', 0):>9}  "
              f"{row['median_time_to_decision_s'] if row['median_time_to_decision_s'] is not None else '—':>20}")
    if args.json_out:
        args.json_out.write_text(json.dumps({f"{size}/{scenario}": runs for (size, scenario), runs in results.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
