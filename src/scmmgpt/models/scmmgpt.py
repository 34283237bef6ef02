"""The scMMGPT model: cell encoder + Q-Former + text LM (LoRA) + text-to-cell projector + decoder.

Composition and the trainable/frozen policy live here (:meth:`ScMMGPT.set_trainable`); the
modules are in :mod:`scmmgpt.modules`. Loading weights is an explicit step
(:meth:`ScMMGPT.build`, :meth:`ScMMGPT.from_pretrained`); ``__init__`` and ``forward`` methods never
download, tokenise or touch the file system.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .. import assets
from ..data.dataset import CellBatch, CellTextCollator
from ..data.vocab import GeneVocab
from ..errors import CheckpointError
from ..modules.cell_encoder import CellEncoder
from ..modules.losses import cdgen_loss, ctc_loss, ctm_loss, pcgen_loss, sample_hard_negatives, similarity
from ..modules.qformer import QFormer
from ..modules.text_to_cell import CellDecoder, TextToCellProjector
from .config import ModelConfig

__all__ = ["ScMMGPT", "CellOutput", "AlignOutput", "GenOutput", "Stage"]

Stage = Literal["stage1", "stage2", "annotate", "describe", "generate", "none"]


@dataclass
class CellOutput:
    """Cell-side outputs. B cells, L genes, Q queries."""

    states: torch.Tensor
    """(B, L, d_cell) gene states from the cell encoder."""
    padding: torch.Tensor
    """(B, L) bool padding mask."""
    cell_embedding: torch.Tensor
    """(B, d_cell) output at ``<cls>``."""
    query: torch.Tensor
    """(B, Q, d_qformer) Q-Former query outputs."""
    features: torch.Tensor
    """(B, Q, embed_dim) L2-normalised contrastive features."""


@dataclass
class AlignOutput:
    loss: torch.Tensor
    loss_ctc: torch.Tensor
    loss_ctm: torch.Tensor
    sim: torch.Tensor
    """(B, B) cell x text similarities."""


@dataclass
class GenOutput:
    loss: torch.Tensor
    loss_cdgen: torch.Tensor | None = None
    loss_pcgen: torch.Tensor | None = None
    pred: torch.Tensor | None = None
    """(B, V) generated eq.-1 values (PCGen)."""


class ScMMGPT(nn.Module):
    """scMMGPT (Shi et al. 2025).

    Parameters
    ----------
    config
        The :class:`ModelConfig`.
    vocab
        Gene vocabulary (``config.cell.vocab_size == len(vocab)``).
    cell_encoder, qformer
        Built modules (see :meth:`build`).
    bert_tokenizer
        Tokenizer of the Q-Former's BERT.
    lm, lm_tokenizer
        The causal LM (with LoRA adapters when configured) and its tokenizer; ``None`` for a model
        used only for embedding/annotation.
    """

    def __init__(self, config: ModelConfig, vocab: GeneVocab, cell_encoder: CellEncoder, qformer: QFormer,
                 bert_tokenizer, lm: nn.Module | None = None, lm_tokenizer=None) -> None:
        super().__init__()
        self.config = config
        self.vocab = vocab
        self.cell_encoder = cell_encoder
        self.qformer = qformer
        self.bert_tokenizer = bert_tokenizer
        d_q, d_cell, D = qformer.d, cell_encoder.d_model, config.qformer.embed_dim
        self.cell_proj = nn.Linear(d_q, D)
        self.text_proj = nn.Linear(d_q, D)
        self.ctm_head = nn.Linear(d_q, 2)
        self.log_temp = nn.Parameter(torch.tensor(float(config.qformer.init_temperature)).log())
        self.lm = lm
        self.lm_tokenizer = lm_tokenizer
        if lm is not None:
            d_lm = lm.get_input_embeddings().weight.shape[1]
            t = config.text_to_cell
            self.lm_proj = nn.Linear(d_q, d_lm)
            self.text_to_cell = TextToCellProjector(d_lm, d_cell, n_dummy=t.n_dummy_tokens,
                                                    n_cell_queries=t.n_cell_queries, n_layers=t.n_layers,
                                                    n_heads=t.n_heads)
            self.cell_decoder = CellDecoder(d_cell, len(vocab), dim=t.decoder_dim, gene_chunk=t.gene_chunk,
                                            n_cell_queries=t.n_cell_queries, pooled_dim=t.pooled_dim)
            self._prompt_ids = torch.tensor(lm_tokenizer(config.lm.prompt, add_special_tokens=False)["input_ids"])
            self._answer_ids = torch.tensor(lm_tokenizer(config.lm.answer_prompt, add_special_tokens=False)["input_ids"])
        self.stage: Stage = "none"
        self.fresh_parameters: set[str] = set()
        """Names of randomly initialised parameters (set by :meth:`build`; empty once trained and
        reloaded). :meth:`param_groups` can give them a larger learning rate."""

    # ------------------------------------------------------------------------------- building
    @classmethod
    def build(cls, config: ModelConfig, vocab: GeneVocab, *, with_lm: bool = True, cell_encoder: CellEncoder | None = None,
              device: str | torch.device = "cpu") -> "ScMMGPT":
        """Build a model: BERT weights into the Q-Former, the LM (+LoRA) loaded by name/path.

        ``cell_encoder`` may be a pretrained one (e.g. from :func:`~scmmgpt.models.scgpt.load_scgpt`).
        """
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        config.cell.vocab_size = len(vocab)
        config.cell.pad_id = vocab.pad_id
        pretrained_encoder = cell_encoder is not None
        if cell_encoder is None:
            cell_encoder = CellEncoder(config.cell)
        bert_path = assets.resolve_bert(config.qformer.bert)
        bert_cfg = AutoConfig.from_pretrained(bert_path)
        qformer = QFormer(bert_cfg, cell_encoder.d_model, n_query=config.qformer.n_query,
                          cross_attention_freq=config.qformer.cross_attention_freq, n_layers=config.qformer.n_layers,
                          dropout=config.qformer.dropout)
        qformer.load_bert(AutoModel.from_pretrained(bert_path).state_dict())

        bert_tok = AutoTokenizer.from_pretrained(bert_path)
        lm = lm_tok = None
        if with_lm:
            lm, lm_tok = load_lm(config)
        model = cls(config, vocab, cell_encoder, qformer, bert_tok, lm, lm_tok).to(device)
        # everything not copied from a pretrained checkpoint starts from random initialisation
        model.fresh_parameters = {
            n for n, _ in model.named_parameters()
            if not (n.startswith("lm.") and "lora_" not in n)
            and not (n.startswith("cell_encoder.") and pretrained_encoder)
            and not (n.startswith("qformer.") and "crossattention" not in n and "query_tokens" not in n)
        }
        return model

    def collator(self, *, with_text: bool = True) -> CellTextCollator:
        """A collator that pads cells and tokenises texts for this model's BERT and LM."""
        return CellTextCollator(pad_id=self.vocab.pad_id, pad_value=self.config.cell.pad_value,
                                tokenizer=self.bert_tokenizer if with_text else None,
                                max_text_len=self.config.qformer.max_text_len, vocab_size=len(self.vocab),
                                lm_tokenizer=self.lm_tokenizer if (with_text and self.lm is not None) else None,
                                lm_max_text_len=self.config.lm.max_text_len)

    # ------------------------------------------------------------------------------- policy
    def set_trainable(self, stage: Stage) -> None:
        """The one place that decides what trains (paper §3.4).

        * ``stage1`` / ``annotate``: cell encoder, Q-Former and the CTC/CTM heads.
        * ``stage2``: cell encoder and Q-Former frozen; the query -> LM projection, text-to-cell
          projector, cell decoder and the LM's LoRA adapters train.
        * ``describe``: query -> LM projection + LoRA. ``generate``: text-to-cell, decoder + LoRA.
        """
        self.requires_grad_(False)
        align = [self.cell_encoder, self.qformer, self.cell_proj, self.text_proj, self.ctm_head]
        lora = [p for n, p in self.lm.named_parameters() if "lora_" in n] if self.lm is not None else []
        if stage in ("stage1", "annotate"):
            for m in align:
                m.requires_grad_(True)
            self.log_temp.requires_grad_(True)
        elif stage in ("stage2", "describe", "generate"):
            if self.lm is None:
                raise CheckpointError(f"Stage {stage!r} needs the text LM; build the model with with_lm=True.")
            if stage in ("stage2", "describe"):
                self.lm_proj.requires_grad_(True)
            if stage in ("stage2", "generate"):
                self.text_to_cell.requires_grad_(True)
                self.cell_decoder.requires_grad_(True)
            for p in lora:
                p.requires_grad_(True)
        elif stage != "none":
            raise ValueError(f"Unknown stage {stage!r}.")
        self.stage = stage

    def param_groups(self, lr: float, lr_new: float | None = None) -> list[dict]:
        """Optimiser groups of the trainable parameters: pretrained ones (BERT layers, a loaded scGPT
        encoder, the LM) at ``lr``; randomly initialised ones (:attr:`fresh_parameters`) at
        ``lr_new`` (default ``lr``). A fresh cell encoder and the new cross-attention layers learn
        orders of magnitude too slowly at the paper's 1e-5, which assumes a pretrained scGPT."""
        lr_new = lr if lr_new is None else lr_new
        old, new = [], []
        for n, p in self.named_parameters():
            if p.requires_grad:
                (new if n in self.fresh_parameters else old).append(p)
        return [g for g in ({"params": old, "lr": lr}, {"params": new, "lr": lr_new}) if g["params"]]

    # ------------------------------------------------------------------------------- encoders
    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temp.exp().clamp(0.001, 0.5)

    def encode_cells(self, gene_ids: torch.Tensor, values: torch.Tensor, padding: torch.Tensor) -> CellOutput:
        # step 1: cell encoder -> (B, L, d_cell)
        states = self.cell_encoder(gene_ids, values, padding)
        # step 2: queries cross-attend to gene states -> (B, Q, d_qformer)
        query = self.qformer.forward_query(states, padding)
        # step 3: contrastive features -> (B, Q, embed_dim), unit norm
        feats = F.normalize(self.cell_proj(query), dim=-1)
        return CellOutput(states, padding, states[:, 0], query, feats)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text features ``(B, embed_dim)``, unit norm, from the ``[CLS]`` output."""
        h = self.qformer.forward_text(input_ids, attention_mask)
        return F.normalize(self.text_proj(h[:, 0]), dim=-1)

    def match_logits(self, states: torch.Tensor, padding: torch.Tensor, input_ids, attention_mask) -> torch.Tensor:
        """CTM logits ``(B, 2)`` for aligned (cell_i, text_i) pairs; index 1 = matched."""
        q = self.qformer.forward_match(states, padding, input_ids, attention_mask)
        return self.ctm_head(q).mean(1)

    # ------------------------------------------------------------------------------- stage 1
    @staticmethod
    def same_text(texts: list[str], device) -> torch.Tensor:
        """(B, B) bool: True where two cells share a description."""
        codes = {t: i for i, t in enumerate(dict.fromkeys(texts))}
        c = torch.tensor([codes[t] for t in texts], device=device)
        return c[:, None] == c[None, :]

    def forward_align(self, batch: CellBatch, generator: torch.Generator | None = None) -> AlignOutput:
        """CTC + CTM (paper eq. 2-4)."""
        cell = self.encode_cells(batch.gene_ids, batch.values, batch.padding_mask)
        text = self.encode_text(batch.text_input_ids, batch.text_attention_mask)
        # step 4: similarities (B, B) and symmetric InfoNCE with same-description positives
        sim = similarity(cell.features, text)
        same = self.same_text(batch.texts, sim.device)
        l_ctc = ctc_loss(sim, self.temperature, same)
        # step 5: hard negatives; positives + cell->neg text + text->neg cell through the matching path
        neg_t, neg_c = sample_hard_negatives(sim, same, generator)
        B = sim.shape[0]
        idx = torch.arange(B, device=sim.device)
        ok_t, ok_c = neg_t >= 0, neg_c >= 0
        cell_rows = torch.cat([idx, idx[ok_t], neg_c[ok_c]])
        text_rows = torch.cat([idx, neg_t[ok_t], idx[ok_c]])
        labels = torch.cat([torch.ones(B), torch.zeros(int(ok_t.sum()) + int(ok_c.sum()))]).long().to(sim.device)
        logits = self.match_logits(cell.states[cell_rows], cell.padding[cell_rows],
                                   batch.text_input_ids[text_rows], batch.text_attention_mask[text_rows])
        l_ctm = ctm_loss(logits, labels)
        return AlignOutput(loss=l_ctc + l_ctm, loss_ctc=l_ctc, loss_ctm=l_ctm, sim=sim.detach())

    # ------------------------------------------------------------------------------- LM helpers
    def _embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids)

    def cell_prefix(self, cell: CellOutput) -> torch.Tensor:
        """LM input embeddings ``[prompt][cell tokens][answer prompt]`` -> (B, P+Q+A, d_lm)."""
        B = cell.query.shape[0]
        dev = cell.query.device
        emb_dtype = self.lm.get_input_embeddings().weight.dtype
        prompt = self._embed_tokens(self._prompt_ids.to(dev))[None].expand(B, -1, -1)
        answer = self._embed_tokens(self._answer_ids.to(dev))[None].expand(B, -1, -1)
        cell_tokens = self.lm_proj(cell.query).to(emb_dtype)
        return torch.cat([prompt, cell_tokens, answer], dim=1)

    def forward_cdgen(self, batch: CellBatch, cell: CellOutput | None = None) -> torch.Tensor:
        """CDGen (eq. 5): LM loss on the description given the projected cell tokens."""
        if cell is None:
            with torch.set_grad_enabled(self.cell_encoder.training and torch.is_grad_enabled()):
                cell = self.encode_cells(batch.gene_ids, batch.values, batch.padding_mask)
        prefix = self.cell_prefix(cell)                                  # (B, P, d_lm)
        desc = self._embed_tokens(batch.lm_input_ids)                    # (B, T, d_lm)
        embeds = torch.cat([prefix, desc], dim=1)
        B, P = prefix.shape[:2]
        mask = torch.cat([torch.ones(B, P, dtype=batch.lm_attention_mask.dtype, device=embeds.device),
                          batch.lm_attention_mask], dim=1)
        labels = torch.cat([torch.full((B, P), -100, device=embeds.device, dtype=torch.long),
                            batch.lm_input_ids.masked_fill(batch.lm_attention_mask == 0, -100)], dim=1)
        logits = self.lm(inputs_embeds=embeds, attention_mask=mask).logits
        return cdgen_loss(logits, labels)

    def text_to_cell_states(self, lm_input_ids: torch.Tensor, lm_attention_mask: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Description + dummy cell tokens through the LM -> the states the projector reads and
        their key padding mask (True at padding; ``None`` for the dummy-only read-out)."""
        B = lm_input_ids.shape[0]
        n = self.text_to_cell.n_dummy
        emb = self._embed_tokens(lm_input_ids)
        dummy = self.text_to_cell.dummy_embeds.to(emb.dtype)[None].expand(B, -1, -1)
        embeds = torch.cat([emb, dummy], dim=1)                           # (B, T + n, d_lm)
        mask = torch.cat([lm_attention_mask, torch.ones(B, n, dtype=lm_attention_mask.dtype,
                                                        device=emb.device)], dim=1)
        # right padding sits between text and dummies: positions continue from the last real token
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, output_hidden_states=True)
        states = out.hidden_states[-1]
        if self.config.text_to_cell.read_text:
            return states, mask == 0
        return states[:, -n:], None

    def text_to_cell_features(self, lm_input_ids: torch.Tensor, lm_attention_mask: torch.Tensor) -> torch.Tensor:
        """Description + dummy cell tokens through the LM -> cell features (B, n_cell_queries, d_cell)."""
        states, padding = self.text_to_cell_states(lm_input_ids, lm_attention_mask)
        return self.text_to_cell(states, key_padding_mask=padding)

    def decode_cells(self, cell_feats: torch.Tensor) -> torch.Tensor:
        """Cell features -> eq.-1 values of every vocabulary gene (B, V)."""
        gene_emb = self.cell_encoder.gene_embeddings().detach()
        return self.cell_decoder(cell_feats, gene_emb)

    def forward_pcgen(self, batch: CellBatch, measured: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """PCGen (eq. 6): ``(loss, pred)``."""
        pred = self.decode_cells(self.text_to_cell_features(batch.lm_input_ids, batch.lm_attention_mask))
        return pcgen_loss(pred, batch.target, measured), pred

    def forward_gen(self, batch: CellBatch, measured: torch.Tensor | None = None, *, cdgen: bool = True,
                    pcgen: bool = True) -> GenOutput:
        """Stage 2: CDGen + PCGen (eq. 7), both directions on every batch (1:1)."""
        l_cd = self.forward_cdgen(batch) if cdgen else None
        l_pc, pred = self.forward_pcgen(batch, measured) if pcgen else (None, None)
        loss = sum(l for l in (l_cd, l_pc) if l is not None)
        return GenOutput(loss=loss, loss_cdgen=l_cd, loss_pcgen=l_pc, pred=pred)

    def forward(self, batch: CellBatch, objective: Stage, measured: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss of a stage or task and its parts: ``(loss, {"ctc": ..., ...})``.

        Training calls the model through ``forward`` so that a DDP/FSDP wrapper sees every step.
        """
        if objective in ("stage1", "annotate"):
            out = self.forward_align(batch, generator)
            return out.loss, {"ctc": out.loss_ctc, "ctm": out.loss_ctm}
        if objective not in ("stage2", "describe", "generate"):
            raise ValueError(f"Unknown objective {objective!r}.")
        gen = self.forward_gen(batch, measured, cdgen=objective in ("stage2", "describe"),
                               pcgen=objective in ("stage2", "generate"))
        parts = {k: v for k, v in (("cdgen", gen.loss_cdgen), ("pcgen", gen.loss_pcgen)) if v is not None}
        return gen.loss, parts

    # ------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def generate_text(self, batch: CellBatch, *, max_new_tokens: int = 64, do_sample: bool = False,
                      temperature: float = 1.0, top_p: float = 1.0) -> list[str]:
        """Describe cells: greedy or nucleus sampling, with the LM's KV cache. All prefixes have the
        same length, so no padding is needed."""
        cell = self.encode_cells(batch.gene_ids, batch.values, batch.padding_mask)
        prefix = self.cell_prefix(cell)
        mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        tok = self.lm_tokenizer
        kwargs = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        out = self.lm.generate(inputs_embeds=prefix, attention_mask=mask, **kwargs)
        return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]

    @torch.no_grad()
    def generate_cells(self, lm_input_ids: torch.Tensor, lm_attention_mask: torch.Tensor) -> torch.Tensor:
        """Pseudo-cells from tokenised descriptions: (B, V) eq.-1 values (clipped at 0)."""
        return self.decode_cells(self.text_to_cell_features(lm_input_ids, lm_attention_mask)).clamp(min=0)

    # ------------------------------------------------------------------------------- persistence
    def trained_state_dict(self, *, full: bool = False) -> dict[str, torch.Tensor]:
        """Weights to store: everything except the frozen base LM (its LoRA adapters are kept)."""
        state = self.state_dict()
        if full:
            return state
        return {k: v for k, v in state.items() if not k.startswith("lm.") or "lora_" in k}

    def save_pretrained(self, path: str | os.PathLike, *, full: bool = False) -> None:
        """Write ``config.json``, ``vocab.json``, ``model.safetensors`` and ``manifest.json``."""
        from .persistence import save_model

        save_model(self, path, full=full)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, with_lm: bool | None = None,
                        device: str | torch.device = "cpu") -> "ScMMGPT":
        """Load a model written by :meth:`save_pretrained` (checksums verified)."""
        from .persistence import load_model

        return load_model(path, with_lm=with_lm, device=device)


def load_lm(config: ModelConfig):
    """Load the causal LM and tokenizer by name/path, wrap with LoRA when configured."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.resolve_lm(config.lm.name)
    dtype = getattr(torch, config.lm.dtype)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as exc:
        raise CheckpointError(f"Could not load the text LM {config.lm.name!r} ({path}): {exc}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    lm.requires_grad_(False)
    if config.lm.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=config.lm.lora_r, lora_alpha=config.lm.lora_alpha, lora_dropout=config.lm.lora_dropout,
                          target_modules=config.lm.lora_target_modules, task_type="CAUSAL_LM")
        lm = get_peft_model(lm, lora)
    return lm, tok
