"""Issue 13: a variant that fails is a result, not the end of the build. Google's magika file-type model
(int32 byte input) crashes onnxruntime's static INT8 quantizer; the build drops that variant with its reason
in the report, the CLI and the report page, and selects among the rest."""

from __future__ import annotations

import pytest

from edgepack.report import BuildReport
from edgepack.signing import generate_keypair
from testbeds import magika
from tests.support import run_cli


@pytest.fixture(scope="module")
def magika_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("magika")
    config = magika.make_project(root / "project", n_calib=32, n_val=64)
    private, _ = generate_keypair(root / "keys")
    out = root / "dist"
    result = run_cli("build", "--profile", "jetson-orin-nano", "--config", str(config), "--out", str(out),
                     "--signing-key", str(private))
    return result, out


def test_a_quantizer_crash_drops_that_variant_and_the_build_selects_among_the_rest(magika_build):
    result, out = magika_build
    assert result.returncode == 0, result.stdout + result.stderr
    report = BuildReport.model_validate_json((out / "magika-1.0.0-jetson-orin-nano.report.json").read_text())
    failed = {f.name: f for f in report.failed_variants}
    assert set(failed) == {"int8"}
    assert failed["int8"].stage == "build" and failed["int8"].precision == "int8"
    assert failed["int8"].reason.startswith("static INT8 quantization failed: ValueError")
    assert "int8" not in {v.name for v in report.variants}
    assert report.selected in {"fp32", "fp16"} and report.bundle is not None
    # said where a user looks: the CLI's summary and the report page
    assert "int8 (onnxruntime, int8) could not be built: static INT8 quantization failed" in " ".join((result.stdout + result.stderr).split())
    page = (out / "magika-1.0.0-jetson-orin-nano.report.html").read_text()
    assert "Variants that could not be built or run" in page and "static INT8 quantization failed" in page

