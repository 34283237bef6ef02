"""Scaled dot-product attention shared by the cell encoder and the Q-Former.

On a CPU, torch's flash-attention kernel is 2-3x slower in bf16 than in fp32 for this model's
shapes, forward plus backward (measured on an AVX512-BF16 CPU: 65 ms against 25 ms for the matching
path's 48 cells x 12 heads x 72 tokens). Its forward alone is fine, so inference (no autograd)
runs the fused kernel in bf16 as it is: embedding 256-gene cells ran 1.8x faster than through the
paths below, which copy their inputs. So when training under bf16/fp16 on a CPU:

* short attention (``Lq * Lk <= 8192``: the Q-Former's text, query and matching paths) is two bf16
  matmuls around an fp32 softmax (15 ms for that shape);
* long attention (the cell encoder over hundreds or thousands of genes, whose score matrix must
  not be materialised) is the fp32 flash kernel (6 ms against 13 ms in bf16 at 257 genes).

Softmax statistics are fp32 either way. On CUDA the fused bf16/fp16 kernels are used as they are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["attention", "masked_mean"]

_LOW = (torch.bfloat16, torch.float16)
SHORT = 8192
"""Largest ``Lq * Lk`` computed with explicit matmuls on a CPU under low precision."""


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """``softmax(scale q k^T + mask) v`` for (B, H, L, d) tensors, ``scale`` defaulting to
    ``1 / sqrt(d)``; the output has ``q``'s dtype (or autocast's, on CUDA)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.dtype in _LOW or torch.is_autocast_enabled("cpu")):
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
        with torch.autocast("cpu", enabled=False):
            if q.shape[-2] * k.shape[-2] <= SHORT:
                q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
                scores = (q @ k.transpose(-1, -2)).float() * scale
                if attn_mask is not None and attn_mask.dtype == torch.bool:
                    scores = scores.masked_fill(~attn_mask, float("-inf"))
                elif attn_mask is not None:
                    scores = scores + attn_mask.float()
                probs = F.dropout(scores.softmax(-1), dropout_p, training=dropout_p > 0)
                return probs.to(dtype) @ v
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask,
                                                 dropout_p=dropout_p, scale=scale)
        return out.to(dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)


def masked_mean(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` (B, L, D) over the positions where ``keep`` (B, L) is true -> (B, D); a row
    with nothing kept gives 0."""
    w = keep.to(x.dtype)[..., None]
    return (x * w).sum(1) / w.sum(1).clamp(min=1)
