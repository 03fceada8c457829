"""Prometheus metrics of the fleet server, all in one registry that `/metrics` exposes.

Other modules count through the objects here (`fleet.metrics.MQTT_MALFORMED.inc()`), or add their own
with `registry=REGISTRY`. Creating a metric object has no side effect beyond this registry, so importing
the module is cheap and safe. Gauges that describe the database (devices online, rollouts by status) are
computed per scrape by `fleet.api.system`, not kept here.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

HTTP_REQUESTS = Counter(
    "edgepack_http_requests",
    "HTTP requests served, by method, route template and status code.",
    ["method", "route", "status"],
    registry=REGISTRY,
)
HTTP_REQUEST_SECONDS = Histogram(
    "edgepack_http_request_seconds",
    "Time to the start of the response, by route template.",
    ["route"],
    registry=REGISTRY,
)
BUNDLES_UPLOADED = Counter(
    "edgepack_bundles_uploaded",
    "Bundle uploads accepted (a re-upload of a stored bundle counts too).",
    registry=REGISTRY,
)
BUNDLES_REFUSED = Counter(
    "edgepack_bundles_refused",
    "Bundle uploads refused, by the error class that refused them.",
    ["reason"],
    registry=REGISTRY,
)
BUNDLE_REDIRECTS = Counter(
    "edgepack_bundle_redirects",
    "Bundle downloads answered with a redirect to a presigned object-store URL (no bytes through the fleet).",
    registry=REGISTRY,
)
BUNDLE_BYTES_SERVED = Counter(
    "edgepack_bundle_bytes_served",
    "Bytes of bundle downloads sent (ranges count what was sent).",
    registry=REGISTRY,
)
ENROLLMENTS = Counter(
    "edgepack_enrollments",
    "Device enrollments, by result (enrolled, reenrolled, refused).",
    ["result"],
    registry=REGISTRY,
)
DEVICE_STATUS_HTTP = Counter(
    "edgepack_device_status_http",
    "Device status reports received over HTTP.",
    registry=REGISTRY,
)
MQTT_MALFORMED = Counter(
    "edgepack_mqtt_malformed_messages",
    "MQTT messages dropped because they were malformed, oversized, of an unknown schema or on a bad topic.",
    registry=REGISTRY,
)
MQTT_MESSAGES = Counter(
    "edgepack_mqtt_messages",
    "MQTT messages received from devices and handled, by kind (status, telemetry).",
    ["kind"],
    registry=REGISTRY,
)
MQTT_REJECTED = Counter(
    "edgepack_mqtt_rejected_messages",
    "Well-formed MQTT messages the fleet refused: the payload names another device than the topic "
    "(device_mismatch), the device is not enrolled (unknown_device) or revoked (revoked_device).",
    ["reason"],
    registry=REGISTRY,
)
MQTT_THROTTLED = Counter(
    "edgepack_mqtt_throttled_total",
    "MQTT messages ignored because their device was over its message budget, by kind (status, telemetry).",
    ["reason"],
    registry=REGISTRY,
)
INGEST_BATCHES = Counter(
    "edgepack_ingest_batches",
    "Batches of device messages stored, one transaction each.",
    registry=REGISTRY,
)
INGEST_DROPPED = Counter(
    "edgepack_ingest_dropped_total",
    "Decoded device messages not stored, by reason (unknown_device, revoked_device, stopped).",
    ["reason"],
    registry=REGISTRY,
)
INGEST_WAITS = Counter(
    "edgepack_ingest_queue_full_total",
    "Times the MQTT thread found the ingest queue full and waited for the writers (backpressure).",
    registry=REGISTRY,
)
INGEST_RETRIES = Counter(
    "edgepack_ingest_retries_total",
    "Batches retried because the database was unavailable.",
    registry=REGISTRY,
)
INGEST_FAILED = Counter(
    "edgepack_ingest_failed_total",
    "Device messages that could not be stored even alone (logged with their device).",
    registry=REGISTRY,
)
INGEST_DUPLICATES = Counter(
    "edgepack_ingest_duplicate_windows_total",
    "Telemetry windows received again (a QoS 1 redelivery or a re-send) and stored once.",
    registry=REGISTRY,
)
CREDENTIAL_CHANGES = Counter(
    "edgepack_device_credential_changes",
    "Device credentials rotated or revoked, by action (rotated, revoked).",
    ["action"],
    registry=REGISTRY,
)
DESIRED_PUBLISHED = Counter(
    "edgepack_desired_states_published",
    "Desired states published to devices.",
    registry=REGISTRY,
)
ROLLOUT_DECISIONS = Counter(
    "edgepack_rollout_decisions",
    "Wave decisions taken, by decision (promote, hold, rollback).",
    ["decision"],
    registry=REGISTRY,
)
WAVE_EVALUATION_CPU_SECONDS = Histogram(
    "edgepack_wave_evaluation_cpu_seconds",
    "CPU time the controller's thread spent judging one wave (its gates on every member's telemetry), per look.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)
WAVE_EVALUATION_SECONDS = Histogram(
    "edgepack_wave_evaluation_seconds",
    "Wall time of judging one wave, its database queries included.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)
ALERTS_RAISED = Counter(
    "edgepack_alerts_raised",
    "Alerts raised, by kind (drift).",
    ["kind"],
    registry=REGISTRY,
)
ALERT_DELIVERIES = Counter(
    "edgepack_alert_webhook_deliveries",
    "Alert webhook POSTs, by result (delivered, failed).",
    ["result"],
    registry=REGISTRY,
)

__all__ = [
    "ALERTS_RAISED",
    "ALERT_DELIVERIES",
    "BUNDLES_REFUSED",
    "BUNDLES_UPLOADED",
    "BUNDLE_BYTES_SERVED",
    "BUNDLE_REDIRECTS",
    "CREDENTIAL_CHANGES",
    "DESIRED_PUBLISHED",
    "DEVICE_STATUS_HTTP",
    "ENROLLMENTS",
    "HTTP_REQUESTS",
    "HTTP_REQUEST_SECONDS",
    "INGEST_BATCHES",
    "INGEST_DROPPED",
    "INGEST_DUPLICATES",
    "INGEST_FAILED",
    "INGEST_RETRIES",
    "INGEST_WAITS",
    "MQTT_MALFORMED",
    "MQTT_MESSAGES",
    "MQTT_REJECTED",
    "MQTT_THROTTLED",
    "REGISTRY",
    "ROLLOUT_DECISIONS",
]
