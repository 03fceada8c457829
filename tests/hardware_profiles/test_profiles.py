"""Bundled hardware profiles, the loader's errors, the `edgepack profiles` CLI, and the field reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from edgepack.errors import ProfileError
from hardware_profiles import PROFILES_DIR, list_profiles, load_profile
from hardware_profiles.schema import HardwareProfile

EXPECTED_PROFILES = {
    "jetson-orin-nano", "jetson-nano", "rpi5", "rpi4", "coral-devboard", "intel-nuc", "x86-avx2", "x86-avx512-vnni",
}
BUNDLED_FILES = sorted(PROFILES_DIR.glob("*.yaml"))


def _write_variant(tmp_path: Path, file_name: str, edit) -> Path:
    """Copy the bundled rpi5 profile to tmp_path, apply `edit` to its data, and return the new file."""
    data = yaml.safe_load((PROFILES_DIR / "rpi5.yaml").read_text(encoding="utf-8"))
    edit(data)
    path = tmp_path / file_name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "edgepack", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )


# --- bundled profiles --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", BUNDLED_FILES, ids=lambda p: p.stem)
def test_bundled_profile_loads_and_is_named_after_its_file(path: Path) -> None:
    profile = load_profile(path)

    assert profile.name == path.stem
    assert load_profile(profile.name) == profile


def test_all_expected_profiles_are_bundled() -> None:
    names = {profile.name for profile in list_profiles()}

    assert EXPECTED_PROFILES <= names


def test_names_and_aliases_are_unique_across_profiles() -> None:
    all_names = [name for profile in list_profiles() for name in profile.all_names]

    duplicates = sorted({name for name in all_names if all_names.count(name) > 1})
    assert duplicates == []


@pytest.mark.parametrize("alias", ["jetson", "orin-nano"])
def test_jetson_aliases_resolve_to_orin_nano(alias: str) -> None:
    assert load_profile(alias).name == "jetson-orin-nano"


@pytest.mark.parametrize("profile", list_profiles(), ids=lambda p: p.name)
def test_every_profile_offers_onnxruntime_and_cites_sources(profile: HardwareProfile) -> None:
    onnxruntime = profile.runtime("onnxruntime")

    assert onnxruntime is not None
    assert "CPUExecutionProvider" in onnxruntime.execution_providers
    assert profile.sources
    assert set(profile.precisions) <= set(profile.performance.peak_ops_per_s)


@pytest.mark.parametrize("path", BUNDLED_FILES, ids=lambda p: p.stem)
def test_peak_figures_are_yaml_numbers_not_strings(path: Path) -> None:
    # PyYAML reads `1.28e12` (no exponent sign) as a string; pydantic would coerce it silently.
    data = yaml.safe_load(path.read_text(encoding="utf-8"))

    peaks = data["performance"]["peak_ops_per_s"]
    assert all(isinstance(value, (int, float)) for value in peaks.values()), peaks


def test_jetson_orin_nano_uses_tensorrt_first_and_declares_trtexec() -> None:
    profile = load_profile("jetson")

    assert [runtime.name for runtime in profile.runtimes] == ["tensorrt", "onnxruntime"]
    assert profile.runtime("onnxruntime").execution_providers == (
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider",
    )
    assert "trtexec" in profile.toolchains


def test_coral_prefers_the_edgetpu_delegate_and_declares_its_compiler() -> None:
    profile = load_profile("coral-devboard")

    assert profile.runtimes[0].name == "tflite"
    assert profile.runtimes[0].delegates == ("edgetpu",)
    assert "edgetpu_compiler" in profile.toolchains


def test_cpu_features_separate_the_x86_and_arm_targets() -> None:
    assert load_profile("x86-avx512-vnni").has_feature("avx512_vnni")
    assert not load_profile("x86-avx2").has_feature("avx512_vnni")
    assert not load_profile("x86-avx2").has_feature("avx_vnni")
    assert load_profile("intel-nuc").has_feature("avx_vnni")
    assert not load_profile("intel-nuc").has_feature("avx512f")
    assert load_profile("rpi5").has_feature("dotprod")
    assert not load_profile("rpi4").has_feature("dotprod")


# --- user profiles and loader errors -----------------------------------------------------------------------


def test_user_yaml_path_loads(tmp_path: Path) -> None:
    path = _write_variant(tmp_path, "my-board.yaml", lambda data: data.update(name="my-board", aliases=[]))

    profile = load_profile(str(path))

    assert profile.name == "my-board"
    assert profile.cpu == load_profile("rpi5").cpu


def test_unknown_field_is_a_one_line_error_naming_the_field(tmp_path: Path) -> None:
    path = _write_variant(tmp_path, "typo.yaml", lambda data: data["cpu"].update(turbo_ghz=3.0))

    with pytest.raises(ProfileError) as caught:
        load_profile(path)

    message = caught.value.message
    assert "\n" not in message
    assert "cpu.turbo_ghz" in message
    assert "unknown field" in message


def test_wrong_type_is_a_one_line_error_naming_the_field(tmp_path: Path) -> None:
    path = _write_variant(tmp_path, "wrong-type.yaml", lambda data: data["cpu"].update(cores="four"))

    with pytest.raises(ProfileError) as caught:
        load_profile(path)

    message = caught.value.message
    assert "\n" not in message
    assert "cpu.cores" in message
    assert "four" in message


def test_unknown_profile_name_lists_the_known_ones() -> None:
    with pytest.raises(ProfileError) as caught:
        load_profile("no-such-board")

    assert "no-such-board" in caught.value.message
    assert "jetson-orin-nano" in caught.value.message


# --- CLI ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [("profiles",), ("profiles", "list")], ids=["default", "list"])
def test_cli_lists_profiles_as_a_table(args: tuple[str, ...], tmp_path: Path) -> None:
    result = _run_cli(*args, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    for name in EXPECTED_PROFILES:
        assert name in result.stdout


@pytest.mark.parametrize("args", [("profiles", "--json"), ("profiles", "list", "--json")], ids=["default", "list"])
def test_cli_lists_profiles_as_one_json_document(args: tuple[str, ...], tmp_path: Path) -> None:
    result = _run_cli(*args, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    documents = json.loads(result.stdout)
    assert {document["name"] for document in documents} == {profile.name for profile in list_profiles()}
    assert all(HardwareProfile.model_validate(document) for document in documents)


def test_cli_show_prints_every_section(tmp_path: Path) -> None:
    result = _run_cli("profiles", "show", "jetson", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    for text in ("jetson-orin-nano", "cpu", "opset", "memory", "performance", "default_gates", "runtimes",
                 "TensorrtExecutionProvider", "sources", "trtexec"):
        assert text in result.stdout


def test_cli_show_json_by_alias(tmp_path: Path) -> None:
    result = _run_cli("profiles", "show", "jetson", "--json", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document == load_profile("jetson-orin-nano").model_dump(mode="json")


def test_cli_show_json_by_user_path(tmp_path: Path) -> None:
    path = _write_variant(tmp_path, "edge-box.yaml", lambda data: data.update(name="edge-box", aliases=[]))

    result = _run_cli("profiles", "show", str(path), "--json", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["name"] == "edge-box"


def test_cli_unknown_profile_is_one_line_on_stderr_and_exit_2(tmp_path: Path) -> None:
    result = _run_cli("profiles", "show", "no-such-board", cwd=tmp_path)

    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "no-such-board" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_invalid_user_profile_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = _write_variant(tmp_path, "bad.yaml", lambda data: data["memory"].update(ram_gb=8))

    result = _run_cli("profiles", "show", str(path), cwd=tmp_path)

    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "memory.ram_gb" in result.stderr
    assert "Traceback" not in result.stderr


# --- docs --------------------------------------------------------------------------------------------------


def _nested_model(annotation: object) -> tuple[type[BaseModel] | None, bool]:
    """The pydantic model inside an annotation (X, X | None, tuple[X, ...]) and whether it is a sequence."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin = typing.get_origin(annotation)
    for arg in typing.get_args(annotation):
        model, _ = _nested_model(arg)
        if model is not None:
            return model, origin in (tuple, list)
    return None, False


def _field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    paths = []
    for field_name, field in model.model_fields.items():
        path = f"{prefix}{field_name}"
        paths.append(path)
        nested, is_sequence = _nested_model(field.annotation)
        if nested is not None:
            paths.extend(_field_paths(nested, f"{path}[]." if is_sequence else f"{path}."))
    return paths


def test_field_path_walker_sees_nested_and_listed_models() -> None:
    paths = _field_paths(HardwareProfile)

    assert "cpu.features" in paths
    assert "runtimes[].execution_providers" in paths
    assert "performance.peak_ops_per_s" in paths
    assert "default_gates.max_accuracy_drop" in paths


def test_readme_documents_every_profile_field() -> None:
    readme = (PROFILES_DIR / "README.md").read_text(encoding="utf-8")

    undocumented = [path for path in _field_paths(HardwareProfile) if f"`{path}`" not in readme]
    assert undocumented == []
