"""One build for many profiles: a bundle and report each, and a combined matrix."""

from __future__ import annotations


from edgepack.report import BuildMatrix
from tests.support import run_cli


def test_several_profiles_give_a_bundle_each_and_a_matrix(tmp_path, tiny_project):
    out = tmp_path / "dist"
    result = run_cli("build", "--profile", "x86-avx512-vnni", "--profile", "jetson", "--config", str(tiny_project / "edgepack.yaml"),
                     "--out", str(out), "--quiet", "--json")
    assert result.returncode == 0, result.stderr
    matrix = BuildMatrix.model_validate_json(result.stdout)
    assert [e.profile for e in matrix.profiles] == ["x86-avx512-vnni", "jetson-orin-nano"]
    for entry in matrix.profiles:
        assert entry.selected and entry.exit_code == 0
        assert (out / f"tiny-cnn-0.1.0-{entry.profile}.edgepack").is_file()
        assert (out / f"tiny-cnn-0.1.0-{entry.profile}.report.json").is_file()
        for variant in entry.variants:
            assert {"accuracy_delta", "size_bytes", "host_p50_ms", "estimated_target_latency_ms"} <= set(variant.model_dump())
    jetson = matrix.profiles[1]
    assert {v.runtime for v in jetson.variants} == {"tensorrt"}
    assert (out / "tiny-cnn-0.1.0.matrix.json").is_file()
    html = (out / "tiny-cnn-0.1.0.matrix.html").read_text()
    assert "jetson-orin-nano" in html and "x86-avx512-vnni" in html


def test_a_profile_that_cannot_build_does_not_stop_the_others(tmp_path, tiny_project):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: broken\n")
    out = tmp_path / "dist"
    result = run_cli("build", "--profile", str(broken), "--profile", "jetson", "--config", str(tiny_project / "edgepack.yaml"),
                     "--out", str(out), "--quiet")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    matrix = BuildMatrix.model_validate_json((out / "tiny-cnn-0.1.0.matrix.json").read_text())
    errors = {e.profile: e for e in matrix.profiles}
    assert errors[str(broken)].error and errors[str(broken)].exit_code == 2
    assert errors["jetson-orin-nano"].selected and (out / "tiny-cnn-0.1.0-jetson-orin-nano.edgepack").is_file()


def test_build_without_a_profile_is_exit_2(tmp_path, tiny_project):
    result = run_cli("build", "--config", str(tiny_project / "edgepack.yaml"), "--out", str(tmp_path / "d"))
    assert result.returncode == 2 and "--profile" in result.stderr
