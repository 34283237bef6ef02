"""Memory guard: estimate what an allocation needs before making it, and fail with advice instead
of being killed by the operating system's out-of-memory killer.

The budget is the memory the machine (or its cgroup) has available now, read with ``psutil``, or
on CUDA the free device memory; the environment variable ``SCMMGPT_MEMORY_LIMIT`` (bytes, or
``"512M"``, ``"8G"``) overrides it, e.g. to share a machine.

The training estimate of a transformer stack follows Korthikanti et al. (2022), "Reducing
Activation Recomputation in Large Transformer Models", eq. 2: one layer keeps
``s * b * h * (34 + 5 * a * s / h)`` bytes of activations in 16-bit precision for sequence length
``s``, micro-batch ``b``, width ``h`` and ``a`` heads. Our attention runs through
``scaled_dot_product_attention``, whose fused kernels (flash / memory-efficient, CPU and CUDA) do
not store the ``a * s * s`` score matrices, so the ``5 * a * s / h`` term is dropped; fp32 doubles
the rest. Inference keeps about one layer's worth at a time. These are estimates that catch
allocations which cannot fit (the check fails only above the whole budget), not measurements.
"""

from __future__ import annotations

import os
import re

from ..errors import ResourceError

__all__ = ["available_bytes", "check_fits", "format_bytes", "transformer_activation_bytes", "check_batch_memory"]

ENV = "SCMMGPT_MEMORY_LIMIT"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _parse(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)i?B?\s*", text.upper())
    if m is None:
        raise ResourceError(f"{ENV}={text!r} is not a size; use bytes or e.g. 512M, 8G.")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def available_bytes(device=None) -> int:
    """Bytes available for a new allocation: ``$SCMMGPT_MEMORY_LIMIT`` if set, else free CUDA
    memory for a CUDA ``device``, else the host's available memory."""
    if os.environ.get(ENV):
        return _parse(os.environ[ENV])
    if device is not None and str(device).startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def check_fits(nbytes: float, what: str, advice: str, *, device=None, fraction: float = 0.8) -> None:
    """Raise :class:`ResourceError` when ``nbytes`` exceeds ``fraction`` of the available memory.

    ``what`` names the allocation ("the generated matrix (5000 cells x 60000 genes)"); ``advice``
    says how to make it smaller.
    """
    budget = available_bytes(device)
    if nbytes > fraction * budget:
        where = "GPU" if device is not None and str(device).startswith("cuda") else "memory"
        raise ResourceError(f"{what} needs about {format_bytes(nbytes)}, more than the {format_bytes(budget)} of "
                            f"{where} available. {advice}")


def transformer_activation_bytes(batch: int, seq: int, width: int, layers: int, *, training: bool,
                                 bytes_per_value: int = 4) -> float:
    """Activation memory of a transformer stack with fused attention (Korthikanti et al., 2022,
    eq. 2 without the score matrices; see the module doc)."""
    per_layer = seq * batch * width * 34 * (bytes_per_value / 2)
    return per_layer * (layers if training else 1)


def check_batch_memory(model, batch_size: int, *, training: bool, with_lm: bool = False, device=None,
                       advice: str | None = None) -> float:
    """Estimate one batch's activations through ``model``'s cell encoder and Q-Former (and its LM
    when ``with_lm``), and fail with ``advice`` if they cannot fit; returns the estimate in bytes."""
    cfg = model.config
    ce, qf = cfg.cell, model.net.qformer
    total = transformer_activation_bytes(batch_size, cfg.max_genes + 1, ce.d_model, ce.n_layers, training=training)
    total += transformer_activation_bytes(batch_size, qf.n_query + cfg.qformer.max_text_len, qf.d, len(qf.layers),
                                          training=training)
    lm = model.lm
    if with_lm and lm is not None:
        c = lm.config
        total += transformer_activation_bytes(batch_size, qf.n_query + cfg.lm.max_text_len, c.hidden_size,
                                              c.num_hidden_layers, training=training)
    check_fits(total, f"A batch of {batch_size} cells of up to {cfg.max_genes} genes "
                      f"({'training' if training else 'inference'})",
               advice or "Lower the batch size (--batch-size / batch_size=, or train.batch_size with "
                         "train.grad_accum to keep the effective batch) or model.max_genes.", device=device,
               fraction=1.0)
    return total
