"""fleet package (see ../shared/DESIGN.md)."""
