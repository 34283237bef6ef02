"""Parity of the cell encoder with torch's TransformerEncoderLayer in scGPT's settings."""

import torch
from torch import nn

from scmmgpt.models.config import CellEncoderConfig
from scmmgpt.modules.cell_encoder import CellEncoder


class ReferenceScGPT(nn.Module):
    """scGPT's encoder written with torch building blocks (post-norm, ReLU, batch_first)."""

    def __init__(self, V, d, h, ff, n):
        super().__init__()
        self.emb = nn.Embedding(V, d, padding_idx=0)
        self.emb_norm = nn.LayerNorm(d)
        self.l1, self.l2, self.vnorm = nn.Linear(1, d), nn.Linear(d, d), nn.LayerNorm(d)
        layer = nn.TransformerEncoderLayer(d, h, ff, dropout=0.0, activation="relu", batch_first=True, norm_first=False)
        self.tf = nn.TransformerEncoder(layer, n, enable_nested_tensor=False)

    def forward(self, g, v, pad):
        x = self.emb_norm(self.emb(g)) + self.vnorm(self.l2(torch.relu(self.l1(v.unsqueeze(-1)))))
        return self.tf(x, src_key_padding_mask=pad)

    def scgpt_state_dict(self, flash: bool):
        s = {"encoder.embedding.weight": self.emb.weight, "encoder.enc_norm.weight": self.emb_norm.weight,
             "encoder.enc_norm.bias": self.emb_norm.bias,
             "value_encoder.linear1.weight": self.l1.weight, "value_encoder.linear1.bias": self.l1.bias,
             "value_encoder.linear2.weight": self.l2.weight, "value_encoder.linear2.bias": self.l2.bias,
             "value_encoder.norm.weight": self.vnorm.weight, "value_encoder.norm.bias": self.vnorm.bias}
        for i, layer in enumerate(self.tf.layers):
            p = f"transformer_encoder.layers.{i}."
            qkv = "self_attn.Wqkv." if flash else "self_attn.in_proj_"
            s[p + qkv + "weight"] = layer.self_attn.in_proj_weight
            s[p + qkv + "bias"] = layer.self_attn.in_proj_bias
            s[p + "self_attn.out_proj.weight"] = layer.self_attn.out_proj.weight
            s[p + "self_attn.out_proj.bias"] = layer.self_attn.out_proj.bias
            for name in ("linear1", "linear2", "norm1", "norm2"):
                s[p + f"{name}.weight"] = getattr(layer, name).weight
                s[p + f"{name}.bias"] = getattr(layer, name).bias
        # heads a real checkpoint carries and the loader must ignore
        s["decoder.fc.0.weight"] = torch.zeros(3, 3)
        s["mvc_decoder.gene2query.weight"] = torch.zeros(3, 3)
        s["cls_decoder._decoder.0.weight"] = torch.zeros(3, 3)
        return {k: v.detach().clone() for k, v in s.items()}


def _inputs(V=50, B=3, L=7):
    g = torch.randint(3, V, (B, L))
    v = torch.rand(B, L) * 3
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1, 5:] = True
    pad[2, 3:] = True
    g[pad] = 0
    return g, v, pad


def test_matches_torch_reference():
    torch.manual_seed(0)
    ref = ReferenceScGPT(50, 32, 4, 64, 2).eval()
    enc = CellEncoder(CellEncoderConfig(vocab_size=50, d_model=32, n_heads=4, d_ff=64, n_layers=2, dropout=0.0)).eval()
    state = ref.scgpt_state_dict(flash=False)
    enc.load_state_dict({k: v for k, v in state.items() if k in enc.state_dict()}, strict=True)
    g, v, pad = _inputs()
    with torch.no_grad():
        a, b = ref(g, v, pad), enc(g, v, pad)
    keep = ~pad
    torch.testing.assert_close(b[keep], a[keep], rtol=1e-4, atol=1e-5)


def test_padding_does_not_change_real_tokens():
    torch.manual_seed(0)
    enc = CellEncoder(CellEncoderConfig(vocab_size=50, d_model=32, n_heads=4, d_ff=64, n_layers=2, dropout=0.0)).eval()
    g, v, pad = _inputs()
    with torch.no_grad():
        full = enc(g[2:3, :3], v[2:3, :3], pad[2:3, :3])
        padded = enc(g[2:3], v[2:3], pad[2:3])
    torch.testing.assert_close(full[0], padded[0, :3], rtol=1e-5, atol=1e-5)


def test_bf16_runs():
    enc = CellEncoder(CellEncoderConfig(vocab_size=50, d_model=32, n_heads=4, d_ff=64, n_layers=2)).eval()
    g, v, pad = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(g, v, pad)
    assert torch.isfinite(out.float()).all()


def test_expression_token_is_the_value_weighted_gene_sum_added_to_cls():
    """The expression token adds LN(sum_i v_i e_{g_i}) over the real gene tokens to <cls>'s input:
    the same encoder without it differs only there, and pad positions (at any pad value) and the
    order of the genes do not change it."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, d_model=32, n_heads=4, d_ff=64, n_layers=1, dropout=0.0)
    plain = CellEncoder(CellEncoderConfig(**cfg)).eval()
    enc = CellEncoder(CellEncoderConfig(**cfg, expression_token=True)).eval()
    enc.load_state_dict({**plain.state_dict(), **{k: v for k, v in enc.state_dict().items() if k.startswith("expression.")}})
    for m in (plain, enc):                                             # the embeddings alone: no layers
        m.transformer_encoder.layers = nn.ModuleList()
    g, v, pad = _inputs()
    g[:, 0], v[:, 0] = 1, 0.0                                          # <cls>
    with torch.no_grad():
        a, b = plain(g, v, pad), enc(g, v, pad)
        # with no layers the output is the input: only <cls> moved, by the token itself
        torch.testing.assert_close(b[:, 1:], a[:, 1:])
        w = v[:, 1:].masked_fill(pad[:, 1:], 0.0)
        want = enc.expression.norm((w[..., None] * enc.expression.embedding(g[:, 1:])).sum(1))
        torch.testing.assert_close(b[:, 0] - a[:, 0], want, rtol=1e-5, atol=1e-5)
        v2 = v.masked_fill(pad, -2.0)                                   # scGPT's pad value
        torch.testing.assert_close(enc(g, v2, pad)[:, 0], enc(g, v, pad)[:, 0] - plain(g, v, pad)[:, 0]
                                   + plain(g, v2, pad)[:, 0])
        perm = torch.tensor([0, 3, 1, 2])                               # cell 2 has 3 real genes + <cls>
        torch.testing.assert_close(enc(g[2:3, perm], v[2:3, perm], pad[2:3, perm])[0, 0], b[2, 0],
                                   rtol=1e-5, atol=1e-5)
    # with layers, it changes what the cell encoder returns (the read-out is not dead)
    deep = CellEncoder(CellEncoderConfig(**cfg, expression_token=True)).eval()
    with torch.no_grad():
        x = deep(g, v, pad)
        deep.expression.embedding.weight.mul_(-1.0)
        assert not torch.allclose(deep(g, v, pad)[:, 0], x[:, 0])
