"""The report file is the typed BuildReport: it parses, re-serialises to the same text, and leaves out
runtime sections a variant does not have instead of writing them as null."""

from __future__ import annotations

import json

from builder.pipeline import BuildRequest, run_build
from edgepack.report import REPORT_SCHEMA_VERSION, BuildReport
from testbeds.tiny import write_config


def test_a_written_report_parses_and_reserialises_to_the_same_text(tmp_path, tiny_project):
    result = run_build(BuildRequest(config_path=tiny_project / "edgepack.yaml", profile="jetson", out_dir=tmp_path / "out",
                                    cache_dir=tmp_path / "cache"))
    (path,) = (tmp_path / "out").glob("*.report.json")
    text = path.read_text()

    parsed = BuildReport.model_validate_json(text)

    assert parsed.to_json() == text
    assert parsed == result.report and parsed.schema_version == REPORT_SCHEMA_VERSION
    written = json.loads(text)
    assert written["passes"][0]["pass"] == parsed.passes[0].pass_name == "check"
    assert all("tensorrt" in v and "edgetpu" not in v and "io_quantization" not in v for v in written["variants"])
    assert parsed.selected_variant is not None and parsed.selected_variant.decision == "selected"
    assert [s.step for s in parsed.toolchain] == ["trtexec"]


def test_a_build_where_nothing_passes_has_no_bundle_and_no_toolchain_key(tmp_path, tiny_project):
    write_config(tiny_project, gates={"max_size_mb": 0.0001})
    result = run_build(BuildRequest(config_path=tiny_project / "edgepack.yaml", profile="x86-avx2", out_dir=tmp_path / "out",
                                    cache_dir=tmp_path / "cache"))

    written = json.loads((tmp_path / "out" / "tiny-cnn-0.1.0-x86-avx2.report.json").read_text())
    assert result.exit_code == 1 and result.report.bundle is None and result.report.selected_variant is None
    assert written["bundle"] is None and "toolchain" not in written
    assert all(v.decision.startswith("dropped: ") for v in result.report.variants)
    assert all("dropped_reason" not in v for v in written["variants"])  # gates failed; nothing ruled them out earlier
