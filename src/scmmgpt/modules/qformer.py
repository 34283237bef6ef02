"""Cell-to-text projector: a Q-Former (BLIP-2, Li et al. 2023) initialised from a BERT.

Learned query tokens attend to each other (and, in the matching path, to the text) through the
BERT self-attention, and to the cell encoder's gene states through new cross-attention layers
inserted every ``cross_attention_freq`` layers. Three paths share the weights (BLIP-2):

* query-only -> cell features ``(B, n_query, d)`` (CTC and the LM's cell tokens);
* text-only  -> text features (the BERT encoder itself; CTC);
* query+text -> matching logits (CTM): queries and text attend to each other, queries to the cell.

Query positions use their own feed-forward copy (initialised from the text one), as BLIP-2 does.
All layers are this module's own; :meth:`QFormer.load_bert` copies a Hugging Face BERT's weights in
(a parity test checks the text path equals ``BertModel``).
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention

__all__ = ["QFormer", "QFormerLayer", "Attention"]


class Attention(nn.Module):
    """BERT-style attention (separate q/k/v, post-LN residual) with SDPA; keys may be another width."""

    def __init__(self, d: int, n_heads: int, dropout: float, eps: float, kv_dim: int | None = None) -> None:
        super().__init__()
        kv_dim = kv_dim or d
        self.n_heads = n_heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(kv_dim, d)
        self.value = nn.Linear(kv_dim, d)
        self.dense = nn.Linear(d, d)
        self.LayerNorm = nn.LayerNorm(d, eps=eps)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, kv: torch.Tensor, key_mask: torch.Tensor | None,
                kv_rows: torch.Tensor | None = None) -> torch.Tensor:
        """``kv_rows`` (B,): row ``i`` of ``x`` attends to ``kv[kv_rows[i]]`` (the matching path pairs
        each cell with several texts). Keys and values are then projected once per row of ``kv``, and
        never copied per row of ``x``: the rows of ``x`` that share a ``kv`` row are stacked into one
        longer query sequence against it (attention treats each query position on its own)."""
        q = self.query(x)
        if kv_rows is None:
            return self._output(x, self._cross(q, kv, key_mask))
        P, Lq, D = x.shape
        n_kv = kv.shape[0]
        counts = torch.bincount(kv_rows, minlength=n_kv)
        m = int(counts.max())
        # slot of each row among the rows of its kv row: its rank in a stable sort by kv row
        order = torch.argsort(kv_rows, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.empty_like(kv_rows)
        slot[order] = torch.arange(P, device=x.device) - starts[kv_rows[order]]
        flat = kv_rows * m + slot
        stacked = q.new_zeros(n_kv * m, Lq, D).index_copy(0, flat, q).reshape(n_kv, m * Lq, D)
        out = self._cross(stacked, kv, key_mask).reshape(n_kv * m, Lq, D).index_select(0, flat)
        return self._output(x, out)

    def folds(self, kv: torch.Tensor) -> bool:
        """Whether attention over ``kv`` runs folded (:meth:`_folded`): keys as narrow as a head or
        narrower, and no dropout on the attention weights."""
        return kv.shape[-1] <= self.query.out_features // self.n_heads and not (self.training and self.dropout > 0)

    def _cross(self, q: torch.Tensor, kv: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of projected queries (B, Lq, d) over the unprojected states ``kv`` -> (B, Lq, d)."""
        if self.folds(kv):
            return self._folded(q, kv, key_mask)
        return self._scores(q, self.key(kv), self.value(kv), key_mask)

    def _folded(self, q: torch.Tensor, kv: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """:meth:`_scores` of ``q`` over ``key(kv)`` and ``value(kv)``, computed on ``kv`` itself.

        With head ``h``'s key and value maps ``W_k^h``, ``W_v^h`` (``d_h x c``) and biases, its score
        of state ``s`` is ``q_h . (W_k^h s + b_k^h) = (W_k^h^T q_h) . s + q_h . b_k^h``; the last term
        is the same for every state and leaves the softmax unchanged. Its output is
        ``sum_s p_s (W_v^h s + b_v^h) = W_v^h (sum_s p_s s) + b_v^h``, since the weights sum to 1 (no
        dropout on them). So every head attends over the same ``c``-wide states: the heads' folded
        queries form one query sequence of one head (multi-query attention), and no ``(B, L, d)``
        keys and values, nor their gradients, exist. It costs no more than the projected form when
        ``c <= d_h`` (the ``tiny`` cell encoder: 32 against the Q-Former's 32 per head).
        """
        B, Lq, D = q.shape
        H, c = self.n_heads, kv.shape[-1]
        w_k = self.key.weight.reshape(H, D // H, c)
        w_v = self.value.weight.reshape(H, D // H, c)
        folded = torch.einsum("blhe,hec->bhlc", q.reshape(B, Lq, H, D // H), w_k).reshape(B, 1, H * Lq, c)
        states = kv[:, None]
        mask = None if key_mask is None else key_mask[:, None, None, :]
        mixed = attention(folded, states, states, mask, scale=1.0 / math.sqrt(D // H)).reshape(B, H, Lq, c)
        out = torch.einsum("bhlc,hec->blhe", mixed, w_v).reshape(B, Lq, D) + self.value.bias
        # the key bias's gradient is exactly zero in either form; it stays in the graph with that zero,
        # so DDP (which expects a gradient for every trainable parameter) needs no unused-parameter search
        return out + 0.0 * self.key.bias.sum()

    def attend_with(self, x: torch.Tensor, ext: torch.Tensor, ext_mask: torch.Tensor,
                    ext_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention of ``x`` (B, Lq, d) over itself and ``ext[ext_rows[i]]`` (the text of its pair),
        returning ``x``'s rows only. The keys and values of ``ext`` are projected once per row of
        ``ext``; ``ext_mask`` marks its real positions."""
        k_ext, v_ext = self.key(ext), self.value(ext)
        if ext_rows is not None:
            k_ext, v_ext, ext_mask = (t.index_select(0, ext_rows) for t in (k_ext, v_ext, ext_mask))
        own = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return self._attend(x, torch.cat([self.key(x), k_ext], 1), torch.cat([self.value(x), v_ext], 1),
                            torch.cat([own, ext_mask.bool()], 1))

    def _attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        return self._output(x, self._scores(self.query(x), k, v, key_mask))

    def _output(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """BERT's attention output: ``LN(x + dropout(dense(attended)))``."""
        return self.LayerNorm(x + F.dropout(self.dense(attended), self.dropout, self.training))

    def _scores(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """Multi-head attention of projected queries (B, Lq, d) over projected keys/values -> (B, Lq, d)."""
        B, Lq, D = q.shape
        H = self.n_heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(B, -1, H, D // H).transpose(1, 2)

        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = attention(split(q), split(k), split(v), mask, self.dropout if self.training else 0.0)
        return out.transpose(1, 2).reshape(B, Lq, D)


class FeedForward(nn.Module):
    """BERT feed-forward: ``LN(x + W2 GELU(W1 x))``."""

    def __init__(self, d: int, d_ff: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.intermediate = nn.Linear(d, d_ff)
        self.output = nn.Linear(d_ff, d)
        self.LayerNorm = nn.LayerNorm(d, eps=eps)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(x + F.dropout(self.output(F.gelu(self.intermediate(x))), self.dropout, self.training))


class QFormerLayer(nn.Module):
    """One Q-Former layer: self-attention, optional cross-attention (queries only), FFN."""

    def __init__(self, d: int, n_heads: int, d_ff: int, dropout: float, eps: float, cross_dim: int | None) -> None:
        super().__init__()
        self.attention = Attention(d, n_heads, dropout, eps)
        self.crossattention = Attention(d, n_heads, dropout, eps, kv_dim=cross_dim) if cross_dim else None
        self.ffn = FeedForward(d, d_ff, dropout, eps)
        self.ffn_query = FeedForward(d, d_ff, dropout, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, n_query: int, cell: torch.Tensor | None,
                cell_mask: torch.Tensor | None, cell_rows: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attention(x, x, mask)
        q, t = x[:, :n_query], x[:, n_query:]
        if n_query:
            if self.crossattention is not None and cell is not None:
                q = self.crossattention(q, cell, cell_mask, cell_rows)
            q = self.ffn_query(q)
        if t.shape[1]:
            t = self.ffn(t)
        return torch.cat([q, t], dim=1)


class QFormer(nn.Module):
    """BLIP-2 Q-Former over cell encoder states.

    Parameters
    ----------
    bert_config
        A Hugging Face ``BertConfig`` (sizes, vocabulary, eps).
    cell_dim
        Width of the cell encoder states the queries cross-attend to.
    n_query, cross_attention_freq, n_layers, dropout
        See :class:`~scmmgpt.models.config.QFormerConfig`.
    """

    def __init__(self, bert_config: Any, cell_dim: int, *, n_query: int = 32, cross_attention_freq: int = 2,
                 n_layers: int | None = None, dropout: float | None = None) -> None:
        super().__init__()
        c = bert_config
        d, eps = c.hidden_size, c.layer_norm_eps
        p = c.hidden_dropout_prob if dropout is None else dropout
        p_att = c.attention_probs_dropout_prob if dropout is None else dropout
        self.d = d
        self.n_query = n_query
        n_layers = n_layers or c.num_hidden_layers
        self.word_embeddings = nn.Embedding(c.vocab_size, d, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, d)
        self.token_type_embeddings = nn.Embedding(max(c.type_vocab_size, 1), d)
        self.embed_norm = nn.LayerNorm(d, eps=eps)
        self.embed_dropout = nn.Dropout(p)
        self.query_tokens = nn.Parameter(torch.randn(1, n_query, d) * c.initializer_range)
        self.layers = nn.ModuleList([
            QFormerLayer(d, c.num_attention_heads, c.intermediate_size, p_att, eps,
                         cell_dim if i % cross_attention_freq == 0 else None)
            for i in range(n_layers)
        ])

    @torch.no_grad()
    def load_bert(self, bert_state: dict[str, torch.Tensor]) -> None:
        """Copy a Hugging Face BERT state dict into the shared weights; query FFNs get copies of the
        text FFNs. Cross-attention layers and query tokens stay newly initialised."""
        s = {k.removeprefix("bert."): v for k, v in bert_state.items()}
        self.word_embeddings.weight.copy_(s["embeddings.word_embeddings.weight"])
        self.position_embeddings.weight.copy_(s["embeddings.position_embeddings.weight"])
        self.token_type_embeddings.weight.copy_(s["embeddings.token_type_embeddings.weight"])
        self.embed_norm.weight.copy_(s["embeddings.LayerNorm.weight"])
        self.embed_norm.bias.copy_(s["embeddings.LayerNorm.bias"])
        for i, layer in enumerate(self.qformer_layers()):
            pre = f"encoder.layer.{i}."
            att = layer.attention
            for name in ("query", "key", "value"):
                getattr(att, name).weight.copy_(s[pre + f"attention.self.{name}.weight"])
                getattr(att, name).bias.copy_(s[pre + f"attention.self.{name}.bias"])
            att.dense.weight.copy_(s[pre + "attention.output.dense.weight"])
            att.dense.bias.copy_(s[pre + "attention.output.dense.bias"])
            att.LayerNorm.weight.copy_(s[pre + "attention.output.LayerNorm.weight"])
            att.LayerNorm.bias.copy_(s[pre + "attention.output.LayerNorm.bias"])
            for ffn in (layer.ffn, layer.ffn_query):
                ffn.intermediate.weight.copy_(s[pre + "intermediate.dense.weight"])
                ffn.intermediate.bias.copy_(s[pre + "intermediate.dense.bias"])
                ffn.output.weight.copy_(s[pre + "output.dense.weight"])
                ffn.output.bias.copy_(s[pre + "output.dense.bias"])
                ffn.LayerNorm.weight.copy_(s[pre + "output.LayerNorm.weight"])
                ffn.LayerNorm.bias.copy_(s[pre + "output.LayerNorm.bias"])

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        L = input_ids.shape[1]
        pos = torch.arange(L, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None] + self.token_type_embeddings.weight[0]
        return self.embed_dropout(self.embed_norm(x))

    def embed_queries(self, batch_size: int) -> torch.Tensor:
        """The learned queries after the embedding LayerNorm/dropout (BLIP-2): (B, n_query, d)."""
        return self.embed_dropout(self.embed_norm(self.query_tokens.expand(batch_size, -1, -1)))

    def qformer_layers(self) -> list[QFormerLayer]:
        return [cast(QFormerLayer, layer) for layer in self.layers]

    def _run(self, x: torch.Tensor, mask: torch.Tensor | None, n_query: int, cell: torch.Tensor | None,
             cell_mask: torch.Tensor | None, cell_rows: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask, n_query, cell, cell_mask, cell_rows)
        return x

    def forward_query(self, cell_states: torch.Tensor, cell_padding: torch.Tensor) -> torch.Tensor:
        """Queries attend to the cell: ``(B, L, d_cell) -> (B, n_query, d)``."""
        B = cell_states.shape[0]
        q = self.embed_queries(B)
        return self._run(q, None, self.n_query, cell_states, ~cell_padding)

    def forward_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     embedded: torch.Tensor | None = None) -> torch.Tensor:
        """Text-only BERT path: ``(B, T) -> (B, T, d)``. ``embedded``: :meth:`embed_text` of
        ``input_ids``, when the caller has it (stage 1 shares it with the matching path)."""
        return self._run(self.embed_text(input_ids) if embedded is None else embedded, attention_mask.bool(), 0, None, None)

    def forward_match(self, cell_states: torch.Tensor, cell_padding: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor, cell_rows: torch.Tensor | None = None,
                      text_rows: torch.Tensor | None = None, embedded: torch.Tensor | None = None) -> torch.Tensor:
        """Query+text path for matching: the query outputs ``(P, n_query, d)`` of P (cell, text) pairs.
        Pair ``p`` joins cell ``cell_rows[p]`` of the given states with text ``text_rows[p]`` of
        ``input_ids`` (each defaults to ``p``); ``embedded`` as in :meth:`forward_text`.

        The result is that of :meth:`forward_match_per_pair`, BLIP-2's computation (every pair's
        queries and text through every layer), with less work. Every pair's queries enter as the same
        learned tokens, and the cell reaches them only through the first layer's cross-attention,
        which follows that layer's self-attention. So that self-attention, and the first layer's text
        feed-forward, depend on the text alone: they run once per text, not once per pair (a batch of
        16 PBMCs has 5-9 distinct descriptions for its 48 pairs). Only the query outputs are read, so
        the last layer computes its query rows alone; its text rows give keys and values, projected
        once per text when nothing cell-dependent reached them (a 2-layer Q-Former). In training the
        pairs of one text share that text's dropout masks in the first layer.
        """
        layers = self.qformer_layers()
        first = layers[0]
        if first.crossattention is None or len(layers) == 1:
            return self.forward_match_per_pair(cell_states, cell_padding, input_ids, attention_mask, cell_rows, text_rows,
                                               embedded)
        nq, T = self.n_query, input_ids.shape[0]
        text_mask = attention_mask.bool()
        cell_mask = ~cell_padding
        # layer 1 self-attention and text feed-forward: once per text
        x = torch.cat([self.embed_queries(T), self.embed_text(input_ids) if embedded is None else embedded], dim=1)
        x = first.attention(x, x, torch.cat([torch.ones(T, nq, dtype=torch.bool, device=x.device), text_mask], 1))
        q, t = x[:, :nq], first.ffn(x[:, nq:])
        if text_rows is not None:
            q = q.index_select(0, text_rows)
        # from the cross-attention on, per pair
        q = first.ffn_query(first.crossattention(q, cell_states, cell_mask, cell_rows))
        middle, last = layers[1:-1], layers[-1]
        if middle:
            if text_rows is not None:
                t, text_mask, text_rows = t.index_select(0, text_rows), text_mask.index_select(0, text_rows), None
            x = torch.cat([q, t], dim=1)
            mask = torch.cat([torch.ones(q.shape[:2], dtype=torch.bool, device=x.device), text_mask], 1)
            for layer in middle:
                x = layer(x, mask, nq, cell_states, cell_mask, cell_rows)
            q, t = x[:, :nq], x[:, nq:]
        # last layer: the query rows alone
        q = last.attention.attend_with(q, t, text_mask, text_rows)
        if last.crossattention is not None:
            q = last.crossattention(q, cell_states, cell_mask, cell_rows)
        return last.ffn_query(q)

    def forward_match_per_pair(self, cell_states: torch.Tensor, cell_padding: torch.Tensor, input_ids: torch.Tensor,
                               attention_mask: torch.Tensor, cell_rows: torch.Tensor | None = None,
                               text_rows: torch.Tensor | None = None, embedded: torch.Tensor | None = None
                               ) -> torch.Tensor:
        """BLIP-2's matching computation, the reference :meth:`forward_match` is tested against: the
        cell states are repeated for each pair, and each pair's queries and text tokens go through every
        layer, text rows included."""
        if embedded is None:
            embedded = self.embed_text(input_ids)
        if text_rows is not None:
            embedded, attention_mask = embedded.index_select(0, text_rows), attention_mask.index_select(0, text_rows)
        if cell_rows is not None:
            cell_states, cell_padding = cell_states.index_select(0, cell_rows), cell_padding.index_select(0, cell_rows)
        B = embedded.shape[0]
        x = torch.cat([self.embed_queries(B), embedded], dim=1)
        mask = torch.cat([torch.ones(B, self.n_query, dtype=torch.bool, device=x.device), attention_mask.bool()], 1)
        return self._run(x, mask, self.n_query, cell_states, ~cell_padding)[:, : self.n_query]
