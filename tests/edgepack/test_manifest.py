"""The typed manifest: what a real build writes reads back byte for byte, a malformed one is one line
naming the field (in the library, `edgepack bundle verify`), and the validation-error helper's lines."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from edgepack.bundle import canonical_json, open_bundle, write_bundle
from edgepack.errors import BundleError, first_validation_error, validation_error_field
from edgepack.manifest import BundleManifest, ManifestContent, SelftestSpec, parse_manifest, parse_selftest_spec
from edgepack.signing import generate_keypair, load_private_key, load_public_key
from tests.edgepack.samples import resign_with_manifest
from tests.support import REPO, run_cli


@pytest.fixture(scope="module")
def jetson(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(bundle, private key, public key) of digits built for jetson, in folders of this module's own."""
    root = tmp_path_factory.mktemp("jetson")
    private, public = generate_keypair(root / "keys")
    env = {"XDG_CONFIG_HOME": str(root / "config"), "EDGEPACK_CACHE_DIR": str(root / "cache")}
    result = run_cli("build", "--profile", "jetson", "--config", str(REPO / "examples/digits/edgepack.yaml"),
                     "--out", str(root / "dist"), "--signing-key", str(private), "--quiet", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return next((root / "dist").glob("*.edgepack")), private, public


def _member(bundle: Path, name: str) -> bytes:
    with tarfile.open(bundle) as tar:
        return tar.extractfile(name).read()


def test_a_built_manifest_reads_back_to_the_same_bytes(jetson):
    bundle, _, _ = jetson
    written = _member(bundle, "manifest.json")

    manifest = parse_manifest(json.loads(written))

    assert canonical_json(manifest.to_json_dict()) == written
    assert manifest.schema_version == 1 and manifest.tensorrt is not None and manifest.edgetpu is None
    assert b'"edgetpu"' not in written and b'"io_quantization"' not in written  # absent sections stay absent


def test_rewriting_a_bundle_from_its_typed_manifest_gives_the_same_file(jetson, tmp_path):
    bundle, private, public = jetson
    verified = open_bundle(bundle, [load_public_key(public)])
    members = {name: verified.read(name) for name in verified.members}

    again = write_bundle(tmp_path / bundle.name, members, verified.manifest.content, load_private_key(private))

    assert isinstance(verified.manifest.content, ManifestContent) and not isinstance(verified.manifest.content, BundleManifest)
    assert again.path.read_bytes() == bundle.read_bytes()


def test_the_selftest_spec_reads_back_to_the_same_bytes(jetson):
    bundle, _, _ = jetson
    written = _member(bundle, "selftest/cases.json")

    spec = parse_selftest_spec(json.loads(written))

    assert isinstance(spec, SelftestSpec) and len(spec.cases) == 4
    assert canonical_json(spec.to_json_dict()) == written


def _resigned(bundle: Path, dest: Path, private: Path, change) -> Path:
    resign_with_manifest(bundle, dest, private, change)
    return dest


@pytest.mark.parametrize(("change", "line"), [
    (lambda m: m["io"].pop("inputs"), "error: manifest.json: field 'io.inputs' is missing"),
    (lambda m: m["metrics"].update(size_bytes="big"),
     "error: manifest.json: field 'metrics.size_bytes': Input should be a valid integer, unable to parse string as an integer (got 'big')"),
    (lambda m: m["files"]["model/model.onnx"].update(sha256="0" * 63),
     "error: manifest.json: field 'files.model/model.onnx.sha256': String should match pattern '^[0-9a-f]{64}$' (got '" + "0" * 59 + "…)"),
])
def test_bundle_verify_refuses_a_malformed_signed_manifest_in_one_line_naming_the_field(jetson, tmp_path, change, line):
    bundle, private, public = jetson
    crafted = _resigned(bundle, tmp_path / "bad.edgepack", private, change)

    result = run_cli("bundle", "verify", str(crafted), "--trusted-key", str(public))

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip() == line


def test_the_fleet_and_library_see_the_same_line(jetson, tmp_path):
    bundle, private, public = jetson
    crafted = _resigned(bundle, tmp_path / "bad.edgepack", private, lambda m: m.pop("envelope"))

    with pytest.raises(BundleError) as caught:
        open_bundle(crafted, [load_public_key(public)])

    assert str(caught.value) == "manifest.json: field 'envelope' is missing"
    assert (caught.value.field, caught.value.member) == ("envelope", "manifest.json")


def test_bundle_inspect_shows_a_malformed_manifest_with_its_problem(jetson, tmp_path):
    bundle, private, _ = jetson
    crafted = _resigned(bundle, tmp_path / "bad.edgepack", private, lambda m: m.pop("lineage"))

    result = run_cli("bundle", "inspect", str(crafted), "--json")

    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["manifest_problem"] == "manifest.json: field 'lineage' is missing"
    assert document["bundle_sha256"] == hashlib.sha256(crafted.read_bytes()).hexdigest()


# --- first validation error → one line --------------------------------------------------------------


class _Tensor(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    shape: list[int]


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: list[_Tensor]
    port: int = 0


def _error(data: dict) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        _Doc.model_validate(data)
    return caught.value


def test_a_missing_field_is_named_with_its_path():
    exc = _error({"inputs": [{"name": "x", "shape": [1]}, {"shape": [1]}]})

    assert first_validation_error(exc, "doc.json") == "doc.json: field 'inputs[1].name' is missing"
    assert validation_error_field(exc) == "inputs[1].name"


def test_an_unknown_field_is_named():
    assert first_validation_error(_error({"inputs": [], "prot": 1}), "agent.yaml") == "agent.yaml: unknown field 'prot'"


def test_a_wrong_value_says_what_was_given_and_other_problems_can_be_counted():
    exc = _error({"inputs": [{"name": "x", "shape": [1, "two"]}], "port": "x"})

    assert first_validation_error(exc, "doc.json") == (
        "doc.json: field 'inputs[0].shape[1]': Input should be a valid integer, unable to parse string as an integer (got 'two')")
    assert first_validation_error(exc, "doc.json", count_others=True).endswith(" (got 'two') (+1 more problem)")
