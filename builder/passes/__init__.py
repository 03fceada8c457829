"""Build passes, one per file, grouped by backend."""
