"""Durations as people type them on a command line: `90`, `30s`, `5m`, `1h`, `250ms`."""

from __future__ import annotations

import re

from edgepack.errors import ConfigError


def parse_duration(text: str) -> float:
    """'30s', '5m', '1h', '90' (seconds) → seconds; ConfigError with an example otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", text)
    if not match:
        raise ConfigError(f"invalid duration {text!r}: use e.g. 30s, 5m, 1h")
    value, unit = float(match[1]), match[2] or "s"
    return value * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


__all__ = ["parse_duration"]
