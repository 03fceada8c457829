"""Vendor toolchain steps in containers: the Edge TPU compiler, TensorRT's trtexec.

Some steps only run inside a vendor's toolchain. A profile names a container image per step
(`toolchains:` in `hardware_profiles/*.yaml`; coral: `edgetpu_compiler`, jetson: `trtexec`), and with
`edgepack build --toolchain docker` the builder runs the step in that image through the Docker SDK for
Python (`pip install 'edgepack[toolchain]'`):

    steps = steps_for_candidate(profile, candidate.runtime, candidate.model_path, work_dir, precision=…)
    for step in steps:
        result = run_step(step, mode)          # StepResult: ran | skipped | failed, outputs, log

The container sees only the step's work folder (read-write at /work), has no network, runs as the
calling uid:gid (so its outputs belong to the user), is removed afterwards and is killed after
`timeout_s`. Its outputs are read back from the work folder. With no Docker engine reachable the step
is skipped with one line saying so, and the build goes on with what it can build.

`docker` is imported only inside `run_step`.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from edgepack.errors import ConfigError

log = logging.getLogger(__name__)

ToolchainMode = Literal["docker", "none"]
CONTAINER_WORK_DIR = "/work"
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
# NGC TensorRT images ship trtexec in /usr/src/tensorrt/bin, which is not always on PATH.
_TRTEXEC_PATH = "/usr/src/tensorrt/bin:/usr/local/cuda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_LOG_TAIL_LINES = 5


@dataclass(frozen=True)
class ContainerStep:
    """One toolchain command to run in `image`, with `work_dir` mounted at /work.

    `outputs` are paths relative to `work_dir` the command must produce. `gpus` asks for every GPU
    (the `docker run --gpus all` equivalent; needs the NVIDIA container toolkit on the host).
    """

    step: str
    image: str
    command: list[str]
    work_dir: Path
    outputs: list[str]
    timeout_s: int = 600
    gpus: bool = False
    environment: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.image:
            raise ConfigError(f"toolchain step {self.step}: no container image", step=self.step)
        if not self.command:
            raise ConfigError(f"toolchain step {self.step}: empty command", step=self.step)
        if self.timeout_s <= 0:
            raise ConfigError(f"toolchain step {self.step}: timeout_s must be positive, got {self.timeout_s}", step=self.step)
        for output in self.outputs:
            path = PurePosixPath(output)
            if not output or path.is_absolute() or ".." in path.parts:
                raise ConfigError(f"toolchain step {self.step}: output {output!r} is not a path inside the work folder",
                                  step=self.step)


@dataclass(frozen=True)
class StepResult:
    """What became of a step: status "ran", "skipped" or "failed", a one-line message, outputs and the log."""

    status: Literal["ran", "skipped", "failed"]
    message: str
    outputs: dict[str, Path]
    log: str


def container_spec(step: ContainerStep) -> dict[str, Any]:
    """Exactly the keyword arguments `run_step` passes to `client.containers.run`."""
    spec: dict[str, Any] = {
        "image": step.image,
        # [""] resets the image's entrypoint (documented by the Engine API), so `command` is the whole
        # command line whether or not the image's entrypoint already is the tool.
        "entrypoint": [""],
        "command": list(step.command),
        "volumes": {str(Path(step.work_dir).resolve()): {"bind": CONTAINER_WORK_DIR, "mode": "rw"}},
        "working_dir": CONTAINER_WORK_DIR,
        "network_disabled": True,
        "network_mode": "none",
        "user": f"{os.getuid()}:{os.getgid()}",
        # The calling uid usually has no home in the image; tools that write caches get the work folder.
        "environment": {"HOME": CONTAINER_WORK_DIR, **step.environment},
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "labels": {"edgepack.step": step.step},
        # Detached, so run_step can wait with a timeout, read the log, then remove the container.
        "detach": True,
    }
    if step.gpus:
        spec["device_requests"] = [{"count": -1, "capabilities": [["gpu"]]}]
    return spec


def _docker_host() -> str:
    return os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST


def _tail(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-_LOG_TAIL_LINES:])


def run_step(step: ContainerStep, mode: ToolchainMode) -> StepResult:
    """Run `step` in its container (mode "docker") or skip it (mode "none", or no Docker engine)."""
    if mode == "none":
        return StepResult("skipped", f"{step.step} needs the {step.image} toolchain: skipped "
                                     "(run with --toolchain docker to run it in a container)", {}, "")
    if mode != "docker":
        raise ConfigError(f"unknown toolchain mode {mode!r} (expected 'docker' or 'none')")
    try:
        import docker
        import requests
    except ImportError:
        return StepResult("skipped", f"the Docker SDK for Python is not installed (pip install 'edgepack[toolchain]'): "
                                     f"skipping {step.step}; building what can be built", {}, "")

    try:
        client = docker.from_env()
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
        message = f"no Docker engine reachable at {_docker_host()}: skipping {step.step}; building what can be built"
        log.debug("%s (%s)", message, exc)
        return StepResult("skipped", message, {}, str(exc))

    work_dir = Path(step.work_dir)
    for output in step.outputs:
        target = work_dir / output
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)  # never mistake an earlier run's file for this run's output
    started = time.perf_counter()
    container = None
    try:
        container = client.containers.run(**container_spec(step))
        try:
            status = container.wait(timeout=step.timeout_s)
        except requests.exceptions.RequestException:
            try:
                container.kill()
            except docker.errors.DockerException:
                pass  # it exited between the timeout and the kill; removed below either way
            logs = container.logs(stdout=True, stderr=True).decode(errors="replace")
            return StepResult("failed", f"{step.step} timed out after {step.timeout_s} s in {step.image}", {}, logs)
        exit_code = int(status.get("StatusCode", -1))
        logs = container.logs(stdout=True, stderr=True).decode(errors="replace")
    except docker.errors.ImageNotFound as exc:
        return StepResult("failed", f"{step.step}: image {step.image} not found and could not be pulled", {}, str(exc))
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        return StepResult("failed", f"{step.step} could not run in {step.image}: {exc}", {}, str(exc))
    finally:
        if container is not None:
            try:
                container.remove(force=True)
            except docker.errors.DockerException as exc:
                log.warning("could not remove the %s container %s: %s", step.step, container.id, exc)
    seconds = time.perf_counter() - started

    if exit_code != 0:
        return StepResult("failed", f"{step.step} exited with {exit_code} in {step.image}: {_tail(logs)}", {}, logs)
    missing = [output for output in step.outputs if not (work_dir / output).is_file()]
    if missing:
        return StepResult("failed", f"{step.step} ran but did not write {', '.join(missing)}", {}, logs)
    outputs = {output: (work_dir / output).resolve() for output in step.outputs}
    return StepResult("ran", f"{step.step} ran in {step.image} in {seconds:.1f} s", outputs, logs)


def steps_for_candidate(profile: Any, runtime: str, model_path: Path, work_dir: Path, *,
                        precision: str | None = None, sparse: bool = False) -> list[ContainerStep]:
    """The toolchain steps a candidate needs on `profile`; copies the model into `work_dir` for them.

    - tflite on a profile with `edgetpu_compiler`: `edgetpu_compiler -s -o /work/out /work/model.tflite`,
      writing out/model_edgetpu.tflite and out/model_edgetpu.log (skipped for float candidates, which
      the Edge TPU cannot run).
    - tensorrt ONNX on a profile with `trtexec`: `trtexec --onnx=/work/model.onnx
      --saveEngine=/work/out/model.engine` plus the precision flags the device will use (fp16: --fp16;
      int8: --int8 --fp16; `sparse`: --sparsity=enable). An engine built in a container on an x86 host
      is not valid for the device (engines are tied to GPU and TensorRT version; the device builds its
      own, see device_agent.tensorrt_engine): this step validates that TensorRT parses the network and
      builds an engine from it. It needs a GPU in the container.

    Returns [] when the profile declares no toolchain for this runtime.
    """
    toolchains = dict(getattr(profile, "toolchains", {}) or {})
    model_path = Path(model_path)
    work_dir = Path(work_dir)

    if runtime == "tflite" and "edgetpu_compiler" in toolchains and model_path.suffix == ".tflite":
        if precision in ("fp32", "fp16"):
            return []
        _copy_model(model_path, work_dir / "model.tflite")
        return [ContainerStep(
            step="edgetpu_compiler",
            image=toolchains["edgetpu_compiler"],
            command=["edgetpu_compiler", "-s", "-o", f"{CONTAINER_WORK_DIR}/out", f"{CONTAINER_WORK_DIR}/model.tflite"],
            work_dir=work_dir,
            outputs=["out/model_edgetpu.tflite", "out/model_edgetpu.log"],
        )]

    if runtime == "tensorrt" and "trtexec" in toolchains and model_path.suffix == ".onnx":
        _copy_model(model_path, work_dir / "model.onnx")
        flags = {"fp16": ["--fp16"], "int8": ["--int8", "--fp16"]}.get(precision or "", [])
        if sparse:
            flags.append("--sparsity=enable")
        return [ContainerStep(
            step="trtexec",
            image=toolchains["trtexec"],
            command=["trtexec", f"--onnx={CONTAINER_WORK_DIR}/model.onnx", f"--saveEngine={CONTAINER_WORK_DIR}/out/model.engine", *flags],
            work_dir=work_dir,
            outputs=["out/model.engine"],
            gpus=True,
            environment={"PATH": _TRTEXEC_PATH},
        )]
    return []


def _copy_model(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    (target.parent / "out").mkdir(exist_ok=True)
    shutil.copyfile(source, target)
