"""scGPT-architecture cell encoder (Cui et al. 2024; scMMGPT paper §3.2).

gene embedding + LayerNorm, plus a value encoder, summed; a post-norm ReLU transformer encoder
without positional encoding (a cell is a set of genes); the output at ``<cls>`` is the cell
embedding. Attention runs through :func:`torch.nn.functional.scaled_dot_product_attention` with the
padding mask, so flash / memory-efficient kernels are used on GPU and bf16 works.

Parameter names follow scGPT's checkpoints (``encoder.embedding``, ``encoder.enc_norm``,
``value_encoder.linear1/linear2/norm``, ``transformer_encoder.layers.N.self_attn.in_proj_*`` /
``out_proj``, ``linear1/2``, ``norm1/2``), so :func:`scmmgpt.models.scgpt.load_scgpt` maps real
weights one to one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .attention import attention

__all__ = ["CellEncoderConfig", "GeneEncoder", "ContinuousValueEncoder", "CategoryValueEncoder", "SelfAttention", "EncoderLayer",
           "CellEncoder"]


@dataclass
class CellEncoderConfig:
    """scGPT-architecture cell encoder (Cui et al. 2024)."""

    vocab_size: int = 0
    """Number of gene tokens (set from the gene vocabulary)."""
    d_model: int = 256
    """Width of gene/value embeddings and of the transformer."""
    n_layers: int = 4
    """Transformer encoder layers."""
    n_heads: int = 4
    """Attention heads."""
    d_ff: int = 512
    """Feed-forward width."""
    dropout: float = 0.1
    """Dropout in embeddings and layers."""
    attn_dropout: float | None = None
    """Dropout on the attention weights; ``None``: ``dropout`` (``nn.TransformerEncoderLayer``'s and
    scGPT's semantics). Any non-zero value needs the attention weights materialised (no fused kernel
    applies dropout on a CPU): at 2048 genes that was about two thirds of a CPU stage-1 step
    (``benchmarks/perf.py``'s profile), so the ``tiny`` and ``small`` presets set 0."""
    pad_id: int = 0
    """Index of ``<pad>`` in the vocabulary."""
    input_style: Literal["continuous", "category"] = "continuous"
    """``continuous``: value encoder ``LN(W2 ReLU(W1 x))``; ``category``: embedding of value bins."""
    n_bins: int | None = None
    """Per-cell quantile bins (scGPT: 51); required for ``category``, optional for ``continuous``."""
    n_value_embeddings: int | None = None
    """Rows of the ``category`` value embedding; ``None``: ``n_bins + 1`` (the bins and one padding
    bin). scGPT's models have ``n_bins + 2`` (the bins, its pad value ``n_bins`` and its mask value
    ``n_bins + 1``): :func:`~scmmgpt.models.scgpt.load_scgpt` reads the number from the checkpoint."""
    pad_value: float = 0.0
    """Value at padded positions (scGPT checkpoints use -2)."""
    max_value: float = 512.0
    """Values are clamped to this before the value encoder (as scGPT)."""
    token_dropout: float = 0.0
    """In training only, each gene token (not ``<cls>``) is left out of a cell's input with this
    probability, as if the gene had not been measured: a fresh draw each step, from torch's RNG
    like dropout. It counters an encoder that learns its few training cells by heart
    (``benchmarks/results/recipe/README.md``). Changes no weights."""
    expression_token: bool = False
    """Add to the ``<cls>`` token's input a linear read-out of the whole cell:
    ``LN(sum_i v_i e_{g_i})`` over its gene tokens, with gene vectors ``e`` of their own. The
    ``<cls>`` state then starts from what a linear classifier of the tokens sees, which a narrow
    encoder trained briefly does not learn to represent (``benchmarks/results/recipe/README.md``,
    "Where the accuracy is lost"). Not part of scGPT: off for scGPT checkpoints and old models."""

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}.")
        if self.input_style == "category" and not self.n_bins:
            raise ConfigError("input_style='category' needs n_bins (scGPT uses 51).")
        if not 0 <= self.token_dropout < 1:
            raise ConfigError(f"token_dropout must be in [0, 1), got {self.token_dropout}.")
        if not 0 <= self.dropout < 1 or (self.attn_dropout is not None and not 0 <= self.attn_dropout < 1):
            raise ConfigError("dropout and attn_dropout must be in [0, 1).")
        if min(self.d_model, self.n_layers, self.n_heads, self.d_ff) < 1:
            raise ConfigError("d_model, n_layers, n_heads and d_ff must be positive.")



class GeneEncoder(nn.Module):
    """Gene token embedding followed by LayerNorm."""

    def __init__(self, vocab_size: int, d_model: int, pad_id: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, gene_ids: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(gene_ids))


class ContinuousValueEncoder(nn.Module):
    """``LN(W2 ReLU(W1 x))`` on each scalar value (scGPT's continuous value encoder)."""

    def __init__(self, d_model: int, dropout: float, max_value: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(1, d_model)
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.max_value = max_value

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        x = values.clamp(max=self.max_value).unsqueeze(-1).to(self.linear1.weight.dtype)
        return self.dropout(self.norm(self.linear2(F.relu(self.linear1(x)))))


class CategoryValueEncoder(nn.Module):
    """Embedding of binned values (scGPT ``input_emb_style="category"``)."""

    def __init__(self, n_embeddings: int, d_model: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_embeddings, d_model)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        idx = values.long().clamp(min=0, max=self.embedding.num_embeddings - 1)
        return self.enc_norm(self.embedding(idx))


class SelfAttention(nn.Module):
    """Multi-head self-attention with a packed ``in_proj`` (torch's layout) and SDPA."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = dropout
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, L, D = x.shape
        # (B, L, 3D) -> 3 x (B, H, L, D/H)
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(B, L, 3, self.n_heads, D // self.n_heads) \
            .permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, attn_mask, self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer with ReLU (``nn.TransformerEncoderLayer`` semantics)."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, attn_dropout: float | None = None
                 ) -> None:
        super().__init__()
        self.self_attn = SelfAttention(d_model, n_heads, dropout if attn_dropout is None else attn_dropout)
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.norm1(x + self.dropout(self.self_attn(x, attn_mask)))
        return self.norm2(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class ExpressionToken(nn.Module):
    """``LN(sum_i v_i e_{g_i})`` over a cell's non-padded gene tokens after ``<cls>``: ``(B, d)``."""

    def __init__(self, vocab_size: int, d_model: int, pad_id: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, gene_ids: torch.Tensor, values: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        # position 0 is <cls>; padded positions carry the pad value, which may be non-zero (scGPT: -2)
        w = values[:, 1:].masked_fill(padding_mask[:, 1:], 0.0).to(self.embedding.weight.dtype)
        return self.norm(torch.einsum("bl,bld->bd", w, self.embedding(gene_ids[:, 1:])))


class _Layers(nn.Module):
    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)


class CellEncoder(nn.Module):
    """The cell PLM: ``(gene_ids, values, padding_mask) -> (B, L, d_model)`` gene states.

    Examples
    --------
    >>> cfg = CellEncoderConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=2, d_ff=64)
    >>> enc = CellEncoder(cfg)
    >>> h = enc(torch.randint(3, 100, (2, 5)), torch.rand(2, 5), torch.zeros(2, 5, dtype=torch.bool))
    >>> tuple(h.shape)
    (2, 5, 32)
    """

    def __init__(self, config: CellEncoderConfig) -> None:
        super().__init__()
        if config.vocab_size < 1:
            raise ValueError("CellEncoderConfig.vocab_size must be set from the gene vocabulary.")
        self.config = config
        self.encoder = GeneEncoder(config.vocab_size, config.d_model, config.pad_id)
        self.value_encoder: CategoryValueEncoder | ContinuousValueEncoder
        if config.input_style == "category":
            assert config.n_bins is not None  # CellEncoderConfig.__post_init__ requires it
            self.value_encoder = CategoryValueEncoder(config.n_value_embeddings or config.n_bins + 1, config.d_model)
        else:
            self.value_encoder = ContinuousValueEncoder(config.d_model, config.dropout, config.max_value)
        self.expression: ExpressionToken | None = (
            ExpressionToken(config.vocab_size, config.d_model, config.pad_id) if config.expression_token else None)
        self.transformer_encoder = _Layers(
            [EncoderLayer(config.d_model, config.n_heads, config.d_ff, config.dropout, config.attn_dropout)
             for _ in range(config.n_layers)]
        )
        self.gradient_checkpointing = False

    @property
    def d_model(self) -> int:
        return self.config.d_model

    def gene_embeddings(self, gene_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised gene embeddings, all ``(V, d)`` or of ``gene_ids``."""
        if gene_ids is None:
            return self.encoder.enc_norm(self.encoder.embedding.weight)
        return self.encoder(gene_ids)

    def forward(self, gene_ids: torch.Tensor, values: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        # step 1: gene + value embeddings -> (B, L, d)
        x = self.encoder(gene_ids) + self.value_encoder(values)
        if self.expression is not None:
            x = torch.cat([x[:, :1] + self.expression(gene_ids, values, padding_mask)[:, None], x[:, 1:]], dim=1)
        # step 2: boolean "may attend" mask over keys -> (B, 1, 1, L); padded keys are never attended
        attn_mask = (~padding_mask)[:, None, None, :]
        # step 3: transformer layers (post-norm), no positional encoding
        for layer in self.transformer_encoder.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, attn_mask, use_reentrant=False)
            else:
                x = layer(x, attn_mask)
        return x

    def cell_embedding(self, gene_ids: torch.Tensor, values: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """The ``<cls>`` output, ``(B, d)``."""
        return self.forward(gene_ids, values, padding_mask)[:, 0]
