"""The build pipeline: passes, calibration, verification, benchmark, report, packaging."""
