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
