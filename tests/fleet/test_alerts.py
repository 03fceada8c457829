"""Drift alerts outside rollouts: raised once per device and bundle, cleared when the drift passes, POSTed
to a real webhook on loopback with retries and a timeout; listed by the API; configured by settings, the
environment and `edgepack fleet serve` options; and the whole path through Mosquitto and a running server."""

from __future__ import annotations

import time

import paho.mqtt.client as mqtt
import pytest
from sqlalchemy import delete, select
from typer.testing import CliRunner

from edgepack.protocol import encode, telemetry_topic
from fleet.app import create_app
from fleet.models import Alert, AuditEntry
from fleet.mqtt_bridge import lifespan_hook, parse_mqtt_url
from fleet.services.alerts import AlertDispatcher, DriftAlertPolicy, check_drift
from fleet.services.rollouts import abort, create_rollout
from fleet.settings import FleetSettings
from tests.fleet.conftest import serve
from tests.fleet.rollout_helpers import add_bundle, add_device
from tests.fleet.telemetry_helpers import Webhook, database, latency_samples, report, window

POLICY = DriftAlertPolicy(threshold=0.25, repeat_s=600)
T0 = 1_800_000_000.0


@pytest.fixture
def db(db_url):
    session_factory, engine = database(db_url)
    yield session_factory
    engine.dispose()


@pytest.fixture
def only_this_tests_alerts(db):
    """Deliveries take every undelivered alert in the database, and a PostgreSQL one is shared by the
    module's tests: start the delivery tests from none."""
    with db() as session:
        session.execute(delete(Alert))
        session.commit()


@pytest.fixture
def device(db, unique):
    """A device of its own on bundle v1 (PostgreSQL tests share a database per module)."""
    with db() as session:
        bundle = add_bundle(session, unique, "1.0.0", "rpi5")
        add_device(session, f"{unique}-dev", "rpi5", {"run": unique}, current_bundle=bundle.id)
    return f"{unique}-dev", bundle.id


def drift_window(db, device_id, bundle_id, scores, at, policy=POLICY):
    """Store a window with these drift scores at `at` and run the alert check on it, as the bridge does."""
    stored = report(db, window(device_id, bundle_id, latency_samples(f"{device_id}{at}", 5.0, 50), drift=scores), at)
    with db() as session:
        return check_drift(session, stored, policy)


def alerts_of(db, device_id):
    with db() as session:
        return list(session.scalars(select(Alert).where(Alert.device_id == device_id).order_by(Alert.id)))


def test_drift_raises_one_alert_and_the_webhook_gets_exactly_one_post(db, device, only_this_tests_alerts):
    device_id, bundle_id = device
    raised = [drift_window(db, device_id, bundle_id, {"input": 0.41, "output": 0.12}, T0 + 10 * i) for i in range(5)]

    with Webhook() as hook:
        dispatcher = AlertDispatcher(db, hook.url, timeout_s=5)
        delivered = dispatcher.deliver_due() + dispatcher.deliver_due()
        dispatcher.close()

    assert [alert is not None for alert in raised] == [True, False, False, False, False]
    assert delivered == 1 and len(hook.requests) == 1
    post = hook.requests[0]
    assert post["path"] == "/retrain" and post["headers"]["Content-Type"] == "application/json"
    assert post["headers"]["X-Edgepack-Alert-Id"] == str(raised[0].id)
    body = post["json"]
    assert (body["event"], body["kind"], body["device_id"], body["bundle_id"]) == ("edgepack.alert", "drift", device_id, bundle_id)
    assert body["details"]["score"] == 0.41 and body["details"]["worst"] == "input" and body["details"]["threshold"] == 0.25
    assert body["details"]["drift_method"] == "psi" and body["details"]["profile"] == "rpi5"
    assert body["open"] is True and body["attempt"] == 1
    [alert] = alerts_of(db, device_id)
    assert alert.delivered and alert.attempts == 1 and alert.last_error is None and alert.delivered_at is not None
    with db() as session:
        audited = session.scalars(select(AuditEntry).where(AuditEntry.action == "alert.drift",
                                                           AuditEntry.target == device_id)).all()
    assert [entry.details["alert_id"] for entry in audited] == [alert.id]


def test_an_alert_clears_with_hysteresis_and_repeats_only_after_repeat_s(db, device):
    device_id, bundle_id = device

    first = drift_window(db, device_id, bundle_id, {"input": 0.3}, T0)
    hovering = drift_window(db, device_id, bundle_id, {"input": 0.22}, T0 + 10)  # under 0.25, above 0.8 × 0.25
    again = drift_window(db, device_id, bundle_id, {"input": 0.3}, T0 + 20)
    cleared = drift_window(db, device_id, bundle_id, {"input": 0.1}, T0 + 30)
    second = drift_window(db, device_id, bundle_id, {"input": 0.5}, T0 + 40)
    reminder = drift_window(db, device_id, bundle_id, {"input": 0.5}, T0 + 40 + POLICY.repeat_s)
    no_scores = drift_window(db, device_id, bundle_id, {}, T0 + 50 + POLICY.repeat_s)

    assert first is not None and hovering is None and again is None and cleared is None and no_scores is None
    assert second is not None and reminder is not None
    alerts = alerts_of(db, device_id)
    assert [a.id for a in alerts] == [first.id, second.id, reminder.id]
    assert alerts[0].cleared_at is not None and alerts[1].cleared_at is None
    assert reminder.details["repeat_of"] == second.id and second.details["repeat_of"] is None


def test_another_bundle_on_the_same_device_is_another_alert(db, device, unique):
    device_id, bundle_id = device
    with db() as session:
        other = add_bundle(session, unique, "1.1.0", "rpi5").id

    assert drift_window(db, device_id, bundle_id, {"output": 0.6}, T0) is not None
    assert drift_window(db, device_id, other, {"output": 0.6}, T0 + 1) is not None
    assert drift_window(db, device_id, other, {"output": 0.6}, T0 + 2) is None


def test_devices_in_an_active_rollout_raise_no_drift_alert(db, device, unique):
    device_id, bundle_id = device
    with db() as session:
        v2 = add_bundle(session, unique, "2.0.0", "rpi5")
        rollout = create_rollout(session, "alice", v2.id, {"run": unique}, waves=[100], gates=None)

    during = drift_window(db, device_id, bundle_id, {"input": 0.9}, T0)
    with db() as session:
        abort(session, "alice", rollout["id"])
    after = drift_window(db, device_id, bundle_id, {"input": 0.9}, T0 + 10)

    assert during is None and after is not None


def test_non_finite_scores_are_stored_as_nothing_and_never_alert(db, device):
    device_id, bundle_id = device
    telemetry = window(device_id, bundle_id, latency_samples("nan", 5.0, 50), drift={"input": float("nan"), "output": 0.5})
    telemetry = telemetry.model_copy(update={"latency_ms": telemetry.latency_ms.model_copy(update={"p99": float("inf")})})

    stored = report(db, telemetry, T0)
    with db() as session:
        alert = check_drift(session, stored, POLICY)

    assert stored.drift == {"output": 0.5} and stored.p99_ms is None and stored.payload["latency_ms"]["p99"] is None
    assert alert is not None and alert.details["worst"] == "output" and alert.details["scores"] == {"output": 0.5}


def test_a_failing_webhook_is_retried_with_backoff_until_it_accepts(db, device, only_this_tests_alerts):
    device_id, bundle_id = device
    alert = drift_window(db, device_id, bundle_id, {"input": 0.7}, T0)
    clock = [T0]

    with Webhook(statuses=[500, 503]) as hook:
        dispatcher = AlertDispatcher(db, hook.url, backoff_s=10, clock=lambda: clock[0])
        passes = [dispatcher.deliver_due()]
        failed_once = alerts_of(db, device_id)[0]
        passes.append(dispatcher.deliver_due())  # not due yet: 10 s backoff
        clock[0] += 10
        passes.append(dispatcher.deliver_due())  # 503
        clock[0] += 10
        passes.append(dispatcher.deliver_due())  # 20 s after the second failure? not yet
        clock[0] += 10
        passes.append(dispatcher.deliver_due())  # accepted
        dispatcher.close()

    assert passes == [0, 0, 0, 0, 1]
    assert failed_once.attempts == 1 and failed_once.last_error.startswith("HTTP 500")
    assert [r["json"]["attempt"] for r in hook.requests] == [1, 2, 3]
    assert {r["headers"]["X-Edgepack-Alert-Id"] for r in hook.requests} == {str(alert.id)}
    [done] = alerts_of(db, device_id)
    assert done.delivered and done.attempts == 3 and done.last_error is None


def test_a_webhook_that_hangs_times_out_and_is_given_up_after_max_attempts(db, device, only_this_tests_alerts):
    device_id, bundle_id = device
    drift_window(db, device_id, bundle_id, {"input": 0.7}, T0)
    clock = [T0]

    with Webhook(delay_s=2.0) as hook:
        dispatcher = AlertDispatcher(db, hook.url, timeout_s=0.3, max_attempts=2, backoff_s=1, clock=lambda: clock[0])
        for _ in range(4):
            dispatcher.deliver_due()
            clock[0] += 100
        dispatcher.close()

    [alert] = alerts_of(db, device_id)
    # Each try ended in the client's 0.3 s timeout, not the webhook's 2 s answer; after two, no third.
    assert not alert.delivered and alert.attempts == 2 and "Timeout" in alert.last_error
    assert len(hook.requests) == 2


def test_settings_environment_and_serve_options():
    from edgepack.cli import app

    settings = FleetSettings.from_env({"EDGEPACK_DRIFT_ALERT_THRESHOLD": "0.3",
                                       "EDGEPACK_ALERT_WEBHOOK_URL": "https://ml.example/retrain"})
    defaults = FleetSettings()
    help_text = CliRunner().invoke(app, ["fleet", "serve", "--help"], env={"COLUMNS": "200"}).output

    assert (settings.drift_alert_threshold, settings.alert_webhook_url) == (0.3, "https://ml.example/retrain")
    assert (defaults.drift_alert_threshold, defaults.alert_webhook_url, defaults.alert_repeat_s) == (0.25, None, 3600.0)
    assert "--alert-webhook" in help_text and "--drift-threshold" in help_text
    with pytest.raises(ValueError, match="http:// or https://"):
        FleetSettings(alert_webhook_url="ftp://ml.example/retrain")
    with pytest.raises(ValueError):
        FleetSettings(drift_alert_threshold=0)


def test_drift_over_mosquitto_alerts_the_webhook_once_and_the_api_lists_it(mosquitto, tmp_path, keys):
    with Webhook() as hook:
        settings = FleetSettings(data_dir=tmp_path / "fleet", mqtt_url=mosquitto.url, trusted_keys=[keys.trusted_public],
                                 admin_token="adm_" + "x" * 24, alert_webhook_url=hook.url, drift_alert_threshold=0.3)
        app = create_app(settings, lifespan_hooks=[lifespan_hook])
        with serve(app) as url:
            import httpx

            admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {settings.admin_token.get_secret_value()}"})
            enrollment = admin.post("/api/v1/devices/enrollment-tokens", json={}).json()["token"]
            enrolled = httpx.post(f"{url}/api/v1/devices/enroll", json={"device_id": "cam-7", "profile": "rpi5",
                                                                        "token": enrollment})
            viewer_token = admin.post("/api/v1/tokens", json={"name": "dash", "role": "viewer"}).json()["token"]
            assert enrolled.status_code == 201 and app.state.mqtt_bridge.wait_ready(10)
            device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="cam-7")
            endpoint = parse_mqtt_url(mosquitto.url)
            device.connect(endpoint["host"], endpoint["port"])
            device.loop_start()
            try:
                for i, score in enumerate([0.1, 0.45, 0.5, 0.48]):  # one window under, three over the threshold
                    telemetry = window("cam-7", None, latency_samples(f"cam-{i}", 3.0, 40), drift={"input": score})
                    device.publish(telemetry_topic("cam-7"), encode(telemetry), qos=1).wait_for_publish(10)
                bridge = app.state.mqtt_bridge
                deadline = time.monotonic() + 10
                while bridge.processed["telemetry"] < 4 and time.monotonic() < deadline:
                    time.sleep(0.02)
                posts = hook.wait_for_requests(1)
                # Once the alert is stored as delivered after one attempt, the dispatcher never sends it again
                # (it only takes undelivered ones, claiming each try): no second POST can be on its way.
                deadline = time.monotonic() + 10
                while True:
                    listed = httpx.get(f"{url}/api/v1/alerts", headers={"Authorization": f"Bearer {viewer_token}"})
                    if all(a["delivered"] for a in listed.json() or [{"delivered": False}]) or time.monotonic() > deadline:
                        break
                    time.sleep(0.02)
                refused = httpx.get(f"{url}/api/v1/alerts")
            finally:
                device.disconnect()
                device.loop_stop()
                admin.close()

    assert bridge.processed["telemetry"] == 4 and bridge.processed["alert"] == 1
    assert len(posts) == 1 and len(hook.requests) == 1
    assert posts[0]["json"]["device_id"] == "cam-7" and posts[0]["json"]["details"]["score"] == 0.45
    assert listed.status_code == 200 and refused.status_code == 401
    [alert] = listed.json()
    assert alert["kind"] == "drift" and alert["device_id"] == "cam-7" and alert["open"] is True
    assert alert["delivered"] is True and alert["attempts"] == 1 and alert["details"]["threshold"] == 0.3
