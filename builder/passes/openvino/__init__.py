"""OpenVINO passes: ONNX → IR (`ov-convert`), FP16 weights (`ov-fp16`), INT8 with NNCF (`ov-int8`).

Every pass writes an IR `<variant>.xml` with its weights in `<variant>.bin` beside it (a `PassOutput`
sidecar, so the build cache keeps the pair together; the bundle names them `model/model.xml` and
`model/model.bin`). Names differ per pass because OpenVINO maps the input's .bin into memory: a pass
that overwrote its own input would pull the pages from under it (SIGBUS). OpenVINO and NNCF are imported inside the helpers, never
at import time: the pass registry is loaded by every build. They are always imported after
`builder.runtimes.openvino`, which switches their usage telemetry off first.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any, Iterator

# Ops that carry weights and run in INT8 when their inputs are quantized.
COMPUTE_OP_TYPES = frozenset({"Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData", "MatMul"})
# Ops NNCF puts between an INT8 weight constant and the compute op it feeds (dequantization).
_DEQUANTIZE_CHAIN = frozenset({"Convert", "Subtract", "Multiply", "Reshape", "Transpose", "Unsqueeze"})
_LOW_BIT = frozenset({"i8", "u8", "i4", "u4"})


def read_model(path: Path) -> Any:
    """An `ov.Model` from an IR (.xml) or converted from ONNX."""
    from builder.runtimes.openvino import ov

    if path.suffix == ".xml":
        return ov.Core().read_model(str(path))
    return ov.convert_model(str(path))


def save_ir(model: Any, xml_path: Path, compress_to_fp16: bool) -> tuple[Path, Path]:
    """Write `model.xml` + `model.bin`; returns both paths."""
    from builder.runtimes.openvino import ov

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
