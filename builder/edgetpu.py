"""Where a full-integer .tflite would run on a Coral Edge TPU: a static op-placement report.

The Edge TPU compiler (`edgetpu_compiler`, x86-64 Linux only) cannot run on the build host, so the
bundle carries the CPU-runnable full-integer model and this report predicts what the compiler will
do with it, from Coral's published op table (`builder/data/edgetpu_ops.yaml`, source cited there):

    ops in execution order → each op: in the table? every tensor 8-bit? ≤3 dims larger than 1? …
    → the compiler maps ops up to the first one that fails; that op and everything after it run on the CPU

Limitations the table states that a .tflite does not show directly (fused activations, dilation,
which axis a reduction runs over) are named in the op's `reason`, for a person to confirm against
the compiler's own log (`edgetpu_compiler -s`). Reads the model with LiteRT; never imports TensorFlow.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml

DATA = Path(__file__).parent / "data" / "edgetpu_ops.yaml"
SOFTMAX_MAX_ELEMENTS = 16_000
_EIGHT_BIT = ("int8", "uint8")
# Integer tensors that are not activations: biases, shapes, axes, permutations, paddings.
_INDEX_TYPES = ("int32", "int64")


@lru_cache(maxsize=1)
def edgetpu_table() -> dict[str, Any]:
    data = yaml.safe_load(DATA.read_text())
    by_tflite = {}
    for operation in data["operations"]:
        for builtin in operation["tflite"]:
            by_tflite[builtin] = operation
    return {**data, "by_tflite": by_tflite}


def compiler_command(model_member: str = "model/model.tflite", out_dir: str = "edgetpu") -> str:
    """The command that compiles the bundle's model for the Edge TPU (-s: print the per-op mapping)."""
    return f"edgetpu_compiler -s -o {out_dir} {model_member}"


def _dims_over_one(shape: list[int]) -> int:
    return sum(1 for d in shape if d > 1)


def _op_problem(op: dict[str, Any], tensors: dict[int, dict[str, Any]], activations: set[int], table: dict[str, Any]) -> str | None:
    """Why the Edge TPU cannot run this op, or None."""
    name = op["op_name"]
    entry = table["by_tflite"].get(name)
    if entry is None:
        return f"{name} is not in the Edge TPU's supported operations"
    if entry["runtime"] != "all" and int(entry["runtime"]) > table["runtime_version"]:
        return f"{entry['name']} needs Edge TPU runtime {entry['runtime']} (compiler {table['compiler_version']} targets {table['runtime_version']})"
    used = [tensors[i] for i in [*op["inputs"], *op["outputs"]] if i >= 0 and i in tensors]
    for tensor in used:
        dtype = np.dtype(tensor["dtype"]).name
        if dtype not in _EIGHT_BIT and dtype not in _INDEX_TYPES:
            return f"tensor {tensor['name']!r} is {dtype}: the Edge TPU needs every tensor quantized to 8 bits"
    # The dimension rule is about the data flowing through the graph; weights (OHWI for Conv2d) are laid out by the compiler.
    for tensor in (tensors[i] for i in [*op["inputs"], *op["outputs"]] if i in activations and i in tensors):
        shape = [int(d) for d in tensor["shape"]]
        if len(shape) > 3 and _dims_over_one(shape) > 3:
            return f"tensor {tensor['name']!r} has shape {shape}: only the 3 innermost dimensions may be larger than 1"
    if name == "SOFTMAX":
        shape = [int(d) for d in tensors[op["inputs"][0]]["shape"]]
        if _dims_over_one(shape) > 1 or int(np.prod(shape)) > SOFTMAX_MAX_ELEMENTS:
            return f"Softmax input {shape}: the Edge TPU takes a 1-D input of at most {SOFTMAX_MAX_ELEMENTS} elements"
    return None


def placement_report(model_path: Path, model_member: str = "model/model.tflite", docker_image: str | None = None) -> dict[str, Any]:
    """Static Edge TPU placement of a .tflite: per op `edgetpu` or `cpu` with the reason, and how to compile it."""
    from ai_edge_litert.interpreter import Interpreter

    table = edgetpu_table()
    interpreter = Interpreter(model_path=str(model_path))
    tensors = {int(t["index"]): t for t in interpreter.get_tensor_details()}
    ops = sorted(interpreter._get_ops_details(), key=lambda op: op["index"])
    activations = {int(d["index"]) for d in interpreter.get_input_details()} | {int(i) for op in ops for i in op["outputs"]}
    placement: list[dict[str, Any]] = []
    first_unsupported: dict[str, Any] | None = None
    for op in ops:
        entry = table["by_tflite"].get(op["op_name"])
        coral_name = entry["name"] if entry else op["op_name"]
        if first_unsupported is not None:
            reason = (f"after the first unsupported op (#{first_unsupported['index']} {first_unsupported['op']}): "
                      "the compiler maps nothing beyond it, so this op runs on the CPU")
            placement.append({"index": int(op["index"]), "op": coral_name, "device": "cpu", "reason": reason})
            continue
        problem = _op_problem(op, tensors, activations, table)
        if problem:
            first_unsupported = {"op": coral_name, "index": int(op["index"]), "reason": problem}
            placement.append({"index": int(op["index"]), "op": coral_name, "device": "cpu", "reason": problem})
            continue
        reason = "supported"
        if entry["runtime"] != "all":
            reason += f" from Edge TPU runtime {entry['runtime']}"
        if entry.get("limitations"):
            reason += f"; confirm the known limitation: {entry['limitations']}"
        placement.append({"index": int(op["index"]), "op": coral_name, "device": "edgetpu", "reason": reason})

    float_tensors = sorted({t["name"] for t in tensors.values()
                            if np.dtype(t["dtype"]).name not in _EIGHT_BIT + _INDEX_TYPES})
    model_ops = sorted({p["op"] for p in placement})
    unsupported_types = sorted({p["op"] for p in placement if p["device"] == "cpu" and not p["reason"].startswith("after the first")})
    tpu_ops = sum(1 for p in placement if p["device"] == "edgetpu")
    command = compiler_command(model_member)
    report: dict[str, Any] = {
        "source": table["source"],
        "compiler_version": table["compiler_version"],
        "runtime_version": table["runtime_version"],
        "supported_ops": [op for op in model_ops if op in {e["name"] for e in table["operations"]} and op not in unsupported_types],
        "unsupported_ops": unsupported_types,
        "first_unsupported": first_unsupported,
        "tpu_ops": tpu_ops,
        "cpu_ops": len(placement) - tpu_ops,
        "fully_mapped": first_unsupported is None and bool(placement),
        "int8_only": {"ok": not float_tensors, "float_tensors": float_tensors[:20]},
        "io": {
            "inputs": [{"name": d["name"], "dtype": np.dtype(d["dtype"]).name} for d in interpreter.get_input_details()],
            "outputs": [{"name": d["name"], "dtype": np.dtype(d["dtype"]).name} for d in interpreter.get_output_details()],
        },
        "placement": placement,
        "compiler_command": command,
        "note": (
            "Static prediction from Coral's published op table: the Edge TPU compiler cannot run on the build host, so the "
            f"bundle holds the full-integer model, which runs on the CPU as is. Compile it with edgetpu_compiler "
            f"(Edge TPU Compiler {table['compiler_version']}, x86-64 Linux) on a machine that has it: `{command}` writes "
            "edgetpu/model_edgetpu.tflite and edgetpu/model_edgetpu.log (-s prints which ops it mapped); run that file with "
            "the Edge TPU delegate (libedgetpu). The compiler maps ops up to the first one the Edge TPU cannot run; "
            "that op and everything after it run on the CPU."
        ),
    }
    if docker_image:
        # The profile's toolchain image; `edgepack build --toolchain docker` runs this step itself (builder.toolchain).
        report["compiler_docker_command"] = (f'docker run --rm --network none -v "$PWD:/work" -w /work {docker_image} '
                                             f"edgetpu_compiler -s -o edgetpu {model_member}")
    return report
