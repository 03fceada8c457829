"""Magnitude pruning of Conv/Gemm/MatMul weights: unstructured or 2:4 structured.

2:4 keeps the two largest-magnitude weights in every group of four along the reduction axis, the
pattern Ampere/Orin sparse tensor cores accelerate. Tensors whose reduction axis is not a multiple of
four are left dense and listed in the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from builder.onnx_utils import load_model, save_model
from builder.passes.base import Pass, PassConfig, PassContext, PassOutput


class PruneConfig(PassConfig):
    sparsity: float = Field(default=0.5, gt=0, lt=1, description="Fraction of weights zeroed (unstructured).")
    pattern: Literal["unstructured", "2:4"] = Field(default="unstructured", description="Sparsity pattern.")
    op_types: tuple[str, ...] = Field(default=("Conv", "Gemm", "MatMul"), description="Ops whose weights are pruned.")
    min_elements: int = Field(default=64, ge=1, description="Skip weight tensors smaller than this.")

    @model_validator(mode="after")
    def _pattern(self) -> "PruneConfig":
        if self.pattern == "2:4" and abs(self.sparsity - 0.5) > 1e-9:
            raise ValueError("pattern '2:4' always gives sparsity 0.5")
        return self


def prune_unstructured(weight: np.ndarray, sparsity: float) -> np.ndarray:
    flat = np.abs(weight).ravel()
    k = int(round(sparsity * flat.size))
    if k == 0:
        return weight
    # Stable ordering makes ties deterministic, so a rebuild gives the same bytes.
    order = np.argsort(flat, kind="stable")
    mask = np.ones(flat.size, dtype=bool)
    mask[order[:k]] = False
    return (weight.ravel() * mask).reshape(weight.shape).astype(weight.dtype)


def prune_2_4(weight: np.ndarray, reduction_axis: int) -> np.ndarray | None:
    """Zero the two smallest of every four consecutive weights along `reduction_axis`; None if it can't."""
    if weight.shape[reduction_axis] % 4:
        return None
    moved = np.moveaxis(weight, reduction_axis, -1)
    groups = moved.reshape(-1, 4)
    order = np.argsort(np.abs(groups), axis=1, kind="stable")
    mask = np.ones_like(groups, dtype=bool)
    np.put_along_axis(mask, order[:, :2], False, axis=1)
    pruned = (groups * mask).reshape(moved.shape)
    return np.moveaxis(pruned, -1, reduction_axis).astype(weight.dtype)


class Prune(Pass):
    name = "prune"
    description = "Magnitude pruning (unstructured or 2:4) of Conv/Gemm/MatMul weights."
    Config = PruneConfig

    def run(self, input_model: Path, ctx: PassContext) -> PassOutput:
        from onnx import numpy_helper

        model = load_model(input_model)
        initializers = {init.name: init for init in model.graph.initializer}
        pruned_total = zeros_total = 0
        skipped: list[str] = []
        seen: set[str] = set()
        for node in model.graph.node:
            if node.op_type not in self.config.op_types or len(node.input) < 2:
                continue
            name = node.input[1]
            if name not in initializers or name in seen:
                continue
            seen.add(name)
            weight = numpy_helper.to_array(initializers[name])
            if weight.dtype.kind != "f" or weight.ndim < 2 or weight.size < self.config.min_elements:
                continue
            if self.config.pattern == "2:4":
                reduction_axis = self._reduction_axis(node, weight)
                new = prune_2_4(weight, reduction_axis)
                if new is None:
                    skipped.append(f"{name} (reduction dim {weight.shape[reduction_axis]} not a multiple of 4)")
                    continue
            else:
                new = prune_unstructured(weight, self.config.sparsity)
            initializers[name].CopyFrom(numpy_helper.from_array(new, name))
            pruned_total += new.size
            zeros_total += int(np.count_nonzero(new == 0))
        output = save_model(model, ctx.scratch("pruned.onnx"))
        achieved = zeros_total / pruned_total if pruned_total else 0.0
        return PassOutput(
            model_path=output,
            info={"sparsity": round(achieved, 4), "pattern": self.config.pattern,
                  "pruned_weights": pruned_total, "skipped_tensors": skipped},
        )

    @staticmethod
    def _reduction_axis(node, weight: np.ndarray) -> int:
        if node.op_type == "Conv":
            return 1  # [out, in, kh, kw]: the input channels are reduced
        if node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            return 1 if trans_b else 0
        return weight.ndim - 2  # MatMul B: [..., K, N]
