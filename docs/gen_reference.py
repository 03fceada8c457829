"""Write the reference docs from the code itself: `python docs/gen_reference.py` (or `make docs`).

    docs/CLI.md        every command and option of `edgepack`
    docs/REFERENCE.md  fleet settings (flags and env vars), agent config keys, gate metrics, and every field of
                       the bundle manifest, the build report and the matrix

tests/test_docs.py checks that every command, option, setting, config key, gate metric and contract field has
its place in these files, so a new one fails the suite until this is run again (and the diff reviewed). The
descriptions come from the code (help texts, pydantic `description=`), so they are written once, where they act.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer.main

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgepack.cli import app  # noqa: E402

HEADER = """# edgepack command reference

Generated from the CLI by `python docs/gen_reference.py`; `tests/test_docs.py` fails when a command or an
option is missing here. Every command that shows state takes `--json` and then prints one JSON document on stdout.
Exit codes: 0 success, 1 a gate or verification failed, 2 bad input (one line on stderr; `edgepack --debug …` shows
the traceback). A command whose extra is not installed exits 2 and names the extra.
"""


def walk(command, path: list[str]):
    # typer ships its own click (typer._click), so go by shape, not by class
    if hasattr(command, "commands"):
        if path:
            yield path, command
        for name in sorted(command.commands):
            yield from walk(command.commands[name], path + [name])
    else:
        yield path, command


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def render() -> str:
    root = typer.main.get_command(app)
    out = [HEADER]
    for path, command in walk(root, []):
        if hasattr(command, "commands"):
            out.append(f"\n## edgepack {' '.join(path)}\n\n{_one_line(command.help)}\n")
            continue
        out.append(f"\n### edgepack {' '.join(path)}\n")
        out.append(f"{_one_line(command.help).split(' Every option also reads')[0]}\n")
        arguments = [p for p in command.params if p.param_type_name == "argument"]
        options = [p for p in command.params if p.param_type_name == "option" and p.name != "help"]
        if arguments:
            out.append("\nArguments: " + ", ".join(f"`{a.name.upper()}`" for a in arguments) + "\n")
        if options:
            out.append("\n| option | meaning |\n|---|---|")
            for option in options:
                names = " / ".join(f"`{name}`" for name in option.opts + option.secondary_opts)
                envvar = f" (env `{option.envvar}`)" if isinstance(option.envvar, str) else ""
                out.append(f"| {names} | {_one_line(option.help)}{envvar} |")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


REFERENCE_HEADER = """# edgepack reference: settings, config keys, gate metrics, contract fields

Generated from the code by `python docs/gen_reference.py`; `tests/test_docs.py` fails when one is missing here.
Each contract is a pydantic model with a `schema_version`; `edgepack schema manifest|report|telemetry|desired`
prints its JSON Schema. Field names are dotted paths (`io.inputs[].shape`: a list of objects with a `shape`).
"""


def _type_name(annotation) -> str:
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type_name(a) for a in args)}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _type_text(annotation) -> str:
    return _type_name(annotation)


def _nested_models(annotation, in_container: bool = False):
    """(model, inside a list/dict?) for every pydantic model an annotation holds."""
    import typing

    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation, in_container
        return
    origin = typing.get_origin(annotation)
    container = in_container or origin in (list, tuple, set, frozenset, dict)
    for arg in typing.get_args(annotation):
        yield from _nested_models(arg, container)


def model_fields(model, prefix: str = "", seen: tuple = ()) -> list[tuple[str, str, str]]:
    """(dotted name, type, description) of every field of a pydantic model, nested models included."""
    rows = []
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        dotted = prefix + (field.alias or name)
        rows.append((dotted, _type_text(field.annotation), _one_line(field.description)))
        for nested, in_container in _nested_models(field.annotation):
            if nested in seen:
                continue
            rows += model_fields(nested, dotted + ("[]." if in_container else "."), seen + (model, nested))
    return rows


def _table(rows: list[tuple[str, str, str]]) -> list[str]:
    out = ["| field | type | meaning |", "|---|---|---|"]
    out += [f"| `{name}` | {type_} | {meaning} |" for name, type_, meaning in rows]
    return out + [""]


def render_reference() -> str:
    from device_agent.config import AgentConfig
    from edgepack.manifest import BundleManifest, SelftestSpec
    from edgepack.report import BuildMatrix, BuildReport
    from fleet.services.gates import METRIC_SOURCES
    from fleet.settings import FleetSettings

    out = [REFERENCE_HEADER]
    out += ["\n## Fleet settings\n",
            "Each is an option of `edgepack fleet serve` (the field name with `-` for `_`) and an environment variable;",
            "the option wins.\n", "| setting | env | default | meaning |", "|---|---|---|---|"]
    for name, field in FleetSettings.model_fields.items():
        env = (field.json_schema_extra or {}).get("env", "")
        default = "generated" if name == "admin_token" else repr(field.default)
        out.append(f"| `{name}` | `{env}` | {_one_line(default)} | {_one_line(field.description)} |")
    out += ["", "\n## Agent config (`agent.yaml`)\n", "See `deploy/agent.example.yaml` for a commented example.\n"]
    out += _table(model_fields(AgentConfig))
    out += ["\n## Gate metrics\n", "Used as `--gate 'METRIC<=LIMIT'` or, where relative is allowed,",
            "`--gate 'METRIC<=1.1x control'`.\n", "| metric | kind | relative | meaning |", "|---|---|---|---|"]
    for name, source in sorted(METRIC_SOURCES.items()):
        out.append(f"| `{name}` | {source.kind} | {'yes' if source.relative_ok else 'no'} | {_one_line(source.description)} |")
    out += ["", "\n## Bundle manifest (`manifest.json`)\n"] + _table(model_fields(BundleManifest))
    out += ["\n## Self-test spec (`selftest/cases.json`)\n"] + _table(model_fields(SelftestSpec))
    out += ["\n## Build report (`<name>-<version>-<profile>.report.json`)\n"] + _table(model_fields(BuildReport))
    out += ["\n## Matrix (`<name>-<version>.matrix.json`)\n"] + _table(model_fields(BuildMatrix))
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    (REPO / "docs" / "CLI.md").write_text(render())
    (REPO / "docs" / "REFERENCE.md").write_text(render_reference())
    print("wrote docs/CLI.md and docs/REFERENCE.md")
