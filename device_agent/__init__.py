"""The device agent: follows the fleet's desired state, installs bundles atomically into A/B slots, serves inference,
reports status, telemetry and drift, and rolls back without a download. Light by design: `pip install
edgepack[agent]` pulls paho-mqtt, numpy, onnxruntime and cryptography, never the fleet's or the builder's stack.
See docs/ARCHITECTURE.md ("Device agent").
"""
