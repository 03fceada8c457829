"""`edgepack build` end to end, as a user runs it: real processes, real onnxruntime, real files."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from builder.pipeline import BuildRequest, run_build
from edgepack.bundle import open_bundle
from edgepack.report import BuildReport
from edgepack.signing import generate_keypair, load_public_key
from testbeds.tiny import write_config

from tests.support import REPO, run_cli

DIGITS = REPO / "examples" / "digits"


@pytest.fixture
def keys(tmp_path):
    private, public = generate_keypair(tmp_path / "keys")
    return private, public


def _report(out: Path) -> BuildReport:
    (path,) = out.glob("*.report.json")
    return BuildReport.model_validate_json(path.read_text())


def test_digits_for_jetson_selects_int8_within_half_a_point_and_under_30_percent_size(tmp_path, keys):
    private, public = keys
    out = tmp_path / "dist"
    result = run_cli("build", "--profile", "jetson", "--config", str(DIGITS / "edgepack.yaml"), "--out", str(out),
                     "--signing-key", str(private))
    assert result.returncode == 0, result.stderr
    assert "selected int8" in result.stderr and "digits-cnn-1.0.0-jetson-orin-nano.edgepack" in result.stderr
    report = _report(out)
    assert report.profile == "jetson-orin-nano" and report.selected == "int8"
    int8, fp32 = report.variant("int8"), report.variant("fp32")
    assert fp32.accuracy >= 0.95
    assert abs(int8.accuracy_delta) <= 0.005
    assert int8.size_bytes <= 0.30 * fp32.size_bytes
    assert int8.target_latency_source == "estimate"  # the host is not a Jetson
    assert int8.quantization["symmetric_activations"] is True  # TensorRT wants zero points of 0
    # The file itself keeps the keys DESIGN.md names.
    (written,) = (v for v in json.loads((out / "digits-cnn-1.0.0-jetson-orin-nano.report.json").read_text())["variants"] if v["name"] == "int8")
    assert {"size_bytes", "accuracy", "accuracy_delta", "agreement", "latency_ms", "estimated_target_latency_ms", "fallback_nodes", "passed"} <= set(written)
    assert report.gates.passed is True
    bundle = Path(report.bundle.path)
    verified = open_bundle(bundle, [load_public_key(public)])
    assert verified.manifest.precision == "int8" and verified.manifest.profile == "jetson-orin-nano"
    assert {"model/model.onnx", "reference/stats.json", "selftest/cases.json", "sbom.cdx.json"} <= set(verified.members)
    assert verified.manifest.lineage.source_model_sha256
    html = (out / "digits-cnn-1.0.0-jetson-orin-nano.report.html").read_text()
    assert "<svg" in html and "int8" in html


def test_selftest_vectors_reproduce_in_onnxruntime(tmp_path, keys):
    import io

    import onnxruntime as ort

    private, public = keys
    result = run_build(BuildRequest(config_path=DIGITS / "edgepack.yaml", profile="jetson", out_dir=tmp_path / "out", signing_key=private))
    bundle = open_bundle(Path(result.report.bundle.path), [load_public_key(public)])
    cases = json.loads(bundle.read("selftest/cases.json"))
    session = ort.InferenceSession(bundle.read("model/model.onnx"), providers=["CPUExecutionProvider"])
    tol = cases["tolerance"]
    assert cases["cases"]
    for case in cases["cases"]:
        feed = {name: np.load(io.BytesIO(bundle.read(member))) for name, member in case["inputs"].items()}
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
        for name, member in case["outputs"].items():
            expected = np.load(io.BytesIO(bundle.read(member)))
            np.testing.assert_allclose(outputs[name], expected, atol=tol["atol"], rtol=tol["rtol"])
    stats = json.loads(bundle.read("reference/stats.json"))
    assert stats["method"] == "psi" and abs(sum(stats["inputs"]["input"]["bin_fractions"]) - 1) < 1e-6


def test_two_builds_of_the_same_inputs_are_byte_identical(tmp_path, keys):
    private, _ = keys
    bundles = []
    for index in range(2):
        out = tmp_path / f"out{index}"
        result = run_build(BuildRequest(config_path=DIGITS / "edgepack.yaml", profile="jetson", out_dir=out,
                                        signing_key=private, use_cache=False))
        bundles.append(Path(result.report.bundle.path).read_bytes())
    assert bundles[0] == bundles[1]


def test_an_unchanged_rebuild_is_served_from_the_cache(tmp_path, keys, tiny_project):
    private, _ = keys
    request = BuildRequest(config_path=tiny_project / "edgepack.yaml", profile="jetson", out_dir=tmp_path / "a",
                           signing_key=private, cache_dir=tmp_path / "cache")
    first = run_build(request)
    assert not any(p.cached for p in first.report.passes)
    second = run_build(BuildRequest(**{**request.__dict__, "out_dir": tmp_path / "b"}))
    assert all(p.cached for p in second.report.passes)
    assert all(v.latency_cached for v in second.report.variants)
    assert second.report.bundle.sha256 == first.report.bundle.sha256
    # a changed input misses the cache
    write_config(tiny_project, optimize={"calibration": {"method": "percentile"}})
    third = run_build(BuildRequest(**{**request.__dict__, "out_dir": tmp_path / "c"}))
    int8 = next(p for p in third.report.passes if p.name == "int8-static")
    assert int8.cached is False


def test_json_flag_prints_the_report_on_stdout(tmp_path, tiny_project):
    out = tmp_path / "dist"
    result = run_cli("build", "--profile", "x86-avx512-vnni", "--config", str(tiny_project / "edgepack.yaml"), "--out", str(out), "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    printed = BuildReport.model_validate_json(result.stdout)
    assert printed.selected == _report(out).selected
    assert printed.host.is_target in (True, False)
    assert "development key" in result.stderr  # no key given: a dev key was created and announced


def test_no_passing_variant_exits_1_with_the_failed_gate_per_variant(tmp_path, tiny_project):
    write_config(tiny_project, gates={"max_size_mb": 0.0001})
    out = tmp_path / "dist"
    result = run_cli("build", "--profile", "jetson", "--config", str(tiny_project / "edgepack.yaml"), "--out", str(out))
    assert result.returncode == 1
    report = _report(out)
    assert report.selected is None and report.gates.passed is False and report.bundle is None
    assert all(any(g.gate == "max_size_mb" for g in v.failed_gates) for v in report.variants)
    assert not list(out.glob("*.edgepack"))
    assert "no variant passed" in result.stderr


def test_int8_that_misses_the_budget_falls_back_to_float_on_the_most_sensitive_nodes(tmp_path, tiny_project):
    # First learn how far plain int8 is from fp32 on cosine, then demand half of that.
    write_config(tiny_project, metric="cosine", gates={"max_accuracy_drop": 1.0})
    plain = run_build(BuildRequest(config_path=tiny_project / "edgepack.yaml", profile="jetson", out_dir=tmp_path / "a"))
    drop = 1.0 - plain.report.variant("int8").accuracy
    assert drop > 0
    # without fp16, which on this tiny model is as fast and as small as int8 (then no fallback runs: below)
    write_config(tiny_project, gates={"max_accuracy_drop": drop / 2},
                 optimize={"precisions": ["fp32", "int8"], "calibration": {"method": "minmax"}})
    result = run_build(BuildRequest(config_path=tiny_project / "edgepack.yaml", profile="jetson", out_dir=tmp_path / "b"))
    int8 = result.report.variant("int8")
    assert int8.fallback_nodes, "the accuracy fallback kept no node in float"
    assert set(int8.fallback_nodes) <= {"conv1", "conv2", "fc"}
    assert int8.passed and 1.0 - int8.accuracy <= drop / 2
    ranking = [entry.node for entry in result.report.sensitivity["int8"]]
    assert ranking[: len(int8.fallback_nodes)] == sorted(int8.fallback_nodes, key=ranking.index)


def test_the_fallback_searches_how_many_nodes_to_keep_in_float_by_halving_and_stops_when_the_budget_is_out_of_reach(
        tmp_path, tiny_project):
    write_config(tiny_project, metric="cosine", gates={"max_accuracy_drop": 1.0})
    plain = run_build(BuildRequest(config_path=tiny_project / "edgepack.yaml", profile="jetson", out_dir=tmp_path / "a"))
    drop = 1.0 - plain.report.variant("int8").accuracy

    def fallback(budget: float, out: str):
        write_config(tiny_project, gates={"max_accuracy_drop": budget},
                     optimize={"precisions": ["fp32", "int8"], "calibration": {"method": "minmax"}})
        report = run_build(BuildRequest(config_path=tiny_project / "edgepack.yaml", profile="jetson", out_dir=tmp_path / out)).report
        return report, [p.name for p in report.passes if "fallback" in p.name]

    # the tiny CNN has 3 quantizable nodes: k = 1 misses, k = 3 (the limit) meets, then the middle
    report, builds = fallback(drop / 2, "b")
    int8 = report.variant("int8")
    ranking = [entry.node for entry in report.sensitivity["int8"]]
    assert builds == ["int8 fallback 1", "int8 fallback 3", "int8 fallback 2"]
    assert int8.passed and sorted(int8.fallback_nodes) == sorted(ranking[:2])
    assert any("2 most sensitive node(s) kept in float" in note and "by halving" in note for note in int8.notes)

    # a budget no number of float nodes meets: two builds (k = 1, k = the limit), not one per node
    report, builds = fallback(0.0, "c")
    assert builds == ["int8 fallback 1", "int8 fallback 3"]
    assert not report.variant("int8").passed
    assert any("still misses the accuracy gate" in note or "did not reduce" in note for note in report.variant("int8").notes)


def test_calibration_auto_measures_the_other_methods_where_minmax_misses_and_the_search_starts_from_the_best(
        tmp_path, tiny_project):
    write_config(tiny_project, metric="cosine", gates={"max_accuracy_drop": 1.0})
    plain = run_build(BuildRequest(config_path=tiny_project / "edgepack.yaml", profile="jetson", out_dir=tmp_path / "a"))
    drop = 1.0 - plain.report.variant("int8").accuracy
    write_config(tiny_project, gates={"max_accuracy_drop": drop / 2}, optimize={"precisions": ["fp32", "int8"]})

    report = run_build(BuildRequest(config_path=tiny_project / "edgepack.yaml", profile="jetson", out_dir=tmp_path / "b")).report

    passes = [p.name for p in report.passes if p.pass_name == "int8-static"]
    assert passes[:3] == ["int8-static", "int8 calibration percentile", "int8 calibration entropy"]
    int8 = report.variant("int8")
    note = next(n for n in int8.notes if n.startswith("calibration chosen by measurement: "))
    chosen = note.split(": ")[1].split(" ")[0]
    losses = {m: float(v) for m, v in (part.split(" ") for part in note.split("each: ")[1].rstrip(")").split(", "))}
    assert set(losses) == {"minmax", "percentile", "entropy"} and losses[chosen] == min(losses.values())
    assert int8.quantization["calibration"] == chosen  # the variant shipped, or searched on, uses it
    assert int8.passed or any("fallback" in p for p in passes)


def test_no_accuracy_recovery_runs_when_a_passing_variant_is_already_as_fast_and_as_small(tmp_path, tiny_project):
    # On the tiny CNN for Jetson fp16 passes and is estimated as fast as int8 and is smaller: an int8 rebuilt
    # with float nodes could never be selected over it, so the fallback search (the slow part) is not run.
    write_config(tiny_project, metric="cosine", gates={"max_accuracy_drop": 1.0})
    plain = run_build(BuildRequest(config_path=tiny_project / "edgepack.yaml", profile="jetson", out_dir=tmp_path / "a"))
    drop = 1.0 - plain.report.variant("int8").accuracy
    write_config(tiny_project, gates={"max_accuracy_drop": drop / 2})

    report = run_build(BuildRequest(config_path=tiny_project / "edgepack.yaml", profile="jetson", out_dir=tmp_path / "b")).report

    int8, fp16 = report.variant("int8"), report.variant("fp16")
    assert fp16.passed and fp16.target_latency_ms <= int8.target_latency_ms and fp16.size_bytes <= int8.size_bytes
    assert not int8.passed and not int8.fallback_nodes and "int8" not in report.sensitivity
    assert not [p.name for p in report.passes if "fallback" in p.name]
    assert any(note.startswith("accuracy recovery not run: fp16 already passes every gate") for note in int8.notes)
    assert report.selected == "fp16"


def test_a_spent_time_budget_skips_the_accuracy_recovery_and_the_report_says_so(tmp_path, tiny_project):
    write_config(tiny_project, metric="cosine", gates={"max_accuracy_drop": 1.0})
    plain = run_build(BuildRequest(config_path=tiny_project / "edgepack.yaml", profile="jetson", out_dir=tmp_path / "a"))
    drop = 1.0 - plain.report.variant("int8").accuracy
    write_config(tiny_project, gates={"max_accuracy_drop": drop / 2}, optimize={"precisions": ["fp32", "int8"]})

    # a budget spent before the first variant is measured: every variant is still built, verified and
    # judged; only the optional recovery is not started
    result = run_cli("build", "--profile", "jetson", "--config", str(tiny_project / "edgepack.yaml"),
                     "--out", str(tmp_path / "b"), "--time-budget", "0s")

    report = BuildReport.model_validate_json((tmp_path / "b" / "tiny-cnn-0.1.0-jetson-orin-nano.report.json").read_text())
    assert result.returncode == 0 and report.time_budget_s == 0.0
    assert report.cut_short == [next(c for c in report.cut_short if c.startswith("int8 accuracy recovery: not run, the build's time budget of 0 s was spent"))]
    int8 = report.variant("int8")
    assert not int8.passed and not int8.fallback_nodes and "int8" not in report.sensitivity
    assert "accuracy recovery not run: the build's time budget was spent" in int8.notes
    assert report.selected == "fp32"
    assert "cut short: int8 accuracy recovery: not run" in " ".join((result.stdout + result.stderr).split())

    bad = run_cli("build", "--profile", "jetson", "--config", str(tiny_project / "edgepack.yaml"),
                  "--out", str(tmp_path / "c"), "--time-budget", "soon")
    assert bad.returncode == 2 and "invalid duration 'soon': use e.g. 30s, 5m, 1h" in bad.stderr


# ---------------------------------------------------------------- bad input: exit 2, one line, nothing written


def _assert_clean_failure(result, out: Path, needle: str):
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert needle in result.stderr, result.stderr
    assert not out.exists() or not any(out.iterdir())


def test_truncated_model_is_exit_2_and_writes_nothing(tmp_path, tiny_project):
    model = tiny_project / "model.onnx"
    model.write_bytes(model.read_bytes()[:300])
    out = tmp_path / "dist"
    result = run_cli("build", "--profile", "rpi5", "--config", str(tiny_project / "edgepack.yaml"), "--out", str(out))
    _assert_clean_failure(result, out, "not a readable ONNX file")


def test_profile_with_an_unknown_field_is_exit_2(tmp_path, tiny_project):
    from hardware_profiles import PROFILES_DIR

    profile = yaml.safe_load((PROFILES_DIR / "rpi5.yaml").read_text())
    profile["turbo_mode"] = True
    path = tmp_path / "my-board.yaml"
    path.write_text(yaml.safe_dump(profile))
    out = tmp_path / "dist"
    result = run_cli("build", "--profile", str(path), "--config", str(tiny_project / "edgepack.yaml"), "--out", str(out))
    _assert_clean_failure(result, out, "turbo_mode")


def test_config_naming_missing_data_is_exit_2(tmp_path, tiny_project):
    write_config(tiny_project, data={"calibration": "nope/calib.npz"})
    out = tmp_path / "dist"
    result = run_cli("build", "--profile", "rpi5", "--config", str(tiny_project / "edgepack.yaml"), "--out", str(out))
    _assert_clean_failure(result, out, "nope/calib.npz")


def test_calibration_array_of_the_wrong_shape_is_exit_2(tmp_path, tiny_project):
    np.savez(tiny_project / "calib.npz", input=np.zeros((8, 1, 7, 7), np.float32))
    out = tmp_path / "dist"
    result = run_cli("build", "--profile", "rpi5", "--config", str(tiny_project / "edgepack.yaml"), "--out", str(out))
    _assert_clean_failure(result, out, "per-sample shape [1, 7, 7]")


def test_top1_without_labels_and_unknown_config_keys_are_exit_2(tmp_path, tiny_project):
    np.savez(tiny_project / "val.npz", input=np.zeros((8, 1, 8, 8), np.float32))
    out = tmp_path / "dist"
    result = run_cli("build", "--profile", "rpi5", "--config", str(tiny_project / "edgepack.yaml"), "--out", str(out))
    _assert_clean_failure(result, out, "needs labels")
    write_config(tiny_project, optimise={"precisions": ["int8"]})
    result = run_cli("build", "--profile", "rpi5", "--config", str(tiny_project / "edgepack.yaml"), "--out", str(out))
    _assert_clean_failure(result, out, "unknown field 'optimise'")


def test_unknown_profile_is_exit_2(tmp_path, tiny_project):
    out = tmp_path / "dist"
    result = run_cli("build", "--profile", "toaster", "--config", str(tiny_project / "edgepack.yaml"), "--out", str(out))
    _assert_clean_failure(result, out, "unknown profile 'toaster'")


def test_bundle_verify_on_a_built_bundle_good_tampered_and_other_key(tmp_path, keys):
    private, public = keys
    result = run_build(BuildRequest(config_path=DIGITS / "edgepack.yaml", profile="jetson", out_dir=tmp_path / "out", signing_key=private))
    bundle = Path(result.report.bundle.path)
    ok = run_cli("bundle", "verify", str(bundle), "--trusted-key", str(public))
    assert ok.returncode == 0 and "OK" in ok.stdout + ok.stderr
    # another key
    _, other_public = generate_keypair(tmp_path / "other")
    other = run_cli("bundle", "verify", str(bundle), "--trusted-key", str(other_public))
    assert other.returncode == 1 and "unknown key" in other.stderr
    # one byte of the model inside the tar changed in place
    data = bytearray(bundle.read_bytes())
    with tarfile.open(bundle) as tar:
        member = tar.getmember("model/model.onnx")
    data[member.offset_data + member.size // 2] ^= 0x01
    tampered = tmp_path / "tampered.edgepack"
    tampered.write_bytes(bytes(data))
    bad = run_cli("bundle", "verify", str(tampered), "--trusted-key", str(public))
    assert bad.returncode == 1 and "model/model.onnx" in bad.stderr and "Traceback" not in bad.stderr


def test_toolchain_docker_without_an_engine_says_so_and_builds_what_it_can(tmp_path, tiny_project):
    out = tmp_path / "dist"
    dead = tmp_path / "no-docker.sock"
    result = run_cli("build", "--profile", "jetson", "--config", str(tiny_project / "edgepack.yaml"), "--out", str(out),
                     "--toolchain", "docker", "--json", "--quiet", env={"DOCKER_HOST": f"unix://{dead}"})
    assert result.returncode == 0, result.stderr
    report = BuildReport.model_validate_json(result.stdout)
    (step,) = report.toolchain
    assert step.step == "trtexec" and step.status == "skipped"
    assert f"no Docker engine reachable at unix://{dead}" in step.message
    assert "trtexec" in result.stderr and report.bundle.path
