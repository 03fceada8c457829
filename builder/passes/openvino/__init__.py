"""OpenVINO passes: ONNX → IR (`ov-convert`), FP16 weights (`ov-fp16`), INT8 with NNCF (`ov-int8`).

Every pass writes an IR `<variant>.xml` with its weights in `<variant>.bin` beside it (a `PassOutput`
sidecar, so the build cache keeps the pair together; the bundle names them `model/model.xml` and
`model/model.bin`). Names differ per pass because OpenVINO maps the input's .bin into memory: a pass
that overwrote its own input would pull the pages from under it (SIGBUS). OpenVINO and NNCF are imported inside the helpers, never
at import time: the pass registry is loaded by every build. They are always imported after
`builder.runtimes.openvino`, which switches their usage telemetry off first.

IR bytes depend only on the pass's input and config (`save_ir` makes them so): OpenVINO names a node
it makes without a name `<Type>_<n>` from a process-wide counter (constant folding, NNCF's weight
constants), so the same conversion gave `Constant_2441` in one process and `Constant_33648` after
another build in the same one; and the IR records the file it was converted from, which is
`model.onnx` from the build cache and `simplified.onnx` without it. `save_ir` renames the counter
names in graph order and records one fixed source name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Iterator

# Ops that carry weights and run in INT8 when their inputs are quantized.
COMPUTE_OP_TYPES = frozenset({"Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData", "MatMul"})
# Ops NNCF puts between an INT8 weight constant and the compute op it feeds (dequantization).
_DEQUANTIZE_CHAIN = frozenset({"Convert", "Subtract", "Multiply", "Reshape", "Transpose", "Unsqueeze"})
_LOW_BIT = frozenset({"i8", "u8", "i4", "u4"})


# OpenVINO's name for a node nobody named: its type (or a folded node's) and the process-wide counter.
_COUNTER_NAME = re.compile(r"([A-Z][A-Za-z0-9]*)_(\d+)")
# Where an IR records its source file; OpenVINO keeps only the file name (`DIR/<name>`).
_SOURCE_FILE = ["conversion_parameters", "input_model"]
SOURCE_FILE_NAME = "DIR/model.onnx"


@dataclasses.dataclass(frozen=True)
class SourceNames:
    """The node and tensor names a pass's input model gives, and OpenVINO's node counter before the
    pass made any node: a `<Type>_<n>` name outside the input with n at or past the counter is OpenVINO's own."""

    names: frozenset[str]
    first_id: int

    def is_counter_name(self, name: str) -> bool:
        match = _COUNTER_NAME.fullmatch(name)
        return match is not None and int(match.group(2)) >= self.first_id and name not in self.names


def source_names(path: Path) -> SourceNames:
    """What `stable_names` keeps of the input at `path` (an IR .xml or ONNX); call before reading it."""
    names = _ir_names(path) if path.suffix == ".xml" else _onnx_names(path)
    return SourceNames(frozenset(names), first_id=_node_counter())


def _node_counter() -> int:
    from builder.runtimes.openvino import ov

    probe = ov.op.Constant(ov.Type.f32, ov.Shape([]), [0.0])
    return int(probe.get_name().rsplit("_", 1)[1])


def _ir_names(path: Path) -> set[str]:
    root = ElementTree.parse(path).getroot()
    return {layer.get("name", "") for layer in root.iter("layer")}


def _onnx_names(path: Path) -> set[str]:
    import onnx

    names: set[str] = set()
    graphs = [onnx.load(str(path), load_external_data=False).graph]
    while graphs:  # the main graph and the bodies of If/Loop/Scan nodes
        graph = graphs.pop()
        names.update(value.name for value in [*graph.input, *graph.output, *graph.initializer, *graph.value_info])
        for node in graph.node:
            names.update([node.name, *node.input, *node.output])
            for attribute in node.attribute:
                graphs.extend([attribute.g] if attribute.HasField("g") else list(attribute.graphs))
    return names


def stable_names(model: Any, source: SourceNames) -> dict[str, str]:
    """Rename the nodes OpenVINO named from its counter to `<Type>#<k>`, k counting in graph order, and
    record a fixed source file; returns old → new name. The `#` keeps a renamed node from ever looking
    like a counter name to the next pass."""
    taken = {op.get_friendly_name() for op in model.get_ordered_ops()}
    counts: dict[str, int] = {}
    renamed: dict[str, str] = {}
    for op in model.get_ordered_ops():
        name = op.get_friendly_name()
        if not source.is_counter_name(name):
            continue
        prefix = name.rsplit("_", 1)[0]
        new = name
        while new in taken:
            counts[prefix] = counts.get(prefix, 0) + 1
            new = f"{prefix}#{counts[prefix]}"
        op.set_friendly_name(new)
        taken.add(new)
        renamed[name] = new
    if model.has_rt_info(_SOURCE_FILE):
        model.set_rt_info(SOURCE_FILE_NAME, _SOURCE_FILE)
    return renamed


def read_model(path: Path) -> Any:
    """An `ov.Model` from an IR (.xml) or converted from ONNX."""
    from builder.runtimes.openvino import ov

    if path.suffix == ".xml":
        return ov.Core().read_model(str(path))
    return ov.convert_model(str(path))


def save_ir(model: Any, xml_path: Path, compress_to_fp16: bool, source: SourceNames) -> tuple[Path, Path]:
    """Write `model.xml` + `model.bin` with `stable_names` applied; returns both paths."""
    from builder.runtimes.openvino import ov

    stable_names(model, source)
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(xml_path), compress_to_fp16=compress_to_fp16)
    return xml_path, xml_path.with_suffix(".bin")


def onnx_node_name(op_name: str) -> str:
    """The ONNX node an OpenVINO op came from: the converter splits Conv/Gemm bias off as `<name>/WithoutBiases`."""
    return op_name.removesuffix("/WithoutBiases")


def _from_low_bit_constant(node: Any, depth: int = 0) -> bool:
    if node.get_type_name() == "Constant":
        return node.get_output_element_type(0).get_type_name() in _LOW_BIT
    if node.get_type_name() not in _DEQUANTIZE_CHAIN or depth > 4:
        return False
    return any(_from_low_bit_constant(value.get_node(), depth + 1) for value in node.input_values())


def quantized_ops(model: Any) -> list[str]:
    """Compute ops with a quantized input: a FakeQuantize on an activation or an INT8 weight constant."""
    names = []
    for op in model.get_ordered_ops():
        if op.get_type_name() not in COMPUTE_OP_TYPES:
            continue
        sources = [value.get_node() for value in op.input_values()]
        if any(source.get_type_name() == "FakeQuantize" or _from_low_bit_constant(source) for source in sources):
            names.append(op.get_friendly_name())
    return names


def count_ops(model: Any, type_name: str) -> int:
    return sum(1 for op in model.get_ops() if op.get_type_name() == type_name)


class NncfLog(logging.Handler):
    """Collects NNCF's log messages (it prints them to stdout by default)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def quiet_nncf() -> Iterator[NncfLog]:
    """Run NNCF without writing to stdout (`--json` owns stdout): its log goes to the returned handler,
    its progress bars to a buffer that is thrown away."""
    import builder.runtimes.openvino  # noqa: F401  (telemetry off before NNCF loads OpenVINO)
    from nncf.common.logging import nncf_logger

    handlers, level = list(nncf_logger.handlers), nncf_logger.level
    log = NncfLog()
    for handler in handlers:
        nncf_logger.removeHandler(handler)
    nncf_logger.addHandler(log)
    # INFO, never DEBUG: at DEBUG NNCF writes quantizer-propagation graphs into ./nncf_debug.
    nncf_logger.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield log
    finally:
        nncf_logger.removeHandler(log)
        for handler in handlers:
            nncf_logger.addHandler(handler)
        nncf_logger.setLevel(level)
