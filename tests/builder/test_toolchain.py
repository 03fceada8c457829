"""Toolchain containers: the steps a profile implies, the container spec, and the no-engine path.

No Docker engine runs where CI runs: these tests check the spec handed to the Docker SDK and the
no-engine path; starting a real container is left to a machine with an engine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from builder.toolchain import ContainerStep, StepResult, container_spec, run_step, steps_for_candidate
from edgepack.errors import ConfigError
from hardware_profiles import load_profile
from tests.support import REPO
from testbeds.tiny import make_tiny_cnn


@pytest.fixture
def tflite_model(tmp_path: Path) -> Path:
    # Only copied, never parsed: the compiler runs in its container.
    path = tmp_path / "candidate" / "model_int8.tflite"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"TFL3" + bytes(60))
    return path


@pytest.fixture
def onnx_model(tmp_path: Path) -> Path:
    (tmp_path / "candidate").mkdir(exist_ok=True)
    return make_tiny_cnn(tmp_path / "candidate" / "int8.onnx")


def test_coral_tflite_gets_an_edgetpu_compiler_step(tflite_model: Path, tmp_path: Path):
    profile = load_profile("coral")
    work = tmp_path / "work"

    steps = steps_for_candidate(profile, "tflite", tflite_model, work, precision="int8")

    assert len(steps) == 1
    step = steps[0]
    assert step.step == "edgetpu_compiler"
    assert step.image == profile.toolchains["edgetpu_compiler"]
    assert step.command == ["edgetpu_compiler", "-s", "-o", "/work/out", "/work/model.tflite"]
    assert step.outputs == ["out/model_edgetpu.tflite", "out/model_edgetpu.log"]
    assert (work / "model.tflite").read_bytes() == tflite_model.read_bytes()
    assert not step.gpus


def test_jetson_onnx_gets_a_trtexec_step_with_precision_flags(onnx_model: Path, tmp_path: Path):
    profile = load_profile("jetson")
    work = tmp_path / "work"

    int8 = steps_for_candidate(profile, "tensorrt", onnx_model, work, precision="int8", sparse=True)[0]
    fp16 = steps_for_candidate(profile, "tensorrt", onnx_model, tmp_path / "work16", precision="fp16")[0]

    assert int8.step == "trtexec" and int8.image == profile.toolchains["trtexec"]
    assert int8.command == ["trtexec", "--onnx=/work/model.onnx", "--saveEngine=/work/out/model.engine",
                            "--int8", "--fp16", "--sparsity=enable"]
    assert fp16.command[-1] == "--fp16" and "--int8" not in fp16.command
    assert int8.outputs == ["out/model.engine"]
    assert int8.gpus
    assert (work / "model.onnx").read_bytes() == onnx_model.read_bytes()


@pytest.mark.parametrize(("profile", "runtime", "precision"), [
    ("x86-avx2", "onnxruntime", "int8"),  # no toolchains at all
    ("jetson", "onnxruntime", "int8"),  # the profile's onnxruntime runtime needs no vendor step
    ("coral", "tflite", "fp32"),  # the Edge TPU runs int8 only
])
def test_no_step_when_the_profile_declares_none_for_the_candidate(profile, runtime, precision, onnx_model, tflite_model, tmp_path):
    model = tflite_model if runtime == "tflite" else onnx_model

    assert steps_for_candidate(load_profile(profile), runtime, model, tmp_path / "work", precision=precision) == []
    assert not (tmp_path / "work").exists()


def test_container_spec_mounts_only_the_work_folder_without_network(onnx_model: Path, tmp_path: Path):
    profile = load_profile("jetson")
    step = steps_for_candidate(profile, "tensorrt", onnx_model, tmp_path / "work", precision="int8")[0]

    spec = container_spec(step)

    assert spec["image"] == "nvcr.io/nvidia/l4t-tensorrt:r8.6.2-devel" == profile.toolchains["trtexec"]
    assert spec["command"] == step.command
    assert spec["volumes"] == {str((tmp_path / "work").resolve()): {"bind": "/work", "mode": "rw"}}
    assert not {"mounts", "devices", "privileged", "network", "volumes_from", "ports"} & set(spec)
    assert spec["working_dir"] == "/work"
    assert spec["network_disabled"] is True and spec["network_mode"] == "none"
    assert spec["user"] == f"{os.getuid()}:{os.getgid()}"
    assert spec["cap_drop"] == ["ALL"]
    assert spec["device_requests"] == [{"count": -1, "capabilities": [["gpu"]]}]


def test_container_spec_has_no_gpu_request_for_the_edgetpu_compiler(tflite_model: Path, tmp_path: Path):
    step = steps_for_candidate(load_profile("coral"), "tflite", tflite_model, tmp_path / "work")[0]

    spec = container_spec(step)

    assert "device_requests" not in spec
    assert spec["image"] == "edgepack/edgetpu-compiler:16.0"
    assert spec["command"] == ["edgetpu_compiler", "-s", "-o", "/work/out", "/work/model.tflite"]


def test_container_spec_is_accepted_by_the_docker_sdk(tflite_model: Path, tmp_path: Path):
    docker_containers = __import__("docker.models.containers", fromlist=["x"])
    from docker.types import ContainerConfig

    step = steps_for_candidate(load_profile("jetson"), "tensorrt", make_tiny_cnn(tmp_path / "m.onnx"), tmp_path / "work")[0]
    kwargs = {k: v for k, v in container_spec(step).items() if k != "detach"}

    # What containers.run does before talking to the engine, for Engine API 1.43.
    create = docker_containers._create_container_args({**kwargs, "version": "1.43"})
    config = ContainerConfig(version="1.43", **create)

    host = config["HostConfig"]
    assert host["Binds"] == [f"{(tmp_path / 'work').resolve()}:/work:rw"]
    assert host["NetworkMode"] == "none" and config["NetworkDisabled"] is True
    assert host["DeviceRequests"][0]["Capabilities"] == [["gpu"]]
    assert config["Entrypoint"] == [""] and config["Cmd"] == step.command


def test_mode_none_skips_and_says_how_to_run_it(tflite_model: Path, tmp_path: Path):
    step = steps_for_candidate(load_profile("coral"), "tflite", tflite_model, tmp_path / "work")[0]

    result = run_step(step, "none")

    assert result == StepResult("skipped", result.message, {}, "")
    assert "--toolchain docker" in result.message


def test_no_docker_engine_skips_with_one_line(tflite_model: Path, tmp_path: Path, monkeypatch):
    socket = tmp_path / "docker.sock"  # nothing listens here
    monkeypatch.setenv("DOCKER_HOST", f"unix://{socket}")
    step = steps_for_candidate(load_profile("coral"), "tflite", tflite_model, tmp_path / "work")[0]

    result = run_step(step, "docker")

    assert result.status == "skipped"
    assert result.message == (f"no Docker engine reachable at unix://{socket}: skipping edgetpu_compiler; "
                              "building what can be built")
    assert "\n" not in result.message
    assert result.outputs == {}
    assert not (tmp_path / "work" / "out" / "model_edgetpu.tflite").exists()


def test_unknown_mode_is_refused(tflite_model: Path, tmp_path: Path):
    step = steps_for_candidate(load_profile("coral"), "tflite", tflite_model, tmp_path / "work")[0]

    with pytest.raises(ConfigError, match="unknown toolchain mode 'podman'"):
        run_step(step, "podman")  # type: ignore[arg-type]


@pytest.mark.parametrize("output", ["/etc/passwd", "../escape.bin", ""])
def test_outputs_must_stay_in_the_work_folder(output: str, tmp_path: Path):
    with pytest.raises(ConfigError, match="not a path inside the work folder"):
        ContainerStep("edgetpu_compiler", "img", ["true"], tmp_path, [output])


def test_importing_the_module_does_not_import_docker():
    code = "import sys, builder.toolchain; print('docker' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=True)

    assert done.stdout.strip() == "False"


# No Docker engine runs where CI runs: the container itself is not started by this suite (see the note of issue 3).
