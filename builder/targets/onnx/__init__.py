"""ONNX targets: onnxruntime (CPU/GPU execution providers) and TensorRT-ready ONNX for Jetson.

Both build the same family from the fp32 reference: fp16, static INT8 in Q/DQ form, dynamic INT8 for
MatMul-heavy models, and pruned variants. TensorRT additionally checks every op against TensorRT's
ONNX op support list and marks 2:4-sparse INT8 for Ampere/Orin sparse tensor cores. The TensorRT
engine itself is device-specific: the bundle declares how to build it on the device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from builder.passes.base import load_all_passes
from builder.targets import Candidate, Target

if TYPE_CHECKING:
    from builder.context import BuildContext, ReferenceModel
    from hardware_profiles.schema import RuntimeSpec


class OnnxRuntimeTarget(Target):
    runtime = "onnxruntime"

    def candidates(self, ctx: BuildContext, reference: ReferenceModel) -> list[Candidate]:
        if any(c.format == "onnx" for c in ctx.built):
            # TensorRT candidates are the same ONNX files; onnxruntime (TensorRT/CUDA EP) runs them too.
            return []
        return onnx_family(ctx, reference, self.runtime)


class TensorRTTarget(Target):
    runtime = "tensorrt"
    needs_static_shapes = True
    # TensorRT engines are built on the device; on the host the same ONNX is verified in onnxruntime
    # (the inherited onnxruntime adapter).

    def drives_accelerator(self, spec: RuntimeSpec) -> bool:
        return True

    def candidates(self, ctx: BuildContext, reference: ReferenceModel) -> list[Candidate]:
        from builder.tensorrt_support import unsupported_tensorrt_ops

        problems = unsupported_tensorrt_ops(reference.model_path)
        if problems:
            listed = ", ".join(f"{op} (node {node})" for op, node in problems[:5])
            ctx.note(f"TensorRT cannot parse this model: unsupported op(s) {listed}; building for onnxruntime instead")
            return []
        candidates = onnx_family(ctx, reference, self.runtime)
        for candidate in candidates:
            bad = unsupported_tensorrt_ops(candidate.model_path)
            if bad:
                candidate.info["dropped_reason"] = "TensorRT cannot parse: " + ", ".join(f"{op} (node {node})" for op, node in bad[:5])
            candidate.info["tensorrt"] = tensorrt_engine_spec(candidate, _sparse_capable(ctx))
        return candidates

    def requantized(self, ctx: BuildContext, candidate: Candidate) -> Candidate:
        candidate.info["tensorrt"] = tensorrt_engine_spec(candidate, _sparse_capable(ctx))
        return candidate


def _sparse_capable(ctx: BuildContext) -> bool:
    """Whether the board has sparse tensor cores (Ampere/Orin) that run 2:4-sparse INT8 faster."""
    return any(a.sparse_int8_tops for a in ctx.profile.accelerators)


def tensorrt_engine_spec(candidate: Candidate, sparse_capable: bool) -> dict[str, Any]:
    """How the device builds its engine from this ONNX (the engine is specific to GPU and TensorRT version)."""
    flags = []
    if candidate.precision == "fp16":
        flags.append("--fp16")
    if candidate.precision == "int8":
        # Explicit quantization: scales come from the Q/DQ nodes; --fp16 lets non-quantized layers use half.
        flags += ["--int8", "--fp16"]
    sparse = bool(candidate.info.get("sparsity")) and candidate.info.get("prune", {}).get("pattern") == "2:4"
    if sparse and sparse_capable:
        flags.append("--sparsity=enable")
    return {
        "build_on_device": True,
        "explicit_quantization": candidate.precision == "int8",
        "sparse_tensor_cores": sparse and sparse_capable,
        "trtexec": " ".join(["trtexec", f"--onnx={candidate.model_member}", "--saveEngine=model.engine", *flags]),
        "doc": "device_agent.tensorrt_engine builds and caches the engine when `tensorrt` is importable on the device",
    }


def onnx_family(ctx: BuildContext, reference: ReferenceModel, runtime: str) -> list[Candidate]:
    """fp32, then every variant the plan asks for; one that fails to build is left out (ctx.attempt)."""
    plan, config, profile = ctx.plan, ctx.config, ctx.profile
    base = reference.model_path
    passes = load_all_passes()
    out: list[Candidate] = [Candidate("fp32", "fp32", runtime, "onnx", base, {})]

    def add(name: str, precision: str, make) -> Candidate | None:
        candidate = ctx.attempt(name, runtime, precision, make)
        if candidate is not None:
            out.append(candidate)
        return candidate

    def from_pass(name: str, precision: str, pass_, model, label: str | None = None, extra=None):
        def make() -> Candidate:
            result = ctx.run_pass(pass_, model, label=label)
            return Candidate(name, precision, runtime, "onnx", result.model_path, {**result.info, **(extra(result) if extra else {})})
        return make

    if plan.fp16:
        add("fp16", "fp16", from_pass("fp16", "fp16", plan.fp16, base))
    if plan.int8:
        add("int8", "int8", from_pass("int8", "int8", plan.int8, base))
    if plan.int8_dynamic_config is not None:
        mode = config.optimize.int8.dynamic
        share = reference.matmul_share
        if mode == "always" or (mode == "auto" and share >= 0.5):
            reduce_range = bool(plan.int8 and plan.int8.scheme(profile)["reduce_range"])
            dyn = passes["int8-dynamic"].from_dict({**plan.int8_dynamic_config, "reduce_range": reduce_range})
            add("int8-dynamic", "int8", from_pass("int8-dynamic", "int8", dyn, base))
        elif mode == "auto":
            ctx.note(f"int8-dynamic not tried: MatMul/Gemm are {share:.0%} of the compute (auto tries it from 50%)")
    if plan.prune:
        sparse = add("fp32-sparse", "fp32", from_pass("fp32-sparse", "fp32", plan.prune, base,
                                                     extra=lambda result: {"prune": result.info}))
        if plan.int8 and sparse is not None:
            prune_info = sparse.info["prune"]
            add("int8-sparse", "int8", from_pass("int8-sparse", "int8", plan.int8, sparse.model_path, label="int8-sparse",
                                                 extra=lambda result: {"sparsity": prune_info["sparsity"], "prune": prune_info}))
    return out
