"""`precision: auto` picks bf16 only where the hardware computes it natively."""

from __future__ import annotations

import pytest
import torch

from alignpipe import precision as prec
from alignpipe.config import OptimizationConfig, load_recipe

AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_cpu_flags_read_x86_and_arm():
    assert "avx2" in prec.cpu_flags(AVX2_ONLY) and "avx512_bf16" not in prec.cpu_flags(AVX2_ONLY)
    assert {"avx512_bf16", "amx_bf16"} <= prec.cpu_flags(SAPPHIRE)
    assert "bf16" in prec.cpu_flags(GRAVITON3)
    assert prec.cpu_flags("") == set()


@pytest.mark.parametrize(("cpuinfo", "expected"), [(AVX2_ONLY, "fp32"), (SAPPHIRE, "bf16"), (GRAVITON3, "bf16")])
def test_auto_follows_the_cpu(monkeypatch, cpuinfo, expected):
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: bool(prec.cpu_flags(cpuinfo) & set(prec.NATIVE_BF16_CPU_FLAGS)))
    assert prec.resolve_precision("auto", "cpu") == expected
    assert prec.resolve_precision("fp32", "cpu") == "fp32"  # explicit choices are kept
    assert prec.resolve_precision("bf16", "cpu") == "bf16"
    assert expected in prec.describe("auto", "cpu")


def test_explicit_bf16_without_native_support_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: False)
    prec._warn_emulated.cache_clear()
    with caplog.at_level("WARNING", logger="alignpipe.precision"):
        prec.resolve_precision("bf16", "cpu")
        prec.resolve_precision("bf16", "cpu")
    assert sum("emulated" in r.message for r in caplog.records) == 1


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be one of"):
        prec.resolve_precision("fp16", "cpu")


def test_auto_is_the_default_of_every_recipe():
    assert OptimizationConfig().precision == "auto"
    for name in ("quickstart", "grpo-arithmetic", "kto-arithmetic", "lipo-arithmetic", "dpo-hh", "simpo-hh"):
        assert load_recipe(name).optimization.precision == "auto", name


def test_trainer_autocast_follows_the_resolved_precision(monkeypatch):
    from alignpipe.optimization.scoring import autocast

    x = torch.randn(4, 4)
    for native, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda native=native: native)
        with autocast(OptimizationConfig(precision="auto"), torch.device("cpu")):
            assert (x @ x).dtype == dtype
