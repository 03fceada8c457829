"""The fleet server: a FastAPI admin API over SQLite or PostgreSQL that stores verified bundles, enrolls devices and
rolls releases out in percentage waves over MQTT, judging every wave on what devices report. See
docs/ARCHITECTURE.md ("Rollouts", "MQTT protocol v1").
"""
