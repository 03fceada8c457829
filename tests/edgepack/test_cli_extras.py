"""A command whose extra is missing says which extra to install, in an environment that really lacks it.

The agent image installs only `edgepack[agent]`. The `agent_only` fixture rebuilds that install from
this venv: a folder of links to exactly the distributions `pip install 'edgepack[agent]'` pulls in
(the requirement closure read from the installed metadata, each distribution's files from its
RECORD) plus edgepack's own packages, run with `python -S` so no site-packages folder is on the path.
onnx, fastapi, uvicorn, httpx are then not importable, as on the device.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import subprocess
import sys
import tomllib
from collections import defaultdict
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from edgepack.cli import MOUNTS, _command_path
from edgepack.cli.extras import MODULE_EXTRAS, missing_extra
from tests.support import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
NOT_SUGGESTED = {"dev", "all"}  # no command needs them, so the table leaves them out


def _closure(extras: set[str]) -> dict[str, metadata.Distribution]:
    """Every distribution `pip install 'edgepack[EXTRAS]'` installs, edgepack excluded."""
    found: dict[str, metadata.Distribution] = {}
    pending: list[tuple[str, set[str]]] = [("edgepack", extras)]
    expanded: set[tuple[str, str]] = set()
    while pending:
        name, wanted = pending.pop()
        key = canonicalize_name(name)
        distribution = metadata.distribution(name)
        if key != "edgepack":
            found[key] = distribution
        for extra in wanted or {""}:
            if (key, extra) in expanded:
                continue
            expanded.add((key, extra))
            for text in distribution.requires or []:
                requirement = Requirement(text)
                if requirement.marker is None or requirement.marker.evaluate({"extra": extra}):
                    pending.append((requirement.name, set(requirement.extras)))
    return found


def _link_distribution(distribution: metadata.Distribution, site: Path) -> None:
    tops = {Path(str(entry)).parts[0] for entry in distribution.files or []}
    for top in tops - {"..", "__pycache__"}:
        if top.endswith(".pth") or (site / top).exists():
            continue
        source = Path(distribution.locate_file(top))
        if source.exists():
            (site / top).symlink_to(source)


def _install(extras: set[str], folder: Path) -> Path:
    """A site-packages folder holding what `pip install 'edgepack[EXTRAS]'` installs, and nothing else."""
    site = folder / "site-packages"
    site.mkdir()
    for distribution in _closure(extras).values():
        _link_distribution(distribution, site)
    for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        (site / package).symlink_to(REPO / package)
    return site


@pytest.fixture(scope="module")
def agent_only(tmp_path_factory) -> Path:
    """`pip install 'edgepack[agent]'`: the agent image."""
    return _install({"agent"}, tmp_path_factory.mktemp("agent-only"))


@pytest.fixture(scope="module")
def core_only(tmp_path_factory) -> Path:
    """`pip install edgepack`: no extra at all."""
    return _install(set(), tmp_path_factory.mktemp("core-only"))


def run_in(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "EDGEPACK_"))}
    env.update(PYTHONPATH=str(site), PYTHONNOUSERSITE="1", COLUMNS="200", NO_COLOR="1")
    return subprocess.run([sys.executable, "-S", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def edgepack_in(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_in(site, "-m", "edgepack", *args, cwd=cwd)


def test_the_agent_only_environment_has_the_agent_and_lacks_the_builder_and_fleet(agent_only, tmp_path):
    probe = ("import importlib.util as u, sys; import device_agent.agent, device_agent.inference, onnxruntime, paho.mqtt; "
             "print(sorted(m for m in ('onnx', 'fastapi', 'uvicorn', 'sqlalchemy', 'httpx') if u.find_spec(m)), "
             "[p for p in sys.path if 'site-packages' in p and p != sys.argv[1]])")
    result = run_in(agent_only, "-c", probe, str(agent_only), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] []"


def test_help_lists_every_command_without_the_builder_or_fleet_extra(agent_only, tmp_path):
    root = edgepack_in(agent_only, "--help", cwd=tmp_path)
    build = edgepack_in(agent_only, "build", "--help", cwd=tmp_path)
    serve = edgepack_in(agent_only, "fleet", "serve", "--help", cwd=tmp_path)

    assert root.returncode == 0, root.stderr
    listed = {line.split()[1] for line in root.stdout.splitlines() if line.startswith("│ ") and len(line.split()) > 2}
    assert {mount.name for mount in MOUNTS} <= listed
    assert build.returncode == 0 and "--profile" in build.stdout
    assert serve.returncode == 0 and "--mqtt-url" in serve.stdout


@pytest.mark.parametrize(("args", "line"), [
    (["build", "--profile", "jetson", "--config", str(REPO / "examples" / "digits" / "edgepack.yaml")],
     "error: 'edgepack build' needs the builder extra: pip install 'edgepack[builder]' (missing module: onnx)"),
    (["fleet", "serve", "--port", "0", "--data-dir", "fleet-data"],
     "error: 'edgepack fleet serve' needs the fleet extra: pip install 'edgepack[fleet]' (missing module: uvicorn)"),
    (["devices", "list", "--token", "adm_x"],
     "error: 'edgepack devices list' needs the fleet extra: pip install 'edgepack[fleet]' (missing module: httpx)"),
])
def test_a_command_whose_extra_is_missing_exits_2_with_one_line_naming_it(agent_only, tmp_path, args, line):
    result = edgepack_in(agent_only, *args, cwd=tmp_path)

    assert (result.returncode, result.stderr.splitlines(), result.stdout) == (2, [line], "")
    assert not (tmp_path / "fleet-data").exists()  # nothing half-started


def test_a_testbed_run_names_all_three_extras_before_it_starts_anything(agent_only, tmp_path):
    result = edgepack_in(agent_only, "testbed", "run", "healthy", "--work-dir", "work", cwd=tmp_path)

    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("error: 'edgepack testbed run' needs the builder, fleet and agent extras: "
                           "pip install 'edgepack[builder,fleet,agent]' (missing module: ")
    assert not (tmp_path / "work").exists()


def test_without_any_extra_the_agent_names_the_agent_extra_and_the_shared_commands_work(core_only, tmp_path):
    (tmp_path / "agent.yaml").write_text("device_id: cam-017\n")
    agent = edgepack_in(core_only, "agent", "run", "--config", "agent.yaml", cwd=tmp_path)
    keys = edgepack_in(core_only, "keys", "generate", "keys", "--json", cwd=tmp_path)
    profiles = edgepack_in(core_only, "profiles", "show", "jetson", "--json", cwd=tmp_path)

    assert agent.returncode == 2  # before reading its config, so before spending an enrollment token
    assert agent.stderr.splitlines() == ["error: 'edgepack agent run' needs the agent extra: pip install 'edgepack[agent]' "
                                         "(missing module: paho)"]
    assert keys.returncode == 0 and (tmp_path / "keys" / "edgepack.pub").is_file()
    assert profiles.returncode == 0 and '"name": "jetson' in profiles.stdout


def test_debug_shows_the_missing_module_s_traceback_instead(agent_only, tmp_path):
    result = edgepack_in(agent_only, "--debug", "fleet", "push", "b.edgepack", "--token", "adm_x", cwd=tmp_path)

    assert result.returncode == 1
    assert "Traceback" in result.stderr and result.stderr.rstrip().endswith("ModuleNotFoundError: No module named 'httpx'")


def test_the_agent_extra_is_enough_for_the_agent_commands(agent_only, tmp_path):
    config = {"device_id": "cam-017", "profile": "rpi4", "fleet_url": "http://127.0.0.1:9", "mqtt_url": "mqtt://127.0.0.1:9",
              "state_dir": "state", "trusted_keys": ["edgepack.pub"]}
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(config))

    result = edgepack_in(agent_only, "agent", "status", "--config", "agent.yaml", "--json", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert '"device_id": "cam-017"' in result.stdout


def _modules_of(distribution: str) -> set[str]:
    modules = defaultdict(set)
    for module, names in metadata.packages_distributions().items():
        for name in names:
            modules[canonicalize_name(name)].add(module)
    return modules[canonicalize_name(distribution)]


def test_the_module_table_matches_the_extras_in_pyproject():
    declared: dict[str, set[str]] = defaultdict(set)  # module → extras that install it, read from pyproject
    for extra, requirements in PYPROJECT["project"]["optional-dependencies"].items():
        if extra in NOT_SUGGESTED:
            continue
        for text in requirements:
            requirement = Requirement(text)
            if canonicalize_name(requirement.name) == "edgepack":
                continue  # edgepack[builder] inside openvino/tflite: the builder's modules are listed under builder
            modules = _modules_of(requirement.name) & set(MODULE_EXTRAS)
            assert modules, f"no module of {requirement.name} (extra {extra}) in edgepack/cli/extras.py MODULE_EXTRAS"
            for module in modules:
                declared[module].add(extra)

    assert {module: set(extras) for module, extras in MODULE_EXTRAS.items()} == dict(declared)
    for module, extras in MODULE_EXTRAS.items():
        order = list(PYPROJECT["project"]["optional-dependencies"])
        assert list(extras) == sorted(extras, key=order.index), f"{module}: extras not in pyproject order"


def _missing(module: str) -> ModuleNotFoundError:
    return ModuleNotFoundError(f"No module named '{module}'", name=module)


def test_a_module_several_extras_provide_names_the_extra_of_the_command():
    build = missing_extra(_missing("onnxruntime"), "edgepack build", ("builder",))
    agent = missing_extra(_missing("onnxruntime.capi"), "edgepack agent run", ("agent",))

    assert build.message == "'edgepack build' needs the builder extra: pip install 'edgepack[builder]' (missing module: onnxruntime)"
    assert agent.message == "'edgepack agent run' needs the agent extra: pip install 'edgepack[agent]' (missing module: onnxruntime)"
    assert (agent.exit_code, agent.extras, agent.module) == (2, ("agent",), "onnxruntime")


def test_a_testbed_names_every_extra_it_needs_and_a_foreign_module_names_its_own_extra():
    testbed = missing_extra(_missing("fastapi"), "edgepack testbed run", ("builder", "fleet", "agent"))
    openvino = missing_extra(_missing("openvino"), "edgepack build", ("builder",))
    core = missing_extra(_missing("docker"), "edgepack bundle verify", ())

    assert testbed.message == ("'edgepack testbed run' needs the builder, fleet and agent extras: "
                               "pip install 'edgepack[builder,fleet,agent]' (missing module: fastapi)")
    assert openvino.message == "'edgepack build' needs the openvino extra: pip install 'edgepack[openvino]' (missing module: openvino)"
    assert core.message.startswith("'edgepack bundle verify' needs the toolchain extra: pip install 'edgepack[toolchain]'")


def test_an_import_error_no_extra_explains_stays_an_internal_error():
    assert missing_extra(_missing("builder.nonexistent"), "edgepack build", ("builder",)) is None
    assert missing_extra(ImportError("boom"), "edgepack build", ("builder",)) is None
    broken = missing_extra(ImportError("cannot import name 'InferenceSession' from 'onnxruntime'", name="onnxruntime"),
                           "edgepack agent run", ("agent",))
    assert broken.message.endswith("(cannot import onnxruntime: cannot import name 'InferenceSession' from 'onnxruntime')")


def test_the_command_path_skips_flags_and_stops_at_arguments():
    assert _command_path(["--debug", "fleet", "serve", "--port", "8080"]) == ["fleet", "serve"]
    assert _command_path(["build", "--profile", "jetson"]) == ["build"]
    assert _command_path(["rollout", "status", "fleet"]) == ["rollout", "status"]
    assert _command_path(["nonsense"]) == []


def test_help_imports_no_component_s_heavy_dependency(tmp_path):
    """`edgepack --help` stays fast because the component CLIs import their backends inside the commands."""
    heavy = sorted({*MODULE_EXTRAS, "numpy"})
    probe = ("import sys; from edgepack.cli import main\n"
             "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             f"print(sorted(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "[]"


def test_each_mounted_name_carries_its_component_s_extras():
    from edgepack.cli import _extras

    components = {"build": ("builder",), "fleet": ("fleet",), "devices": ("fleet",), "rollout": ("fleet",), "tokens": ("fleet",),
                  "agent": ("agent",), "testbed": ("builder", "fleet", "agent")}
    shared_contracts = {name: extras for name, extras in _extras.items() if name not in components}

    assert {name: _extras[name] for name in components} == components
    assert set(shared_contracts) >= {"profiles", "keys", "bundle"}
    assert set(shared_contracts.values()) == {()}  # keys, bundle, profiles, schema need the core install only
