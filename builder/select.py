"""Gates and selection: which variants pass, and which one ships.

Selection picks the fastest passing variant on the target (the host's measurement where the host is
the target, the roofline estimate otherwise); variants within `LATENCY_TOLERANCE` of the fastest count
as equally fast, and among those the profile's runtime order decides, then the smallest, then the most
accurate. A variant that another
candidate beats on latency, size and accuracy at once is never selected.
"""

from __future__ import annotations

from builder.verify import accuracy_drop
from edgepack.report import FailedGate, GateThresholds, Variant, VariantMeasurement

LATENCY_TOLERANCE = 0.10


def evaluate_gates(variant: VariantMeasurement, gates: GateThresholds, metric: str, reference_accuracy: float | None) -> list[FailedGate]:
    """The gates this variant fails, each with value, threshold and a sentence."""
    failed: list[FailedGate] = []
    max_drop = gates.max_accuracy_drop
    if max_drop is not None and reference_accuracy is not None:
        drop = accuracy_drop(metric, reference_accuracy, variant.accuracy)
        if drop > max_drop + 1e-12:
            unit = " points" if metric == "top1" else ""
            scale = 100.0 if metric == "top1" else 1.0
            failed.append(FailedGate(
                gate="max_accuracy_drop", value=round(drop, 6), threshold=max_drop,
                message=f"{metric} dropped {drop * scale:.3g}{unit}, more than the {max_drop * scale:.3g}{unit} allowed",
            ))
    min_agreement = gates.min_agreement
    if min_agreement is not None and variant.agreement < min_agreement:
        failed.append(FailedGate(
            gate="min_agreement", value=variant.agreement, threshold=min_agreement,
            message=f"agrees with fp32 on {variant.agreement:.1%} of samples, less than {min_agreement:.1%}",
        ))
    max_p95 = gates.max_p95_latency_ms
    p95 = variant.target_latency_p95_ms
    if max_p95 is not None and p95 > max_p95:
        failed.append(FailedGate(
            gate="max_p95_latency_ms", value=p95, threshold=max_p95,
            message=f"p95 latency on the target {p95:.3g} ms ({variant.target_latency_source}) exceeds {max_p95} ms",
        ))
    max_size = gates.max_size_mb
    if max_size is not None and variant.size_bytes / 1e6 > max_size:
        failed.append(FailedGate(
            gate="max_size_mb", value=round(variant.size_bytes / 1e6, 4), threshold=max_size,
            message=f"model is {variant.size_bytes / 1e6:.3g} MB, more than {max_size} MB",
        ))
    return failed


def _dominates(a: Variant, b: Variant, metric: str) -> bool:
    """a is at least as good as b on latency, size and accuracy, and strictly better on latency and size."""
    acc_ok = accuracy_drop(metric, a.accuracy, b.accuracy) >= 0
    return acc_ok and a.target_latency_ms < b.target_latency_ms and a.size_bytes < b.size_bytes


def select_variant(variants: list[Variant], metric: str, runtime_order: list[str] | None = None) -> tuple[str | None, str]:
    """Name of the variant to ship (None if nothing passes) and a sentence saying why."""
    candidates = [v for v in variants if v.passed and v.runnable]
    if not candidates:
        reasons = "; ".join(
            f"{v.name}: " + (", ".join(g.message for g in v.failed_gates) or v.dropped_reason or "failed")
            for v in variants
        )
        return None, f"no variant passes every gate ({reasons})"
    dominated = {b.name for b in candidates for a in candidates if a is not b and _dominates(a, b, metric)}
    pool = [v for v in candidates if v.name not in dominated] or candidates
    fastest = min(v.target_latency_ms for v in pool)
    near = [v for v in pool if v.target_latency_ms <= fastest * (1 + LATENCY_TOLERANCE) + 1e-9]
    higher_better = metric != "mae"

    def accuracy_key(v: Variant) -> float:
        return -v.accuracy if higher_better else v.accuracy

    # Among equally fast variants the profile's runtime order decides the format, then size, then accuracy.
    order = {name: index for index, name in enumerate(runtime_order or [])}

    def runtime_rank(v: Variant) -> int:
        # TensorRT-ready ONNX also runs under onnxruntime's TensorRT EP: rank it as the better of the two.
        return order.get(v.runtime, len(order))

    chosen = min(near, key=lambda v: (runtime_rank(v), v.size_bytes, accuracy_key(v), v.target_latency_ms))
    others = ", ".join(
        f"{v.name} {v.target_latency_ms:.3g} ms / {v.size_bytes / 1024:.0f} KB"
        for v in candidates if v is not chosen
    )
    why = (
        f"{chosen.name}: passes every gate and is the "
        + (("fastest (within 10 %) in the profile's preferred runtime " + chosen.runtime) if len(near) > 1 else "fastest")
        + f" on the target ({chosen.target_latency_ms:.3g} ms {'measured on the host' if chosen.target_latency_source == 'host' else 'estimated'}, "
        f"{chosen.size_bytes / 1024:.0f} KB)"
    )
    if others:
        why += f"; other passing variants: {others}"
    if dominated:
        why += f"; never selected because another variant is faster and smaller and no less accurate: {', '.join(sorted(dominated))}"
    return chosen.name, why
