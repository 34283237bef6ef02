"""Text-to-cell projector and cell decoder (paper §3.2-3.3, PCGen).

The LM reads a description followed by ``n_dummy`` learned dummy-cell embeddings; its last hidden
states at those positions (B, n_dummy, d_lm) are projected to the cell encoder width and read by
learned cell queries through cross-attention (Table 6: 1 layer, 4 heads) -> cell features
(B, n_cell_queries, d_cell). The cell decoder gives every vocabulary gene ``g`` a value: the gene's
own embedding ``e_g`` (from the cell encoder) attends over the cell features and the read-out is
scored against a gene-specific vector::

    x'_g = < softmax(q(e_g) K(z)^T / sqrt(r)) V(z), u(e_g) > + b_g

so each gene is conditioned on its gene embedding and the whole vocabulary is decoded (in chunks of
``gene_chunk`` genes to bound memory).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["TextToCellProjector", "CellDecoder"]


class _CrossBlock(nn.Module):
    def __init__(self, d: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, n_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.norm2 = nn.LayerNorm(d)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        q = self.norm1(q + self.attn(q, kv, kv, need_weights=False)[0])
        return self.norm2(q + self.ff(q))


class TextToCellProjector(nn.Module):
    """Dummy-cell embeddings for the LM input, and the map from their LM states to cell features."""

    def __init__(self, d_lm: int, d_cell: int, *, n_dummy: int, n_cell_queries: int, n_layers: int, n_heads: int,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.dummy_embeds = nn.Parameter(torch.randn(n_dummy, d_lm) * 0.02)
        self.in_proj = nn.Sequential(nn.LayerNorm(d_lm), nn.Linear(d_lm, d_cell))
        self.cell_queries = nn.Parameter(torch.randn(n_cell_queries, d_cell) * 0.02)
        self.blocks = nn.ModuleList([_CrossBlock(d_cell, n_heads, dropout) for _ in range(n_layers)])

    @property
    def n_dummy(self) -> int:
        return self.dummy_embeds.shape[0]

    def forward(self, dummy_states: torch.Tensor) -> torch.Tensor:
        """``(B, n_dummy, d_lm) -> (B, n_cell_queries, d_cell)``."""
        kv = self.in_proj(dummy_states.to(self.cell_queries.dtype))
        q = self.cell_queries.expand(kv.shape[0], -1, -1)
        for block in self.blocks:
            q = block(q, kv)
        return q


class CellDecoder(nn.Module):
    """Per-gene attention read-out of cell features -> a value for every vocabulary gene."""

    def __init__(self, d_cell: int, vocab_size: int, *, dim: int = 64, gene_chunk: int = 8192) -> None:
        super().__init__()
        self.gene_q = nn.Linear(d_cell, dim)
        self.gene_u = nn.Linear(d_cell, dim)
        self.key = nn.Linear(d_cell, dim)
        self.value = nn.Linear(d_cell, dim)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self.dim = dim
        self.gene_chunk = gene_chunk

    def forward(self, cell_feats: torch.Tensor, gene_emb: torch.Tensor, gene_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``cell_feats`` (B, N, d_cell), ``gene_emb`` (G, d_cell) -> values (B, G).

        ``gene_ids`` (G,) selects the bias entries when decoding a subset of the vocabulary.
        """
        k = self.key(cell_feats)                      # (B, N, r)
        v = self.value(cell_feats)                    # (B, N, r)
        bias = self.bias if gene_ids is None else self.bias[gene_ids]
        out = []
        for start in range(0, gene_emb.shape[0], self.gene_chunk):
            e = gene_emb[start:start + self.gene_chunk].to(k.dtype)
            q = self.gene_q(e)                        # (G, r)
            att = torch.softmax(torch.einsum("gr,bnr->bgn", q, k) / math.sqrt(self.dim), dim=-1)  # (B, G, N)
            ctx = torch.einsum("bgn,bnr->bgr", att, v)                                            # (B, G, r)
            out.append(torch.einsum("bgr,gr->bg", ctx, self.gene_u(e)) + bias[start:start + self.gene_chunk])
        return torch.cat(out, dim=1)
