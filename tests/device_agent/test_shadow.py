"""Shadow mode over a real Mosquitto: a candidate beside the active model, compared on sampled live requests."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.shadow import top1_agreement
from tests.device_agent.agent_harness import agents, desire, install, onnx_variant_bundle, samples  # noqa: F401 - fixture
from tests.device_agent.conftest import DIGITS_CONFIG

SHADOW_PHASES = ["downloading", "verifying", "installing", "selftest", "active"]


@pytest.fixture(scope="module")
def perturbed(bundles, tmp_path_factory):
    """The digits model with noise on its classifier weights: same inputs and outputs, other answers."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(DIGITS_CONFIG.parent / "model.onnx")
    gemm = next(node for node in model.graph.node if node.op_type == "Gemm")
    rng = np.random.default_rng(0)
    for initializer in model.graph.initializer:
        if initializer.name == gemm.input[1]:
            weights = numpy_helper.to_array(initializer)
            noisy = weights + rng.normal(0.0, 1.5 * weights.std(), weights.shape)
            initializer.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), initializer.name))
    return onnx_variant_bundle(tmp_path_factory.mktemp("perturbed") / "perturbed.edgepack", model.SerializeToString(),
                               bundles.keys_dir, bundles.onnx, version="1.1.0-perturbed")


def shadow_of(mosquitto, agent, statuses, seq: int, candidate) -> None:
    desire(mosquitto.url, agent, seq, candidate, action="shadow")
    final = statuses.wait_for(lambda s: s.seq == seq and s.phase in ("active", "failed"), timeout=30)
    assert final.phase == "active", final.error
    assert final.shadow_bundle == candidate.ref.id


def test_top1_agreement_compares_argmax_rows_and_numbers():
    active = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    assert top1_agreement(active, active * 3) == 1.0
    assert top1_agreement(active, np.array([[0.9, 0.1, 0.0], [0.8, 0.1, 0.1]])) == 0.5
    assert top1_agreement(np.array([[2.0]]), np.array([[2.001]])) == 1.0
    assert top1_agreement(np.array([[2.0]]), np.array([[2.5]])) == 0.0


def test_the_same_model_in_shadow_agrees_fully_and_never_answers(agents, mosquitto, bundle_server, bundles):
    agent, statuses, telemetry = agents(shadow={"sample_rate": 1.0, "max_pending": 256}, telemetry={"window_s": 30})
    install(mosquitto.url, agent, statuses, 1, bundles.onnx)
    candidate = bundles.onnx_as_tensorrt  # the same ONNX model in another bundle

    shadow_of(mosquitto, agent, statuses, 2, candidate)
    answered_by = {agent.engine.infer_detailed(request).bundle_id for request in samples(60)}
    assert agent.shadow.wait_idle(30)
    window = agent.telemetry.flush_window()

    assert statuses.phases(2) == SHADOW_PHASES
    assert answered_by == {bundles.onnx.ref.id}
    assert agent.state.read_pointer().active.bundle_id == bundles.onnx.ref.id
    shadow = window.shadow
    assert shadow["samples"] == 60 and shadow["agreement"] == 1.0 and shadow["mean_abs_diff"] < 1e-5
    assert shadow["candidate_errors"] == 0 and shadow["dropped"] == 0
    assert 0 < shadow["candidate_p50_ms"] <= shadow["candidate_p95_ms"] and shadow["active_p50_ms"] > 0
    assert telemetry.wait_for(lambda m: m.ts == window.ts).shadow == shadow  # over MQTT too
    assert len(bundle_server.downloads(candidate.ref.id)) == 1


def test_a_perturbed_candidate_agrees_less_on_a_sample_of_requests(agents, mosquitto, bundle_server, bundles, perturbed):
    bundle_server.add(perturbed)
    agent, statuses, _ = agents(shadow={"sample_rate": 0.5, "max_pending": 512}, telemetry={"window_s": 30})
    install(mosquitto.url, agent, statuses, 1, bundles.onnx)
    shadow_of(mosquitto, agent, statuses, 2, perturbed)

    agent.telemetry.flush_window()  # the window below holds only these requests
    for request in samples(300, offset=7):
        agent.infer(request)
    assert agent.shadow.wait_idle(30)
    shadow = agent.telemetry.flush_window().shadow

    assert 90 <= shadow["samples"] <= 210, shadow  # about half of 300
    assert 0.0 < shadow["agreement"] < 0.95, shadow
    assert shadow["mean_abs_diff"] > 0.1


def test_installing_the_candidate_ends_the_shadow_without_a_second_download(agents, mosquitto, bundle_server, bundles):
    agent, statuses, _ = agents(shadow={"sample_rate": 1.0})
    install(mosquitto.url, agent, statuses, 1, bundles.onnx)
    candidate = bundles.onnx_as_tensorrt
    shadow_of(mosquitto, agent, statuses, 2, candidate)
    assert (agent.state.root / "shadow" / "bundle" / "manifest.json").is_file()

    install(mosquitto.url, agent, statuses, 3, candidate)

    assert [r.status for r in bundle_server.downloads(candidate.ref.id)] == [200]
    assert agent.shadow.bundle_id is None and statuses.statuses[-1].shadow_bundle is None
    assert not (agent.state.root / "shadow" / "bundle").exists()
    assert agent.telemetry.flush_window().shadow is None


def test_a_shadow_survives_an_agent_restart_and_a_bundleless_shadow_ends_it(agents, mosquitto, bundles):
    agent, statuses, _ = agents(shadow={"sample_rate": 1.0})
    install(mosquitto.url, agent, statuses, 1, bundles.onnx)
    shadow_of(mosquitto, agent, statuses, 2, bundles.onnx_as_tensorrt)
    agent.stop()

    again = Agent(agent.config)
    again.start()
    try:
        assert again.shadow.bundle_id == bundles.onnx_as_tensorrt.ref.id
        again.infer(samples(1)[0])
        assert again.shadow.wait_idle(10) and again.shadow.summary(reset=False)["samples"] == 1

        desire(mosquitto.url, again, 3, None, action="shadow")
        final = statuses.wait_for(lambda s: s.seq == 3 and s.phase in ("active", "failed"))
        assert final.phase == "active" and final.shadow_bundle is None
        assert again.shadow.bundle_id is None and not (again.state.root / "shadow" / "shadow.json").exists()
    finally:
        again.stop()


def test_shadowing_the_active_bundle_is_refused(agents, mosquitto, bundles):
    agent, statuses, _ = agents()
    install(mosquitto.url, agent, statuses, 1, bundles.onnx)
    desire(mosquitto.url, agent, 2, bundles.onnx, action="shadow")
    final = statuses.wait_for(lambda s: s.seq == 2 and s.phase in ("active", "failed"))
    assert final.phase == "failed" and "already active" in final.error
    assert final.current_bundle == bundles.onnx.ref.id
