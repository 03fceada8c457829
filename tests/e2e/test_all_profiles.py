"""Issue 3 acceptance: one command builds digits for all eight profiles, each verified in its own runtime;
the PP-OCR classifier builds for intel-nuc and rpi5."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import jsonschema
import pytest

from edgepack.bundle import canonical_json, open_bundle
from edgepack.manifest import parse_manifest
from edgepack.report import BuildMatrix
from edgepack.signing import generate_keypair, load_public_key
from hardware_profiles import list_profiles
from testbeds import ppocr_cls
from tests.support import REPO, run_cli

RUNTIME_OF = {"onnxruntime": "onnxruntime", "tensorrt": "onnxruntime", "openvino": "openvino", "tflite": "tflite"}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return generate_keypair(tmp_path_factory.mktemp("keys"))


def test_digits_builds_for_all_eight_profiles_in_one_command(tmp_path, keys):
    private, public = keys
    out = tmp_path / "dist"
    result = run_cli("build", "--all-profiles", "--config", str(REPO / "examples/digits/edgepack.yaml"), "--out", str(out),
                     "--signing-key", str(private), "--quiet", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    matrix = BuildMatrix.model_validate_json(result.stdout)
    assert sorted(e.profile for e in matrix.profiles) == sorted(p.name for p in list_profiles())
    trusted = [load_public_key(public)]
    # every manifest the builder writes validates against `edgepack schema manifest` (checked by jsonschema,
    # not pydantic) and reads back through the typed model to the very bytes that were signed
    manifest_schema = jsonschema.Draft202012Validator(json.loads(run_cli("schema", "manifest").stdout))
    runtimes_seen = set()
    for entry in matrix.profiles:
        with tarfile.open(entry.bundle.path) as tar:
            written = tar.extractfile("manifest.json").read()
        assert [error.message for error in manifest_schema.iter_errors(json.loads(written))] == [], entry.profile
        assert canonical_json(parse_manifest(json.loads(written)).to_json_dict()) == written, entry.profile
        chosen = next(v for v in entry.variants if v.name == entry.selected)
        # verified in the runtime that will run it, and within half a point of float
        assert chosen.verified_in == RUNTIME_OF[chosen.runtime]
        assert abs(chosen.accuracy_delta) <= 0.005, (entry.profile, chosen)
        runtimes_seen.add(chosen.verified_in)
        bundle = open_bundle(Path(entry.bundle.path), trusted)
        assert bundle.manifest.profile == entry.profile and bundle.manifest.runtime == chosen.runtime
    assert runtimes_seen == {"onnxruntime", "openvino", "tflite"}

    coral = next(e for e in matrix.profiles if e.profile == "coral-devboard")
    bundle = open_bundle(Path(coral.bundle.path), trusted)
    io = bundle.manifest.io_quantization
    assert {t.dtype for t in io.inputs + io.outputs} == {"int8"}
    placement = bundle.manifest.edgetpu
    assert placement.compiler_command.startswith("edgetpu_compiler") and placement.placement
    assert (out / "digits-cnn-1.0.0.matrix.html").is_file()


def test_ppocr_classifier_builds_for_intel_nuc_and_rpi5(tmp_path, keys):
    private, public = keys
    project = ppocr_cls.make_project(tmp_path / "ppocr")
    out = tmp_path / "dist"
    result = run_cli("build", "--profile", "intel-nuc", "--profile", "rpi5", "--config", str(project), "--out", str(out),
                     "--signing-key", str(private), "--quiet", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    matrix = BuildMatrix.model_validate_json(result.stdout)
    for entry in matrix.profiles:
        assert entry.selected, entry
        open_bundle(Path(entry.bundle.path), [load_public_key(public)])
        runtimes = {v.runtime for v in entry.variants}
        if entry.profile == "intel-nuc":
            assert "openvino" in runtimes
        else:
            # TFLite either converted, or failed with one note and its log published next to the report
            tflite_failed = any("onnx2tf cannot convert" in n for n in entry.notes)
            assert "tflite" in runtimes or (tflite_failed and list(out.glob("*rpi5.onnx2tf.log")))
