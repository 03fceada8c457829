"""What the build host is, and whether its measurements stand for the target's."""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path
from typing import Any

# Features that decide which kernels a runtime picks; host and target must agree on these for the
# host's latency to stand for the target's.
KERNEL_FEATURES = {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "dotprod", "i8mm", "sve"}
_ARM_FLAG_NAMES = {"asimd": "asimd", "asimddp": "dotprod", "asimdhp": "asimdhp", "fphp": "fp16", "i8mm": "i8mm",
                   "bf16": "bf16", "sve": "sve", "sve2": "sve2", "crc32": "crc32", "aes": "aes"}


@lru_cache(maxsize=1)
def host_info() -> dict[str, Any]:
    machine = platform.machine()
    features: set[str] = set()
    model = platform.processor() or machine
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "flags" and not features:
            features = set(value.split())
        elif key == "features" and not features:
            features = {_ARM_FLAG_NAMES.get(f, f) for f in value.split()}
            if "asimd" in features:
                features.add("neon")
        elif key == "model name" and model in (machine, ""):
            model = value.strip()
    if machine in ("arm64",):
        machine = "aarch64"
    if machine == "AMD64":
        machine = "x86_64"
    return {"machine": machine, "cpu": model, "cpu_features": sorted(features)}


def host_is_target(profile: Any) -> tuple[bool, str]:
    """True when the host's CPU runs the same kernels the target would (and the target has no accelerator)."""
    host = host_info()
    if profile.arch != host["machine"]:
        return False, f"host is {host['machine']}, target is {profile.arch}: latency on the target is estimated"
    if profile.accelerators:
        return False, f"target runs on {profile.accelerators[0].name}: latency on the target is estimated"
    want = set(profile.cpu.features) & KERNEL_FEATURES
    have = set(host["cpu_features"]) & KERNEL_FEATURES
    if want != have:
        return False, (
            f"host CPU kernel features {sorted(have)} differ from the target's {sorted(want)}: latency on the target is estimated"
        )
    return True, f"host CPU has the target's kernel features {sorted(want)}: host latency is measured on the target's ISA"
