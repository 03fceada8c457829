"""Docs that cannot rot: every pass, CLI command and config field is in the README."""

from __future__ import annotations

import re

from pydantic import BaseModel

from builder.passes.base import load_all_passes
from edgepack.cli import app
from edgepack.config import BuildConfig
from tests.support import REPO

README = (REPO / "README.md").read_text()


def _fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        names.append(prefix + name)
        annotation = field.annotation
        for candidate in getattr(annotation, "__args__", (annotation,)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                names += _fields(candidate, prefix + name + ".")
    return names


def test_every_pass_is_documented():
    for name in load_all_passes():
        assert f"`{name}`" in README, f"pass {name} is not in README.md"


def test_every_cli_command_is_documented():
    import typer.main

    group = typer.main.get_group(app)
    for name, command in group.commands.items():
        assert f"edgepack {name}" in README, f"command {name} is not in README.md"
        for sub in getattr(command, "commands", {}):
            assert f"edgepack {name} {sub}" in README, f"command {name} {sub} is not in README.md"


def test_every_config_field_is_documented():
    config_section = README[README.index("## The build config"):README.index("## What the builder does")]
    for dotted in _fields(BuildConfig):
        leaf = dotted.split(".")[-1]
        assert re.search(rf"\b{re.escape(leaf)}\b", config_section), f"config field {dotted} is not in README.md"


# ---------------------------------------------------------------------------------------------------
# The generated references (docs/CLI.md, docs/REFERENCE.md): every command, option, setting, config key,
# gate metric and contract field has its place, and the files are what `python docs/gen_reference.py` writes.

DOCS = REPO / "docs"


def _reference():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_reference", DOCS / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _section(text: str, heading: str) -> str:
    """The text under `heading` (a whole line) up to the next heading of the same or a higher level."""
    level = heading.split(" ", 1)[0]
    lines = text.splitlines()
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines))
                if lines[i].startswith("#") and len(lines[i].split(" ", 1)[0]) <= len(level)), len(lines))
    return "\n".join(lines[start:end])


def test_every_command_and_option_is_in_the_cli_reference():
    import typer.main

    cli_doc = (DOCS / "CLI.md").read_text()
    for path, command in _reference().walk(typer.main.get_command(app), []):
        name = "edgepack " + " ".join(path)
        heading = ("## " if hasattr(command, "commands") else "### ") + name
        assert heading in cli_doc.splitlines(), f"`{name}` has no section in docs/CLI.md (run python docs/gen_reference.py)"
        if hasattr(command, "commands"):
            continue
        section = _section(cli_doc, heading)
        for param in command.params:
            if param.param_type_name == "option" and param.name != "help":
                assert any(f"`{opt}`" in section for opt in param.opts), f"{name} {param.opts[0]} is not in docs/CLI.md"


def test_every_fleet_setting_and_env_var_is_documented():
    from fleet.settings import FleetSettings

    section = _section((DOCS / "REFERENCE.md").read_text(), "## Fleet settings")
    for name, field in FleetSettings.model_fields.items():
        env = (field.json_schema_extra or {})["env"]
        assert f"`{name}`" in section and f"`{env}`" in section, f"fleet setting {name} ({env}) is not in docs/REFERENCE.md"


def test_every_agent_config_key_is_documented():
    from device_agent.config import AgentConfig

    section = _section((DOCS / "REFERENCE.md").read_text(), "## Agent config (`agent.yaml`)")
    for dotted, _type, _meaning in _reference().model_fields(AgentConfig):
        assert f"`{dotted}`" in section, f"agent config key {dotted} is not in docs/REFERENCE.md"


def test_every_gate_metric_is_documented():
    from fleet.services.gates import METRIC_SOURCES

    section = _section((DOCS / "REFERENCE.md").read_text(), "## Gate metrics")
    architecture = (DOCS / "ARCHITECTURE.md").read_text()
    for name in METRIC_SOURCES:
        assert f"`{name}`" in section, f"gate metric {name} is not in docs/REFERENCE.md"
        assert name in README or name in architecture, f"gate metric {name} is in neither README.md nor docs/ARCHITECTURE.md"


def test_every_manifest_report_and_matrix_field_is_documented():
    from edgepack.manifest import BundleManifest, SelftestSpec
    from edgepack.report import BuildMatrix, BuildReport

    reference = (DOCS / "REFERENCE.md").read_text()
    for model, heading in ((BundleManifest, "## Bundle manifest (`manifest.json`)"),
                           (SelftestSpec, "## Self-test spec (`selftest/cases.json`)"),
                           (BuildReport, "## Build report (`<name>-<version>-<profile>.report.json`)"),
                           (BuildMatrix, "## Matrix (`<name>-<version>.matrix.json`)")):
        section = _section(reference, heading)
        for dotted, _type, _meaning in _reference().model_fields(model):
            assert f"`{dotted}`" in section, f"{model.__name__} field {dotted} is not in docs/REFERENCE.md"


def test_generated_references_are_current():
    reference = _reference()
    assert (DOCS / "CLI.md").read_text() == reference.render(), "docs/CLI.md is stale: run python docs/gen_reference.py"
    assert (DOCS / "REFERENCE.md").read_text() == reference.render_reference(), \
        "docs/REFERENCE.md is stale: run python docs/gen_reference.py"


def test_docs_point_at_nothing_outside_the_repository():
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        path = REPO / name
        if path.suffix not in (".py", ".md", ".yaml", ".yml", ".toml", ".cfg", ".txt") or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        outside = ("..", "/shared/")  # spelled in two parts so this file does not match itself
        assert "".join(outside) not in text and "shared/DESIGN" + ".md" not in text, \
            f"{name} points at a file outside the repository"


CONTRACT_TABLES = ("## Agent config (`agent.yaml`)", "## Bundle manifest (`manifest.json`)",
                   "## Self-test spec (`selftest/cases.json`)", "## Build report (`<name>-<version>-<profile>.report.json`)",
                   "## Matrix (`<name>-<version>.matrix.json`)")


def test_every_contract_field_says_what_it_means():
    # The meaning is the field's pydantic description: a field added without one fails here, not in review.
    reference = (DOCS / "REFERENCE.md").read_text()
    for heading in CONTRACT_TABLES:
        rows = [line for line in _section(reference, heading).splitlines() if line.startswith("| `")]
        assert rows, f"{heading} has no field rows in docs/REFERENCE.md"
        for row in rows:
            cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]]  # `\|` is a pipe inside a cell
            assert len(cells) == 3, f"{heading}: malformed row {row!r}"
            field, _type, meaning = cells
            assert meaning, f"{heading}: {field} has no meaning: give it a description= and run python docs/gen_reference.py"
