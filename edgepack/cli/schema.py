"""`edgepack schema KIND`: print the JSON Schema (draft 2020-12) of one of edgepack's contracts.

    edgepack schema manifest > manifest.schema.json      # validates every bundle's manifest.json
    edgepack schema report | telemetry | desired | status | selftest

The schemas come from the pydantic models the code reads these documents with (edgepack.schemas).
"""

from __future__ import annotations

import json
import sys

import typer

from edgepack.schemas import CONTRACTS

app = typer.Typer(help="Print the JSON Schema (draft 2020-12) of a bundle manifest, build report or MQTT message.",
                  no_args_is_help=True)


def _command(kind: str) -> None:
    def show() -> None:
        from edgepack.schemas import json_schema

        # Plain stdout, not rich: the output is a document for tools, never wrapped or coloured.
        sys.stdout.write(json.dumps(json_schema(kind), indent=2, sort_keys=True) + "\n")

    show.__doc__ = f"The JSON Schema of the {CONTRACTS[kind].title}."
    app.command(kind)(show)


for _kind in CONTRACTS:
    _command(_kind)
