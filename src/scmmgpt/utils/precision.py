"""Numerical precision of training and inference: ``auto | fp32 | bf16 | fp16``.

``auto`` picks bf16 where the hardware multiplies bf16 natively: a CUDA device that supports it,
or a CPU whose instruction set has AMX-BF16 or AVX512-BF16 (as torch's own CPU feature report,
``torch._C._cpu._get_cpu_capability()``, gives them; oneDNN would emulate bf16 on any AVX512
CPU, which is slower than fp32). Anything else gets fp32.

bf16/fp16 are mixed precision: weights that train stay fp32 (the optimiser state with them), the
matmuls run in the low precision under :func:`torch.autocast`, and the modules keep in fp32 what
needs it (contrastive similarities, losses, softmax statistics of the CPU attention).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from ..errors import ConfigError

__all__ = ["PRECISIONS", "Precision", "native_bf16", "resolve_precision"]

log = logging.getLogger("scmmgpt")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _cpu_features() -> dict:
    get = getattr(getattr(torch._C, "_cpu", None), "_get_cpu_capability", None)
    try:
        return dict(get()) if get is not None else {}
    except Exception:   # an old or exotic build: no report, so no claim of bf16
        return {}


def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` multiplies bf16 natively (CUDA bf16, CPU AMX-BF16 or AVX512-BF16)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        feats = _cpu_features()
        return bool(feats.get("amx_bf16") or feats.get("avx512_bf16"))
    return False


@dataclass(frozen=True)
class Precision:
    """A resolved precision: what was asked for, what runs, and why."""

    name: str
    """What runs: ``fp32``, ``bf16`` or ``fp16``."""
    requested: str
    """What was asked for (``auto`` or one of the above)."""
    device_type: str
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.name]

    @property
    def mixed(self) -> bool:
        return self.name != "fp32"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast region of this precision (a no-op for fp32)."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def accelerate_name(self) -> str:
        """The name ``accelerate.Accelerator(mixed_precision=...)`` takes."""
        return "no" if self.name == "fp32" else self.name


def resolve_precision(requested: str | Precision, device: str | torch.device, *, quiet: bool = False) -> Precision:
    """Resolve ``auto`` (or check an explicit choice) for ``device``; the choice is logged."""
    if isinstance(requested, Precision):
        return requested
    device = torch.device(device)
    if requested not in PRECISIONS:
        raise ConfigError(f"Unknown precision {requested!r}; choose from {PRECISIONS}.")
    native = native_bf16(device)
    if requested == "auto":
        name = "bf16" if native else "fp32"
        reason = ("auto: native bf16 matmul on this " + device.type if native
                  else f"auto: no native bf16 matmul on this {device.type}")
    else:
        name, reason = requested, "requested"
        if name == "fp16" and device.type != "cuda":
            raise ConfigError("precision='fp16' needs a CUDA device; on a CPU use 'bf16' or 'auto'.")
        if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("This GPU has no bf16; use precision='fp16' or 'fp32'.")
        if name == "bf16" and not native:
            reason = f"requested (this {device.type} has no native bf16 matmul: emulated, likely slower than fp32)"
    p = Precision(name, requested, device.type, reason)
    if not quiet:
        log.info("precision %s on %s (%s)", p.name, device, p.reason)
    return p
