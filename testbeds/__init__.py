"""testbeds package (see ../shared/DESIGN.md)."""
