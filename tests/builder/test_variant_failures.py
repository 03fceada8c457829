"""Issue 13: a variant that fails is a result, not the end of the build.

Google's magika file-type model (int32 byte input) used to crash onnxruntime's static INT8 quantizer
("The truth value of an array with more than one element is ambiguous"): the builder's simplify step let
onnxruntime fuse MatMul+Add into Reshape-Gemm-Reshape with shape constants the quantizer could not read.
The simplify step no longer runs that fusion, and magika builds INT8. A quantizer that still crashes on
some model is injected here at our own seam (the int8-static pass raising what onnxruntime raised) in a
real build: the build drops that variant with its reason in the report, the CLI and the report page, and
selects among the rest."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from builder.passes.onnx.int8_static import Int8Static
from edgepack.cli import app
from edgepack.report import BuildReport
from edgepack.signing import generate_keypair
from testbeds import magika
from tests.support import run_cli


@pytest.fixture(scope="module")
def magika_project(tmp_path_factory):
    root = tmp_path_factory.mktemp("magika")
    private, _ = generate_keypair(root / "keys")
    return magika.make_project(root / "project", n_calib=32, n_val=64), private, root


def test_magika_builds_int8_for_jetson_now_that_simplify_leaves_its_matmuls_alone(magika_project):
    config, private, root = magika_project
    out = root / "dist"

    result = run_cli("build", "--profile", "jetson-orin-nano", "--config", str(config), "--out", str(out),
                     "--signing-key", str(private))

    assert result.returncode == 0, result.stdout + result.stderr
    report = BuildReport.model_validate_json((out / "magika-1.0.0-jetson-orin-nano.report.json").read_text())
    assert report.failed_variants == []
    int8 = report.variant("int8")
    assert int8.passed and int8.agreement >= 0.99 and int8.size_ratio < 0.35
    assert report.selected == "int8" and report.bundle is not None


def test_a_quantizer_crash_drops_that_variant_and_the_build_selects_among_the_rest(magika_project, monkeypatch):
    config, private, root = magika_project
    out = root / "dist-crash"

    def crash(self, input_model, ctx):
        raise ValueError("The truth value of an array with more than one element is ambiguous. Use a.any() or a.all()")

    monkeypatch.setattr(Int8Static, "run", crash)  # the pass runner turns it into the variant's failure
    result = CliRunner().invoke(app, ["build", "--profile", "jetson-orin-nano", "--config", str(config), "--out", str(out),
                                      "--signing-key", str(private)])

    assert result.exit_code == 0, result.output
    report = BuildReport.model_validate_json((out / "magika-1.0.0-jetson-orin-nano.report.json").read_text())
    failed = {f.name: f for f in report.failed_variants}
    assert set(failed) == {"int8"}
    assert failed["int8"].stage == "build" and failed["int8"].precision == "int8"
    assert failed["int8"].reason.startswith("pass int8-static failed on model.onnx: The truth value of an array")
    assert "int8" not in {v.name for v in report.variants}
    assert report.selected in {"fp32", "fp16"} and report.bundle is not None
    # said where a user looks: the CLI's summary and the report page
    assert "int8 (onnxruntime, int8) could not be built: pass int8-static failed" in " ".join(result.output.split())
    page = (out / "magika-1.0.0-jetson-orin-nano.report.html").read_text()
    assert "Variants that could not be built or run" in page and "The truth value of an array" in page
