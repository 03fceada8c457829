"""`edgepack build` (placeholder until implemented)."""


def build() -> None:
    """Build a model for a hardware profile."""
