"""Which precision a run uses, chosen per device and said out loud.

``amp: auto`` (the default) means: on CUDA, mixed precision (fp16 with a gradient scaler, or bf16
when ``amp_dtype`` says so); on a CPU, bf16 autocast only where the CPU computes bf16 natively
(AVX-512-BF16 or AMX), else float32 — on CPUs with AVX2 only, bf16 is emulated and a training step is
10-30x slower than in float32. ``amp: true`` forces autocast (with a warning on such CPUs),
``amp: false`` turns it off. The choice and its reason are logged and recorded in MLflow params.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["CpuInfo", "Precision", "cpu_info", "choose_precision", "AMP_CHOICES"]

logger = logging.getLogger(__name__)

#: what ``amp`` accepts in a bundle config
AMP_CHOICES = (True, False, "auto")
_CPUINFO = Path("/proc/cpuinfo")
_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class CpuInfo:
    """The CPU this process runs on.

    Attributes:
        model: the model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``).
        capability: torch's CPU kernel level (``torch.backends.cpu.get_cpu_capability()``: AVX2, AVX512 ...).
        native_bf16: the CPU computes bf16 in hardware (AVX-512-BF16 or AMX flags on Linux; where no
            flags can be read, oneDNN's bf16 support query).
        flags: the bf16-relevant flags found (empty when none or unknown).
    """

    model: str
    capability: str
    native_bf16: bool
    flags: tuple[str, ...]

    def describe(self) -> str:
        """One line: model, torch capability, native bf16 or not."""
        bf16 = f"native bf16 ({', '.join(self.flags)})" if self.native_bf16 else "no native bf16"
        return f"{self.model or 'unknown CPU'}, {self.capability}, {bf16}"


def _proc_cpuinfo() -> tuple[str, set[str]] | None:
    try:
        text = _CPUINFO.read_text(errors="replace")
    except OSError:
        return None
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


def cpu_info() -> CpuInfo:
    """The model, torch capability and native bf16 support of this CPU (see :class:`CpuInfo`)."""
    capability = str(torch.backends.cpu.get_cpu_capability())
    found = _proc_cpuinfo()
    if found is not None and found[1]:
        model, flags = found
        native = tuple(f for f in _NATIVE_BF16_FLAGS if f in flags)
        return CpuInfo(model or platform.processor(), capability, bool(native), native)
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return CpuInfo((found[0] if found else "") or platform.processor(), capability, native, ())


@dataclass(frozen=True)
class Precision:
    """The resolved choice: ``enabled`` (autocast on), ``dtype`` (``"float16"``/``"bfloat16"``,
    meaningful when enabled) and ``reason`` (one line for the log and MLflow)."""

    enabled: bool
    dtype: str
    reason: str

    def label(self) -> str:
        return self.dtype if self.enabled else "float32"


def _amp_setting(amp: Any) -> bool | str:
    if isinstance(amp, str) and amp.strip().lower() == "auto":
        return "auto"
    if isinstance(amp, bool):
        return amp
    raise ValueError(f"amp must be true, false or auto, got {amp!r}")


def choose_precision(amp: Any, amp_dtype: Any, device: torch.device | str, log: bool = True) -> Precision:
    """Resolve the ``amp`` / ``amp_dtype`` config keys for ``device``.

    Args:
        amp: ``True``, ``False`` or ``"auto"``.
        amp_dtype: ``"float16"``, ``"bfloat16"`` or ``"auto"`` (CUDA: float16; CPU: bfloat16, the only
            autocast type there).
        device: where the network runs.
        log: log the choice (INFO; a WARNING for forced bf16 on a CPU without native bf16).
    """
    setting = _amp_setting(amp)
    device = torch.device(device)
    dtype = str(amp_dtype or "auto").lower()
    if dtype not in ("auto", "float16", "bfloat16", "fp16", "bf16"):
        raise ValueError(f"amp_dtype must be float16, bfloat16 or auto, got {amp_dtype!r}")
    dtype = {"fp16": "float16", "bf16": "bfloat16"}.get(dtype, dtype)
    warn = False
    if device.type == "cuda":
        dtype = "float16" if dtype == "auto" else dtype
        enabled = setting is not False
        reason = (f"CUDA: {dtype} autocast" + (" with a gradient scaler" if dtype == "float16" else "")
                  if enabled else "amp false: float32")
    elif device.type == "cpu":
        info = cpu_info()
        dtype = "bfloat16"  # the only autocast type on CPU
        if setting == "auto":
            enabled = info.native_bf16
            reason = (f"CPU with native bf16: bfloat16 autocast ({info.describe()})" if enabled else
                      f"CPU without native bf16: float32, as bf16 would be emulated ({info.describe()})")
        elif setting:
            enabled, warn = True, not info.native_bf16
            reason = f"amp true: bfloat16 autocast ({info.describe()})"
            if warn:
                reason += "; this CPU has no native bf16: expect training 10-30x slower than float32 (amp: auto)"
        else:
            enabled, reason = False, f"amp false: float32 ({info.describe()})"
    else:
        enabled = setting is True
        dtype = "bfloat16" if dtype == "auto" else dtype
        reason = f"{device.type}: " + (f"{dtype} autocast (amp true)" if enabled else "float32")
    result = Precision(enabled, dtype, reason)
    if log:
        (logger.warning if warn else logger.info)("precision: %s", reason)
    return result
