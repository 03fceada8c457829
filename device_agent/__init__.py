"""device_agent package (see ../shared/DESIGN.md)."""
