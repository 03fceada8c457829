"""Runs one onnx2tf conversion in its own process: `python -m builder.passes.tflite.onnx2tf_runner SPEC.json`.

The `tflite-convert` pass starts this module as a subprocess so TensorFlow is never imported into the
builder, its whole output lands in one log file, and a timeout can end it. The spec (JSON) names the
ONNX copy, the output folder, the calibration .npy per input and the variants wanted; the runner
writes a result JSON next to the spec: ok, error (type, message, the ONNX node onnx2tf failed on),
versions and any network access it refused.

Offline by construction: onnx2tf downloads a sample calibration file
(`calibration_image_sample_data_20x128x128x3_float32.npy`) unless it is given calibration data, and
also for its dummy inference when every input looks like an NHWC RGB image. We always pass the
user's data through `custom_input_op_name_np_data_path` (CLI `-cind NAME NPY MEAN STD`), keep the
ONNX input layout (so the NHWC-image trigger does not fire), replace onnx2tf's download helper with
one that hands over the user's data, and refuse every non-loopback connection, logging the attempt.
Nothing heavy is imported at module level: importing this module is free.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any

SAMPLE_FILE_PREFIX = "calibration_image_sample_data_"
BLOCKED_MARK = "edgepack: blocked network access"


def _block_network(result: dict[str, Any]) -> None:
    """Refuse every connection that leaves the machine; each attempt is logged and recorded."""
    import socket

    def allowed(host: Any) -> bool:
        return isinstance(host, str) and (host in ("localhost", "::1") or host.startswith("127.") or host.startswith("/"))

    original_getaddrinfo = socket.getaddrinfo
    original_connect = socket.socket.connect

    def refuse(what: str) -> OSError:
        result["network_attempts"].append(what)
        print(f"{BLOCKED_MARK}: {what} (the conversion must work offline)", file=sys.stderr, flush=True)
        return OSError(f"{BLOCKED_MARK}: {what}")

    def getaddrinfo(host, *args, **kwargs):
        if not allowed(host):
            raise refuse(f"name lookup of {host}")
        return original_getaddrinfo(host, *args, **kwargs)

    def connect(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if not allowed(host):
            raise refuse(f"connection to {address}")
        return original_connect(sock, address)

    socket.getaddrinfo = getaddrinfo
    socket.socket.connect = connect


def _offline_sample_data(spec: dict[str, Any], result: dict[str, Any]):
    """Stands in for onnx2tf's `download_test_image_data`: the user's calibration data, never a download."""

    def sample_data():
        import numpy as np

        result["sample_data_requested"] = True
        print("edgepack: onnx2tf asked for its sample image data; handing it the user's calibration data instead (no download)",
              file=sys.stderr, flush=True)
        return np.load(spec["calibration"][0]["npy"]) if spec["calibration"] else None

    return sample_data


def convert(spec: dict[str, Any], result: dict[str, Any]) -> None:
    import numpy as np
    import onnx2tf
    import onnx2tf.onnx2tf as onnx2tf_core
    import onnx2tf.utils.common_functions as onnx2tf_common
    import tensorflow as tf

    result["versions"] = {"onnx2tf": onnx2tf.__version__, "tensorflow": tf.__version__}
    replacement = _offline_sample_data(spec, result)
    onnx2tf_common.download_test_image_data = replacement
    onnx2tf_core.download_test_image_data = replacement
    calibration = None
    if spec["int8"]:
        # [input name, .npy in the converted model's layout, mean, std]: the data is already what the model
        # takes, so mean 0 and std 1 leave it untouched ((x - mean) / std).
        calibration = [[c["name"], c["npy"], np.zeros(1, np.float32), np.ones(1, np.float32)] for c in spec["calibration"]]
    onnx2tf.convert(
        input_onnx_file_path=spec["onnx"],
        output_folder_path=spec["out_dir"],
        output_dynamic_range_quantized_tflite=spec["int8"],
        output_integer_quantized_tflite=spec["int8"],
        custom_input_op_name_np_data_path=calibration,
        quant_type=spec["quant_type"],
        input_quant_dtype=spec["io_dtype"],
        output_quant_dtype=spec["io_dtype"],
        keep_ncw_or_nchw_or_ncdhw_input_names=spec["keep_layout_inputs"] or None,
        verbosity="debug",
    )
    result["ok"] = True


def main(argv: list[str]) -> int:
    spec_path = Path(argv[0])
    spec = json.loads(spec_path.read_text())
    result: dict[str, Any] = {"ok": False, "error": None, "network_attempts": [], "sample_data_requested": False, "versions": {}}
    _block_network(result)
    try:
        convert(spec, result)
    except SystemExit as exc:  # onnx2tf ends some errors with sys.exit(1) after logging them
        result["error"] = {"type": "SystemExit", "message": f"onnx2tf exited with status {exc.code}", "onnx_op_name": None}
    except BaseException as exc:  # noqa: BLE001 - every converter failure becomes the result, with its traceback in the log
        traceback.print_exc()
        result["error"] = {"type": type(exc).__name__, "message": str(exc).strip(), "onnx_op_name": getattr(exc, "onnx_op_name", None)}
    Path(spec["result"]).write_text(json.dumps(result, indent=2, default=str))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
