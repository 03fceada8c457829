"""Targets register themselves per runtime; a new target folder is found without touching the pipeline."""

from __future__ import annotations

import sys
import textwrap
import typing
from pathlib import Path

import numpy as np
import pytest

import builder.targets as targets
from builder import runtimes
from builder.runtimes import get_adapter
from builder.targets import TARGET_REGISTRY, Target, load_all_targets, target_class
from hardware_profiles.schema import RuntimeName


def test_every_runtime_a_profile_may_list_has_a_registered_target_and_adapter():
    registry = load_all_targets()
    for runtime in typing.get_args(RuntimeName):
        assert issubclass(registry[runtime], Target) and registry[runtime].runtime == runtime
        assert get_adapter(runtime).name in ("onnxruntime", "openvino", "tflite")


def test_only_the_runtimes_that_need_them_fix_every_input_shape():
    assert {name for name, cls in load_all_targets().items() if cls.needs_static_shapes} == {"tensorrt", "tflite"}


@pytest.fixture
def extra_target_folder(tmp_path: Path, monkeypatch):
    """A target sub-package outside the repository, on builder.targets' search path for this test only."""
    folder = tmp_path / "echo_runtime"
    folder.mkdir()
    (folder / "__init__.py").write_text(textwrap.dedent('''
        from builder.runtimes.onnxruntime import OnnxRuntimeAdapter
        from builder.targets import Candidate, Target


        class EchoAdapter(OnnxRuntimeAdapter):
            name = "echo"


        class EchoTarget(Target):
            runtime = "echo"
            adapter = f"{__name__}:EchoAdapter"

            def candidates(self, ctx, reference):
                return [Candidate("echo-fp32", "fp32", self.runtime, "onnx", reference.model_path)]
    '''))
    monkeypatch.setattr(targets, "__path__", [*targets.__path__, str(tmp_path)])
    yield folder
    TARGET_REGISTRY.pop("echo", None)
    runtimes._CACHE.pop("echo", None)
    sys.modules.pop("builder.targets.echo_runtime", None)


def test_a_new_target_folder_registers_its_runtime_and_adapter(extra_target_folder, tiny_project):
    assert target_class("echo") is not None and target_class("echo").__name__ == "EchoTarget"
    adapter = get_adapter("echo")
    assert adapter.name == "echo"
    feeds = [{"input": np.zeros((1, 1, 8, 8), np.float32)}]
    outputs = adapter.run(tiny_project / "model.onnx", feeds)
    assert outputs.first.shape[0] == 1 and np.isfinite(outputs.first).all()
