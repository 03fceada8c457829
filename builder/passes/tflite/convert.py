"""ONNX → TFLite with onnx2tf, offline, in one subprocess: float32, float16, dynamic-range and full-integer.

One conversion serves every TFLite profile (rpi4, rpi5, coral-devboard): the output depends on the
model, the calibration data and this config only, never on the profile, so the build cache shares it.

    model_float32.tflite              the main output (float32 weights and activations)
    model_float16.tflite              float16 weights, dequantized at load time
    model_dynamic_range_quant.tflite  int8 weights, float activations quantized on the fly
    model_full_integer_quant.tflite   int8 weights and activations, int8 (or uint8) input and output
    tflite_io.json                    how each file's tensors map to the ONNX inputs and outputs
    onnx2tf.log                       the converter's whole log (published next to the report)

Calibration for the integer model is the user's calibration split, written as one .npy per input
and passed through onnx2tf's `custom_input_op_name_np_data_path` (CLI: `-cind NAME NPY MEAN STD`,
here with mean 0 and std 1, since the data already is what the model takes). Without it onnx2tf
downloads a sample of 20 MS-COCO images; the runner (`onnx2tf_runner`) also refuses every
connection, so an attempt fails the pass loudly instead of calibrating on someone else's data.

Inputs keep the ONNX layout (onnx2tf's `keep_ncw_or_nchw_or_ncdhw_input_names`, CLI `-k`): the
TFLite model takes exactly the tensors the ONNX model takes (onnx2tf inserts the NCHW→NHWC transpose
inside the graph). Outputs come out in TensorFlow's layout; `tflite_io.json` records, per file, the
transpose that brings each one back to the ONNX layout, and the input/output quantization.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from builder.passes.base import Pass, PassConfig, PassContext, PassOutput
from edgepack.errors import DataError, PassError

# Variant name → the suffix onnx2tf gives its file (`<model>_<suffix>.tflite`).
VARIANT_FILES = {
    "fp32": "float32",
    "fp16": "float16",
    "dynamic-int8": "dynamic_range_quant",
    "full-int8": "full_integer_quant",
}
IO_FILE = "tflite_io.json"
LOG_FILE = "onnx2tf.log"
# What onnx2tf prints when a variant fails after the float model was written.
_VARIANT_FAILED = {
    "dynamic-int8": "Dynamic Range Quantization tflite output failed",
    "full-int8": "Full INT8 Quantization tflite output failed",
}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SCOPE_NAME = re.compile(r"[A-Za-z0-9_.\\/>-]*")
_SCOPE_CHAR = re.compile(r"[^A-Za-z0-9_.\\/>-]")


class TfliteConvertConfig(PassConfig):
    int8: bool = Field(default=True, description="Also write the dynamic-range and full-integer models (needs calibration data).")
    io_dtype: Literal["int8", "uint8"] = Field(default="int8", description="Input/output type of the full-integer model (the Edge TPU takes int8 or uint8).")
    quant_type: Literal["per-channel", "per-tensor"] = Field(default="per-channel", description="Weight scales of the integer models.")
    calibration_samples: int = Field(default=256, gt=0, description="Calibration samples used at most.")
    timeout_s: int = Field(default=1800, gt=0, description="The conversion is stopped after this many seconds.")


class TfliteConvert(Pass):
    name = "tflite-convert"
    description = "ONNX to TFLite with onnx2tf, offline: float32, float16, dynamic-range and full-integer (int8 IO) models from one conversion."
    Config = TfliteConvertConfig
    uses_calibration_data = True
    uses_profile = False

    @classmethod
    def code_sha256(cls) -> str:
        """The runner is part of the conversion: a change to either file never reuses old results."""
        import hashlib

        from builder.passes.tflite import onnx2tf_runner

        runner = Path(onnx2tf_runner.__file__).read_bytes()
        return hashlib.sha256(super().code_sha256().encode() + runner).hexdigest()

    def run(self, input_model: Path, ctx: PassContext) -> PassOutput:
        import onnx

        config = self.config
        work = ctx.work_dir
        model = onnx.load(str(input_model))
        onnx_inputs = [_value_shape(v) for v in model.graph.input if v.name not in {i.name for i in model.graph.initializer}]
        onnx_outputs = [_value_shape(v) for v in model.graph.output]
        # onnx2tf rewrites the file it is given (shape inference, its own onnxsim runs): hand it a copy, with
        # inputs renamed input_0, input_1 … so calibration keys and TFLite names never depend on sanitising rules.
        onnx_copy = work / "onnx2tf_input.onnx"
        safe_names = {name: f"input_{index}" for index, (name, _) in enumerate(onnx_inputs)}
        _rename_inputs(model, safe_names)
        # TensorFlow takes op names as scope names (^[A-Za-z0-9_.\\/>-]*$); exporters write others (Paddle: `Conv@0`).
        original_names = _sanitize_node_names(model)
        onnx.save(model, str(onnx_copy))
        calibration = []
        if config.int8:
            if ctx.data is None or ctx.data.calibration is None:
                raise DataError("TFLite integer models need calibration data: set data.calibration in edgepack.yaml")
            feeds = list(ctx.data.feeds("calibration", limit=config.calibration_samples))
            for name, _shape in onnx_inputs:
                npy = work / f"calibration_{safe_names[name]}.npy"
                np.save(npy, np.concatenate([np.asarray(feed[name], dtype=np.float32) for feed in feeds], axis=0))
                calibration.append({"name": safe_names[name], "npy": str(npy)})
        out_dir = work / "onnx2tf_out"
        spec = {
            "onnx": str(onnx_copy), "out_dir": str(out_dir), "calibration": calibration, "int8": config.int8,
            "io_dtype": config.io_dtype, "quant_type": config.quant_type,
            "keep_layout_inputs": list(safe_names.values()), "result": str(work / "onnx2tf_result.json"),
        }
        spec_path = work / "onnx2tf_spec.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        log_path = work / LOG_FILE
        result = _run_onnx2tf(spec_path, spec, log_path, work, config.timeout_s)
        self._check_offline(result, work, log_path)
        if not result.get("ok"):
            raise _conversion_error(result, log_path, model, original_names, self.name)

        files: dict[str, str] = {}
        failed: dict[str, str] = {}
        log_text = log_path.read_text(errors="replace")
        wanted = list(VARIANT_FILES) if config.int8 else ["fp32", "fp16"]
        for variant in wanted:
            produced = out_dir / f"{onnx_copy.stem}_{VARIANT_FILES[variant]}.tflite"
            if not produced.is_file():
                failed[variant] = _variant_failure(log_text, variant)
                continue
            target = work / f"model_{VARIANT_FILES[variant]}.tflite"
            shutil.copyfile(produced, target)
            problem = _litert_problem(target)
            if problem:
                failed[variant] = problem
                target.unlink()
                continue
            files[variant] = target.name
        if "fp32" not in files:
            raise PassError(f"onnx2tf wrote no usable float32 model: {failed.get('fp32', 'unknown reason')}",
                            pass_name=self.name, log_path=log_path)
        io_map = {name: tflite_io(work / name, onnx_inputs, onnx_outputs) for name in files.values()}
        _resolve_ambiguous_outputs(work, files["fp32"], io_map, input_model, onnx_inputs)
        (work / IO_FILE).write_text(json.dumps(io_map, indent=2, sort_keys=True))
        versions = result.get("versions", {})
        info = {
            "files": files,
            "failed_variants": failed,
            "converter": {
                "tool": "onnx2tf",
                **versions,
                "offline": True,
                "calibration": (f"user calibration data, {len(feeds)} samples, via custom_input_op_name_np_data_path (-cind NAME NPY 0 1)"
                                if config.int8 else None),
                "calibration_samples": len(feeds) if config.int8 else 0,
                "input_layout": "ONNX layout kept (keep_ncw_or_nchw_or_ncdhw_input_names / -k)",
                "quant_type": config.quant_type,
                "io_dtype": config.io_dtype,
                "log": LOG_FILE,
            },
        }
        sidecars = [work / name for variant, name in files.items() if variant != "fp32"] + [work / IO_FILE, log_path]
        return PassOutput(model_path=work / files["fp32"], info=info, sidecars=sidecars)

    def _check_offline(self, result: dict[str, Any], work: Path, log_path: Path) -> None:
        attempts = result.get("network_attempts") or []
        downloaded = [p.name for p in work.rglob("calibration_image_sample_data_*")]
        if attempts or downloaded:
            what = attempts[0] if attempts else f"{downloaded[0]} appeared"
            raise PassError(f"onnx2tf tried to use the network ({what}); the conversion must run offline",
                            pass_name=self.name, log_path=log_path)


def _value_shape(value: Any) -> tuple[str, list[int | None]]:
    dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
    return value.name, dims


def _rename_inputs(model: Any, names: dict[str, str]) -> None:
    """Rename graph inputs everywhere they are read (subgraphs included)."""

    def visit(graph: Any) -> None:
        for node in graph.node:
            for index, name in enumerate(node.input):
                if name in names:
                    node.input[index] = names[name]
            for attribute in node.attribute:
                if attribute.g is not None and attribute.HasField("g"):
                    visit(attribute.g)
                for sub in attribute.graphs:
                    visit(sub)

    for value in model.graph.input:
        if value.name in names:
            value.name = names[value.name]
    visit(model.graph)


def _sanitize_node_names(model: Any) -> dict[str, str]:
    """Give every node a name TensorFlow accepts; returns new name → original name for the renamed ones."""
    taken = {node.name for node in model.graph.node}
    renamed = {}
    for node in model.graph.node:
        if _SCOPE_NAME.fullmatch(node.name):
            continue
        base = _SCOPE_CHAR.sub("_", node.name)
        name, suffix = base, 1
        while name in taken:
            name, suffix = f"{base}_{suffix}", suffix + 1
        taken.add(name)
        renamed[name] = node.name
        node.name = name
    return renamed


def _run_onnx2tf(spec_path: Path, spec: dict[str, Any], log_path: Path, cwd: Path, timeout_s: int) -> dict[str, Any]:
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "CUDA_VISIBLE_DEVICES": "",
        "TF_ENABLE_ONEDNN_OPTS": "0",
        # onnx2tf runs the `onnxsim` command; find the one installed beside this interpreter.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[3]), os.environ.get("PYTHONPATH", "")]),
        "NO_COLOR": "1",
    }
    command = [sys.executable, "-m", "builder.passes.tflite.onnx2tf_runner", str(spec_path)]
    with log_path.open("wb") as log:
        log.write(("$ " + " ".join(command) + "\n").encode())
        log.flush()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the runner's group: onnx2tf's own onnxsim subprocesses too
            process.wait()
            _strip_ansi(log_path)
            raise PassError(f"onnx2tf did not finish within {timeout_s} s (timeout_s of tflite-convert)",
                            pass_name="tflite-convert", log_path=log_path) from None
    _strip_ansi(log_path)
    result_path = Path(spec["result"])
    if not result_path.is_file():
        return {"ok": False, "error": {"type": "crash", "message": f"the onnx2tf process ended with status {process.returncode} and no result",
                                       "onnx_op_name": None}}
    return json.loads(result_path.read_text())


def _strip_ansi(path: Path) -> None:
    path.write_text(_ANSI.sub("", path.read_text(errors="replace")))


def _conversion_error(result: dict[str, Any], log_path: Path, model: Any, original_names: dict[str, str], pass_name: str) -> PassError:
    """One line: which node and op onnx2tf failed on (from the exception, else from its log) and why."""
    error = result.get("error") or {}
    log_text = log_path.read_text(errors="replace")
    node_name = error.get("onnx_op_name")
    if not node_name:
        found = re.findall(r"onnx_op_name: (\S+)", log_text)
        node_name = found[-1] if found else None
    op_type = None
    if node_name:
        plain = re.sub(r"^wa/", "/", node_name)
        op_type = next((n.op_type for n in model.graph.node if n.name in (node_name, plain)), None)
        node_name = original_names.get(plain, original_names.get(node_name, plain))
    # The exception's own words, without TF-Keras's wrapping ("Exception encountered when calling layer …").
    lines = [line.strip() for line in (error.get("message") or "").splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("Exception encountered when calling", "Call arguments", "•"))]
    reason = lines[0] if lines else error.get("type", "unknown error")
    if error.get("type") == "ModuleNotFoundError" and op_type:
        reason = f"onnx2tf {result.get('versions', {}).get('onnx2tf', '')} does not implement the ONNX op {op_type}".replace("  ", " ")
    elif error.get("type") == "SystemExit":
        errors = [line.split("ERROR:", 1)[1].strip() for line in log_text.splitlines() if "ERROR:" in line and line.split("ERROR:", 1)[1].strip()]
        reason = errors[0] if errors else reason
    elif error.get("type") not in (None, "crash") and not reason.startswith(error["type"]):
        reason = f"{error['type']}: {reason}"
    where = f" at {op_type} node {node_name!r}" if op_type else (f" at node {node_name!r}" if node_name else "")
    return PassError(f"onnx2tf cannot convert this model{where}: {reason[:240]}", pass_name=pass_name, log_path=log_path,
                     node_name=node_name, op_type=op_type)


def _variant_failure(log_text: str, variant: str) -> str:
    marker = _VARIANT_FAILED.get(variant)
    lines = log_text.splitlines()
    if marker:
        for index, line in enumerate(lines):
            if marker in line:
                cause = next((l.strip() for l in reversed(lines[max(0, index - 40):index]) if re.match(r"\s*[\w.]*(Error|Exception)\b", l)), "")
                return f"{marker.lower()}" + (f": {cause[:200]}" if cause else "")
    return f"onnx2tf wrote no {variant} model"


def _litert_problem(path: Path) -> str | None:
    """Why LiteRT (the device runtime) cannot load this file, or None (e.g. TensorFlow Select ops)."""
    from ai_edge_litert.interpreter import Interpreter

    try:
        interpreter = Interpreter(model_path=str(path))
        interpreter.allocate_tensors()
    except Exception as exc:  # noqa: BLE001 - any load failure disqualifies the file; the reason is reported
        return f"LiteRT cannot load it: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__}"
    flex = sorted({op["op_name"] for op in interpreter._get_ops_details() if op["op_name"].startswith("Flex")})
    if flex:
        return f"needs TensorFlow Select ops ({', '.join(flex)}), which LiteRT does not include"
    return None


def _channel_last(rank: int) -> list[int] | None:
    """The transpose TensorFlow's layout applies to an ONNX channel-first tensor of this rank."""
    return [0, *range(2, rank), 1] if rank in (3, 4, 5) else None


def tflite_io(path: Path, onnx_inputs: list[tuple[str, list]], onnx_outputs: list[tuple[str, list]]) -> dict[str, Any]:
    """How a converted file's tensors line up with the ONNX inputs and outputs, with their quantization."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    inputs = interpreter.get_input_details()
    outputs = interpreter.get_output_details()
    signatures = interpreter._get_full_signature_list() or {}
    if signatures:
        # Models written from the SavedModel carry a signature: input_<k> by our names, output_<k> in ONNX order.
        signature = next(iter(signatures.values()))
        by_index_in = {d["index"]: d for d in inputs}
        by_index_out = {d["index"]: d for d in outputs}
        inputs = [by_index_in[signature["inputs"][f"input_{k}"]] for k in range(len(onnx_inputs))]
        outputs = [by_index_out[signature["outputs"][key]] for key in sorted(signature["outputs"], key=_key_number)]
    else:
        by_name = {d["name"]: d for d in inputs}
        inputs = [by_name.get(f"input_{k}", inputs[k] if k < len(inputs) else None) for k in range(len(onnx_inputs))]
    if len(outputs) != len(onnx_outputs) or any(d is None for d in inputs):
        raise PassError(f"{path.name}: {len(inputs)} inputs / {len(outputs)} outputs do not match the ONNX model's "
                        f"{len(onnx_inputs)} / {len(onnx_outputs)}", pass_name="tflite-convert")

    def entry(detail: dict[str, Any], onnx_name: str, onnx_shape: list, is_input: bool) -> dict[str, Any]:
        tflite_shape = [int(d) for d in detail["shape"]]
        scale, zero_point = detail["quantization"]
        dtype = np.dtype(detail["dtype"]).name
        quantized = dtype in ("int8", "uint8", "int16")
        perm = _channel_last(len(onnx_shape))
        same = _fits(list(onnx_shape), tflite_shape)
        channel_last = perm is not None and _fits([onnx_shape[p] for p in perm], tflite_shape)
        # `transpose` takes the ONNX-layout array to the TFLite tensor for an input, and the TFLite tensor
        # back to the ONNX layout for an output (the inverse permutation). Inputs keep the ONNX layout (-k).
        if is_input:
            transpose = perm if channel_last and not same else None
        else:
            transpose = [int(i) for i in np.argsort(perm)] if channel_last else None
        record = {
            "name": onnx_name, "tflite_name": detail["name"], "tflite_index": int(detail["index"]),
            "shape": tflite_shape, "onnx_shape": list(onnx_shape), "dtype": dtype,
            "scale": float(scale) if quantized else None, "zero_point": int(zero_point) if quantized else None,
            "transpose": transpose,
        }
        if not is_input and same and channel_last:
            record["ambiguous_layout"] = True  # the shape reads the same both ways: decided on the float32 model
        return record

    return {
        "inputs": [entry(d, name, shape, True) for d, (name, shape) in zip(inputs, onnx_inputs)],
        "outputs": [entry(d, name, shape, False) for d, (name, shape) in zip(outputs, onnx_outputs)],
    }


def _fits(onnx_shape: list[int | None], tflite_shape: list[int]) -> bool:
    """Whether a shape with unknown (symbolic) dims can be this concrete shape."""
    return len(onnx_shape) == len(tflite_shape) and all(o is None or o == t for o, t in zip(onnx_shape, tflite_shape))


def _key_number(key: str) -> int:
    match = re.search(r"(\d+)$", key)
    return int(match.group(1)) if match else 0


def _resolve_ambiguous_outputs(work: Path, fp32_name: str, io_map: dict[str, Any], onnx_model: Path,
                               onnx_inputs: list[tuple[str, list]]) -> None:
    """Where an output's shape reads the same in both layouts, run the float32 model once and pick the match."""
    outputs = io_map[fp32_name]["outputs"]
    ambiguous = [index for index, output in enumerate(outputs) if output.get("ambiguous_layout")]
    if not ambiguous:
        return
    from builder.runtimes.tflite import LiteRtAdapter
    from builder.verify import run_model

    rng = np.random.default_rng(0)
    feed = {name: rng.random([d or 1 for d in shape], dtype=np.float32) for name, shape in onnx_inputs}
    reference = [array[0] for array in run_model(onnx_model, [feed]).arrays.values()]
    plain_map = {**io_map[fp32_name], "outputs": [{**o, "transpose": None} for o in outputs]}
    plain = LiteRtAdapter().invoke_once(work / fp32_name, feed, plain_map)
    for index in ambiguous:
        perm = [int(i) for i in np.argsort(_channel_last(plain[index].ndim))]
        moved = plain[index].transpose(perm)
        channel_last = float(np.abs(moved - reference[index]).max()) < float(np.abs(plain[index] - reference[index]).max())
        for entry in io_map.values():
            entry["outputs"][index]["transpose"] = perm if channel_last else None
            entry["outputs"][index].pop("ambiguous_layout", None)
