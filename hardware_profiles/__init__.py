"""Hardware profiles: `*.yaml` files in this package, validated by `schema.HardwareProfile`.

`load_profile("jetson")` resolves a name or alias among the bundled profiles; a path to a user's YAML
file works too. Every problem is a `ProfileError` with one line that names the file and the field.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import ValidationError

from edgepack.errors import ProfileError, first_validation_error
from edgepack.yamlfile import read_yaml_mapping
from hardware_profiles.schema import HardwareProfile

PROFILES_DIR = Path(__file__).parent

__all__ = ["HardwareProfile", "PROFILES_DIR", "list_profiles", "load_profile", "load_profile_file"]


def load_profile_file(path: Path) -> HardwareProfile:
    """Load and validate one profile YAML file."""
    data = read_yaml_mapping(path, "profile", error=ProfileError)
    try:
        return HardwareProfile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(first_validation_error(exc, f"profile {path}", count_others=True)) from None


@lru_cache(maxsize=1)
def _bundled() -> tuple[HardwareProfile, ...]:
    return tuple(load_profile_file(p) for p in sorted(PROFILES_DIR.glob("*.yaml")))


def list_profiles() -> list[HardwareProfile]:
    """All bundled profiles, sorted by name."""
    return sorted(_bundled(), key=lambda p: p.name)


def load_profile(name_or_path: str | Path) -> HardwareProfile:
    """Resolve a bundled profile by name or alias, or load a user's YAML file by path."""
    text = str(name_or_path)
    path = Path(text)
    if text.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise ProfileError(f"profile file {path} does not exist")
        return load_profile_file(path)
    for profile in _bundled():
        if text in profile.all_names:
            return profile
    names = ", ".join(sorted(n for p in _bundled() for n in p.all_names))
    raise ProfileError(f"unknown profile {text!r}; known: {names}")
