"""What this machine's processor does natively, read in one place (tests fake it here).

The right precision on a CPU depends on the CPU: with AMX or AVX-512-BF16, bfloat16
matrix products run in hardware and a forward pass is 1.7-3x faster (docs/performance.md);
without them torch emulates bfloat16 and it is several times slower than float32.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")
BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
"""CPU flags (as Linux names them) of bfloat16 arithmetic in hardware."""


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags, from /proc/cpuinfo's first `flags` line; none where there is no such file."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def native_half_precision(device: torch.device) -> torch.dtype | None:
    """The half precision `device` computes in hardware: float16 on CUDA, bfloat16 on a CPU with
    AMX or AVX-512-BF16; None where there is none."""
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and BF16_FLAGS & cpu_flags():
        return torch.bfloat16
    return None


def describe_cpu() -> dict[str, object]:
    """The CPU's model name and the flags that decide depthd's choices, for benchmarks and logs."""
    name = ""
    try:
        for line in CPUINFO.read_text().splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16", "amx_fp16")
    return {"model": name or platform.processor(), "machine": platform.machine(),
            "flags": sorted(flag for flag in wanted if flag in cpu_flags())}
