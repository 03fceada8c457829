"""Choose the INT8 scheme (activation signedness, reduce_range, symmetry) from the target's CPU features.

Why these rules (onnxruntime's quantization guide and the ISA manuals):
- x86 with VNNI (avx512_vnni / avx_vnni): `vpdpbusd` multiplies u8 activations by s8 weights with 32-bit
  accumulation, no saturation: U8S8, full 8-bit range.
- x86 with only AVX2/AVX-512F: `vpmaddubsw` adds pairs of u8*s8 products into 16 bits and can saturate;
  7-bit weights (`reduce_range`) avoid it: U8S8 + reduce_range.
- ARM with the dot-product extension (`sdot`): S8S8 runs natively.
- ARM without dot-product (Cortex-A72/A57/A53): U8S8 is onnxruntime's faster kernel there.
- TensorRT targets: explicit quantization wants symmetric, signed INT8 (zero point 0) on activations
  and weights: S8S8 symmetric.
"""

from __future__ import annotations

from typing import Any


def choose_int8_scheme(profile: Any) -> dict[str, Any]:
    features = set(profile.cpu.features)
    runtime_names = [r.name for r in profile.runtimes]
    if runtime_names and runtime_names[0] == "tensorrt":
        return {
            "activation_type": "int8", "weight_type": "int8", "reduce_range": False,
            "symmetric_activations": True, "symmetric_weights": True,
            "reason": "TensorRT explicit quantization needs symmetric signed INT8 Q/DQ (zero point 0)",
        }
    if profile.arch == "x86_64":
        if features & {"avx512_vnni", "avx_vnni"}:
            return {
                "activation_type": "uint8", "weight_type": "int8", "reduce_range": False,
                "symmetric_activations": False, "symmetric_weights": True,
                "reason": "x86 VNNI (vpdpbusd) multiplies u8 x s8 without 16-bit saturation: U8S8, full range",
            }
        return {
            "activation_type": "uint8", "weight_type": "int8", "reduce_range": True,
            "symmetric_activations": False, "symmetric_weights": True,
            "reason": "x86 without VNNI: vpmaddubsw can saturate 16-bit pair sums; 7-bit weights (reduce_range) avoid it",
        }
    if "dotprod" in features:
        return {
            "activation_type": "int8", "weight_type": "int8", "reduce_range": False,
            "symmetric_activations": False, "symmetric_weights": True,
            "reason": "ARM dot-product extension (sdot) runs S8S8 natively",
        }
    return {
        "activation_type": "uint8", "weight_type": "int8", "reduce_range": False,
        "symmetric_activations": False, "symmetric_weights": True,
        "reason": "ARM without dot-product: onnxruntime's U8S8 kernels are the faster ones there",
    }
