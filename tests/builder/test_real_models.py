"""Real models no one here wrote, from pip packages: the PP-OCR text-direction classifier and Silero VAD."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.hostinfo import host_is_target
from edgepack.bundle import open_bundle
from edgepack.report import BuildReport
from edgepack.signing import generate_keypair, load_public_key
from hardware_profiles import load_profile
from testbeds import ppocr_cls, silero
from tests.support import run_cli


@pytest.fixture(scope="module")
def ppocr_project(tmp_path_factory):
    return ppocr_cls.make_project(tmp_path_factory.mktemp("ppocr"))


def test_ppocr_classifier_builds_for_x86_vnni_with_a_verified_int8_variant(tmp_path, ppocr_project):
    private, public = generate_keypair(tmp_path / "keys")
    out = tmp_path / "dist"
    result = run_cli("build", "--profile", "x86-avx512-vnni", "--config", str(ppocr_project), "--out", str(out),
                     "--signing-key", str(private), "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    report = BuildReport.model_validate_json(result.stdout)
    variants = {v.name: v for v in report.variants}
    source = report.source_model
    assert source.opset == 11  # upgraded for per-channel Q/DQ
    int8 = variants["int8"]
    assert int8.passed, int8.failed_gates
    assert -int8.accuracy_delta <= report.gates.max_accuracy_drop
    assert int8.quantization["activation_type"] == "uint8" and int8.quantization["reduce_range"] is False
    # The selection is justified with measured numbers: latency per variant, in ms, and the source.
    assert report.selected in variants and "ms" in report.selection_reason
    # Host latency stands for the target's only when the host has exactly the target's kernel features (a host
    # with extra ones, say avx_vnni beside avx512_vnni, may run other kernels): then it is the selection's source.
    is_target, reason = host_is_target(load_profile("x86-avx512-vnni"))
    assert report.host.is_target is is_target and report.host.reason == reason
    if is_target:
        assert variants[report.selected].target_latency_source == "host"
    # INT8 that is slower than float on this host is reported as such, never chosen when dominated.
    fp32 = variants["fp32"]
    if int8.latency_ms.p50 > fp32.latency_ms.p50 * 1.05:
        assert any("int8 does not pay here" in note for note in report.notes)
    bundle = open_bundle(Path(report.bundle.path), [load_public_key(public)])
    assert bundle.manifest.io.inputs[0].shape == [1, 3, 48, 192]
    assert bundle.manifest.lineage.source_model_sha256 == source.sha256


def test_silero_vad_builds_where_shapes_may_stay_dynamic(tmp_path):
    project = silero.make_project(tmp_path / "silero", n_calib=16, n_val=32)
    out = tmp_path / "dist"
    result = run_cli("build", "--profile", "x86-avx2", "--config", str(project), "--out", str(out), "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    report = BuildReport.model_validate_json(result.stdout)
    int8 = next(v for v in report.variants if v.name == "int8")
    # All of Silero's compute sits inside an If: static INT8 cannot reach it, and the report says so.
    assert not int8.passed and "control-flow" in int8.dropped_reason
    assert report.selected in ("fp32", "fp16")


def test_silero_vad_for_a_static_shape_target_stops_with_exit_2_and_says_why(tmp_path):
    project = silero.make_project(tmp_path / "silero", n_calib=16, n_val=32)
    out = tmp_path / "dist"
    result = run_cli("build", "--profile", "jetson", "--config", str(project), "--out", str(out))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1
    assert "static input shapes" in error[0] and "LSTM" in error[0]
    assert not out.exists()
