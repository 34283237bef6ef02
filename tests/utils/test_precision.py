"""Precision resolution (auto | fp32 | bf16 | fp16) and the CPU attention path under bf16."""

import pytest
import torch
import torch.nn.functional as F

from scmmgpt.errors import ConfigError
from scmmgpt.modules.attention import SHORT, attention
from scmmgpt.utils.precision import native_bf16, resolve_precision


def test_auto_follows_the_hardware_report():
    feats = torch._C._cpu._get_cpu_capability()
    assert native_bf16("cpu") == bool(feats.get("amx_bf16") or feats.get("avx512_bf16"))
    p = resolve_precision("auto", "cpu")
    assert p.name == ("bf16" if native_bf16("cpu") else "fp32")
    assert p.requested == "auto" and "auto" in p.reason
    assert resolve_precision("fp32", "cpu").name == "fp32"
    assert resolve_precision("bf16", "cpu").dtype is torch.bfloat16


def test_bad_precisions_are_refused():
    with pytest.raises(ConfigError, match="fp16.*CUDA"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ConfigError, match="Unknown precision 'half'"):
        resolve_precision("half", "cpu")


def test_the_choice_is_logged(caplog):
    with caplog.at_level("INFO", logger="scmmgpt"):
        resolve_precision("auto", "cpu")
    assert any("precision" in r.message for r in caplog.records)


@pytest.mark.parametrize("lq,lk", [(72, 72), (8, 257), (257, 257)])
def test_cpu_attention_under_bf16_matches_fp32(lq, lk):
    """Both CPU paths (explicit matmuls for short attention, fp32 flash for long) agree with fp32
    SDPA to bf16 rounding, with a key mask, in the forward and the backward pass."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, lq, 16, generator=g, requires_grad=True)
    k = torch.randn(3, 4, lk, 16, generator=g, requires_grad=True)
    v = torch.randn(3, 4, lk, 16, generator=g, requires_grad=True)
    mask = torch.rand(3, 1, 1, lk, generator=g) > 0.2
    mask[..., 0] = True
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    (gq_ref,) = torch.autograd.grad(ref.square().sum(), q)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, mask)
    assert out.dtype is torch.bfloat16
    (gq,) = torch.autograd.grad(out.float().square().sum(), q)
    assert (out.float() - ref).abs().max() < 0.05
    assert F.cosine_similarity(gq.flatten(), gq_ref.flatten(), dim=0) > 0.999
    assert (lq * lk <= SHORT) == (lq < 100)   # the two shapes exercise both paths
    # inference (no autograd) uses the fused kernel in bf16 directly
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast = attention(q, k, v, mask)
    assert fast.dtype is torch.bfloat16 and (fast.float() - ref).abs().max() < 0.05


def test_attention_outside_autocast_is_sdpa():
    q = torch.randn(2, 2, 5, 8)
    assert torch.equal(attention(q, q, q), F.scaled_dot_product_attention(q, q, q))
