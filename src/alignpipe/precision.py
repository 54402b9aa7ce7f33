"""Which float precision the hardware computes fast: `precision: auto` picks bf16 only where it is native.

bf16 autocast is 2-4x faster than fp32 on CPUs with AVX512-BF16 or AMX and on GPUs with bf16 tensor cores.
On a CPU without them (AVX2 only) every bf16 matmul is emulated: one LoRA forward+backward of 16 x 60 tokens
on SmolLM2-135M took 230 s in bf16 against 7.5 s in fp32 on a 2-core AVX2-only AMD EPYC. So `auto`, the
default everywhere, asks the hardware, and an explicit `bf16` on such a CPU gets a warning.

This module imports torch lazily so that config validation can name the choices without loading it.
"""

from __future__ import annotations

import functools
import logging
import platform
from pathlib import Path

PRECISIONS = ("auto", "fp32", "bf16")
# /proc/cpuinfo flags that mean bf16 matmuls run natively: x86 AVX512-BF16 / AMX-BF16, Arm's BF16 extension
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")

log = logging.getLogger("alignpipe.precision")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags (x86 `flags`, Arm `Features`) from /proc/cpuinfo; empty where it cannot be read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 matmuls natively. macOS on Apple silicon has no /proc: there oneDNN
    has no fast bf16 path for torch's CPU autocast either, so False is the safe answer."""
    if platform.system() != "Linux":
        return False
    return bool(cpu_flags() & set(NATIVE_BF16_CPU_FLAGS))


def device_has_native_bf16(device_type: str) -> bool:
    if device_type == "cuda":
        import torch

        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":
        return cpu_has_native_bf16()
    return False  # mps and others: fp32 is the known-good path


def resolve_precision(requested: str, device_type: str = "cpu") -> str:
    """`auto` -> "bf16" where `device_type` computes it natively, else "fp32"; "fp32"/"bf16" as asked (an
    explicit bf16 on hardware that emulates it is kept, with a warning: it can be 30x slower)."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {requested!r}")
    native = device_has_native_bf16(device_type)
    if requested == "auto":
        return "bf16" if native else "fp32"
    if requested == "bf16" and not native:
        _warn_emulated(device_type)
    return requested


@functools.cache
def _warn_emulated(device_type: str) -> None:
    log.warning("precision bf16 on a %s without native bf16: it is emulated and can be many times slower "
                "than fp32 (precision: auto picks fp32 here)", device_type)


def describe(requested: str, device_type: str = "cpu") -> str:
    """One line for the run log: what was asked, what runs, and why."""
    chosen = resolve_precision(requested, device_type)
    native = device_has_native_bf16(device_type)
    why = f"{device_type} {'has' if native else 'has no'} native bf16"
    return f"precision {requested} -> {chosen} ({why})" if requested == "auto" else f"precision {chosen} ({why})"
