"""Reproducible test material and the simulated fleet.

Model and data generators (digits variants, PP-OCR classifier data, Silero VAD data), the throwaway services the
tests and the simulator start (`mosquitto.py`, `postgres.py`), the fleet harness and the simulated fleet with its
scenarios (`sim.py`, `scenarios/*.yaml`; `edgepack testbed run`). See docs/ARCHITECTURE.md.
"""
