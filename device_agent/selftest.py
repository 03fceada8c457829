"""Run an installed bundle's self-test in the runtime it will serve with, before the device switches.

The manifest's `selftest` member (`selftest/cases.json`, an `edgepack.manifest.SelftestSpec`, written by the builder):

    {"schema_version": 1, "runtime": "onnxruntime", "tolerance": {"atol": 0.01, "rtol": 0.08},
     "cases": [{"inputs": {"input": "selftest/0/in0.npy"}, "outputs": {"logits": "selftest/0/out0.npy"}}]}

Every output must satisfy |actual - expected| <= atol + rtol * |expected| elementwise (numpy.isclose).

`run_selftest(slot_dir, timeout_s=…, isolation="process")` runs it in a child process
(`python -m device_agent.selftest SLOT_DIR`, which prints one JSON result): a model that hangs is
killed at the timeout and one that crashes the runtime cannot take the agent down. `isolation="thread"`
runs in-process (cheaper; a hung run is abandoned, not stopped), for simulated fleets.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np

from edgepack.bundle import manifest_from_bytes
from edgepack.errors import BundleError, EdgepackError
from edgepack.manifest import BundleManifest, parse_selftest_spec

_MAX_CASES_JSON = 16 * 1024 * 1024


@dataclass(frozen=True)
class SelftestResult:
    passed: bool
    cases: int = 0
    seconds: float = 0.0
    reason: str | None = None  # why it failed, one line
    runtime: str | None = None
    worst: dict = field(default_factory=dict)  # {"case", "output", "max_abs_error", "allowed"} of the worst output

    def to_json(self) -> dict:
        return asdict(self)


def _load_member(slot_dir: Path, manifest: BundleManifest, member: str) -> np.ndarray:
    if not manifest.lists(member):
        raise ValueError(f"self-test names {member!r}, which is not a listed member")
    parts = PurePosixPath(member).parts
    if member.startswith("/") or ".." in parts:
        raise ValueError(f"self-test member {member!r} escapes the bundle")
    data = slot_dir.joinpath(*parts).read_bytes()
    return np.load(io.BytesIO(data), allow_pickle=False)


def check_selftest(slot_dir: Path) -> SelftestResult:
    """Run every case of the bundle extracted at `slot_dir`, in this process."""
    from device_agent.runtimes import adapter_for

    slot_dir = Path(slot_dir)
    started = time.perf_counter()
    try:
        manifest = manifest_from_bytes((slot_dir / "manifest.json").read_bytes())
    except (OSError, BundleError) as exc:
        return SelftestResult(False, reason=f"manifest unreadable: {exc}")
    runtime = manifest.runtime
    try:
        cases_path = slot_dir.joinpath(*PurePosixPath(_listed(manifest, manifest.selftest)).parts)
        if cases_path.stat().st_size > _MAX_CASES_JSON:
            raise ValueError("selftest cases file is too large")
        spec = parse_selftest_spec(json.loads(cases_path.read_bytes()), manifest.selftest)
    except BundleError as exc:
        return SelftestResult(False, reason=f"self-test cases unreadable: {exc.message}", runtime=runtime)
    except (OSError, ValueError) as exc:
        return SelftestResult(False, reason=f"self-test cases unreadable: {exc}", runtime=runtime)
    atol, rtol, cases = spec.tolerance.atol, spec.tolerance.rtol, spec.cases
    if not cases:
        return SelftestResult(False, reason="bundle's self-test has no cases", runtime=runtime)

    try:
        session = adapter_for(runtime).load(slot_dir, manifest)
    except EdgepackError as exc:
        return SelftestResult(False, reason=exc.message, runtime=runtime)
    worst: dict = {}
    worst_excess = -np.inf
    try:
        for index, case in enumerate(cases):
            try:
                feeds = {name: _load_member(slot_dir, manifest, member) for name, member in case.inputs.items()}
                expected = {name: _load_member(slot_dir, manifest, member) for name, member in case.outputs.items()}
            except (OSError, ValueError) as exc:
                return SelftestResult(False, index, time.perf_counter() - started, f"self-test case {index} unreadable: {exc}", runtime)
            try:
                actual = session.run(feeds)
            except Exception as exc:  # any runtime failure on a case is a failed self-test, with its reason
                first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                return SelftestResult(False, index, time.perf_counter() - started, f"self-test case {index}: {runtime} failed: {first}", runtime)
            for name, want in expected.items():
                got = actual.get(name)
                if got is None:
                    return SelftestResult(False, index, time.perf_counter() - started,
                                          f"self-test case {index}: the model has no output {name!r}", runtime)
                got = np.asarray(got)
                if got.shape != want.shape:
                    if got.size == want.size and np.squeeze(got).shape == np.squeeze(want).shape:
                        got = got.reshape(want.shape)
                    else:
                        return SelftestResult(False, index, time.perf_counter() - started,
                                              f"self-test case {index} output {name}: shape {list(got.shape)}, expected {list(want.shape)}", runtime)
                got64, want64 = got.astype(np.float64), want.astype(np.float64)
                if not np.all(np.isfinite(got64)):
                    return SelftestResult(False, index, time.perf_counter() - started,
                                          f"self-test case {index} output {name}: non-finite values", runtime)
                error = np.abs(got64 - want64)
                allowed = atol + rtol * np.abs(want64)
                excess = float(np.max(error - allowed)) if error.size else -np.inf
                if excess > worst_excess:
                    worst_excess = excess
                    at = int(np.argmax(error - allowed)) if error.size else 0
                    worst = {"case": index, "output": name, "max_abs_error": float(error.flat[at]) if error.size else 0.0,
                             "allowed": float(allowed.flat[at]) if error.size else 0.0}
                if excess > 0:
                    return SelftestResult(
                        False, index + 1, time.perf_counter() - started,
                        f"self-test case {index} output {name}: |error| {worst['max_abs_error']:.4g} > allowed "
                        f"{worst['allowed']:.4g} (atol {atol:g}, rtol {rtol:g})", runtime, worst)
    finally:
        session.close()
    return SelftestResult(True, len(cases), time.perf_counter() - started, None, runtime, worst)


def _listed(manifest: BundleManifest, member: str) -> str:
    if not manifest.lists(member):
        raise ValueError(f"{member!r} is not a listed member")
    if member.startswith("/") or ".." in PurePosixPath(member).parts:
        raise ValueError(f"{member!r} escapes the bundle")
    return member


def run_selftest(slot_dir: Path, *, timeout_s: float, isolation: Literal["process", "thread"] = "process") -> SelftestResult:
    """The self-test of the bundle at `slot_dir`, bounded by `timeout_s`; never raises for a bad bundle."""
    if isolation == "thread":
        return _run_in_thread(Path(slot_dir), timeout_s)
    return _run_in_process(Path(slot_dir), timeout_s)


# Simulated fleets run many agents in one process. numpy parses .npy headers with ast.literal_eval, and
# CPython 3.11's ast is not safe to use from several threads at once ("AST constructor recursion depth
# mismatch"): in-process self-tests take turns. A real device runs one agent, so this costs it nothing.
_THREAD_SELFTEST_LOCK = threading.Lock()


def _run_in_thread(slot_dir: Path, timeout_s: float) -> SelftestResult:
    box: list[SelftestResult] = []

    def target() -> None:
        try:
            with _THREAD_SELFTEST_LOCK:
                box.append(check_selftest(slot_dir))
        except Exception as exc:  # a bug or I/O error: the install must fail with a reason, not hang
            box.append(SelftestResult(False, reason=f"self-test error: {type(exc).__name__}: {exc}"))

    worker = threading.Thread(target=target, name="selftest", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not box:
        return SelftestResult(False, seconds=timeout_s, reason=f"self-test did not finish within {timeout_s:g} s")
    return box[0]


def _run_in_process(slot_dir: Path, timeout_s: float) -> SelftestResult:
    package_root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    started = time.perf_counter()
    try:
        completed = subprocess.run([sys.executable, "-m", "device_agent.selftest", str(slot_dir)], env=env,
                                   capture_output=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return SelftestResult(False, seconds=time.perf_counter() - started,
                              reason=f"self-test did not finish within {timeout_s:g} s")
    except OSError as exc:
        return SelftestResult(False, reason=f"cannot start the self-test process: {exc}")
    lines = completed.stdout.decode(errors="replace").strip().splitlines()
    if completed.returncode == 0:
        try:
            return SelftestResult(**json.loads(lines[-1]))
        except (IndexError, ValueError, TypeError):
            return SelftestResult(False, seconds=time.perf_counter() - started,
                                  reason="self-test process exited without a result line")
    if completed.returncode < 0:
        try:
            how = f"killed by {signal.Signals(-completed.returncode).name}"
        except ValueError:
            how = f"killed by signal {-completed.returncode}"
    else:
        how = f"exited with {completed.returncode}"
    tail = completed.stderr.decode(errors="replace").strip().splitlines()
    detail = f": {tail[-1][:300]}" if tail else ""
    return SelftestResult(False, seconds=time.perf_counter() - started, reason=f"self-test process {how}{detail}")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m device_agent.selftest SLOT_DIR", file=sys.stderr)
        return 2
    try:
        result = check_selftest(Path(args[0]))
    except Exception as exc:  # reported as a failed self-test by the parent, with this line
        result = SelftestResult(False, reason=f"self-test error: {type(exc).__name__}: {exc}")
    print(json.dumps(result.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
