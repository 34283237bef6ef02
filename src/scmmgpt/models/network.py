"""The scMMGPT network: cell encoder + Q-Former + text LM (LoRA) + text-to-cell projector + decoder.

Tensors in, tensors out. The network holds no gene vocabulary, no tokenizer and never touches the
file system: :class:`~scmmgpt.models.scmmgpt.ScMMGPT` owns those and hands the network token ids.
Its configuration is derived from the modules it is given (a loaded scGPT encoder brings its own
sizes, pad value and binning). What trains in each stage is read from
:data:`~scmmgpt.models.stages.STAGES` (:meth:`ScMMGPTNetwork.set_trainable`), and ``forward``
computes that stage's losses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.dataset import CellBatch
from ..errors import ConfigError
from ..modules.attention import masked_mean
from ..modules.cell_encoder import CellEncoder
from ..modules.losses import (
    cdgen_loss,
    ctc_loss,
    ctm_loss,
    gather_with_grad,
    pcgen_loss,
    sample_hard_negatives,
    similarity,
)
from ..modules.qformer import QFormer
from ..modules.text_to_cell import CellDecoder, TextToCellProjector
from ..utils.distinct import distinct
from .config import ModelConfig
from .stages import ONLY_FOR, StageSpec, stage_spec

__all__ = ["ScMMGPTNetwork", "CellOutput", "AlignOutput", "GenOutput", "text_codes"]


def _distinct_rows(texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~scmmgpt.utils.distinct.distinct` of ``texts`` as index tensors on ``device``."""
    first, inverse = distinct(texts)
    return torch.tensor(first, device=device), torch.tensor(inverse, device=device)


def text_codes(texts: list[str], device) -> torch.Tensor:
    """(B,) int64 codes equal exactly where the texts are equal, the same in every process (a 63-bit
    BLAKE2 digest), so descriptions can be matched across gathered batches."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little") >> 1
                         for t in texts], dtype=torch.long, device=device)


NARROW_CELL_ENCODER = 128
"""Cell encoders narrower than this compute in fp32 under bf16/fp16 autocast. Measured with the
32-wide ``tiny`` encoder (``cpu-small``): in bf16 it gained 4% in embedding speed at 2048 genes,
and in 60-step stage-1 runs over 3 seeds CTC stayed on its initial plateau (ln B) in bf16 while
with the encoder in fp32 all 3 left it; early on, cells differ by less than bf16 resolves."""


def _fp32_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` in fp32, also under autocast."""
    with torch.autocast(x.device.type, enabled=False):
        return layer(x.float())


def base_lm(lm: nn.Module) -> nn.Module:
    """The Hugging Face model inside a LoRA (peft) wrapper, or ``lm`` itself."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def _keeps_logits(lm: nn.Module) -> bool:
    """Whether the causal LM's forward takes ``logits_to_keep`` (most of transformers' do)."""
    return "logits_to_keep" in inspect.signature(base_lm(lm).forward).parameters


#: Causal LMs (``config.model_type``) whose logits are exactly ``lm_head(last hidden state)``: no
#: soft-capping, logit scale or final norm after the decoder's own (Gemma 2, Cohere, Granite have one).
_PLAIN_HEAD = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "smollm3", "starcoder2"})


def _decoder_and_head(lm: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(decoder, lm_head)`` of a causal LM whose logits are the head applied to the decoder's last
    hidden state (LoRA adapters stay in place: peft injects them into these modules), else ``None``."""
    base = base_lm(lm)
    if getattr(getattr(base, "config", None), "model_type", None) not in _PLAIN_HEAD:
        return None
    decoder, head = getattr(base, "model", None), base.get_output_embeddings()
    return (decoder, head) if decoder is not None and head is not None else None


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


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
    """Stage 1 / annotation: CTC + CTM (paper eq. 2-4)."""

    loss: torch.Tensor
    loss_ctc: torch.Tensor
    loss_ctm: torch.Tensor
    sim: torch.Tensor
    """(B, B) cell x text similarities (detached)."""

    def parts(self) -> dict[str, torch.Tensor]:
        """The loss parts by name, for logging."""
        return {"ctc": self.loss_ctc, "ctm": self.loss_ctm}


@dataclass
class GenOutput:
    """Stage 2 / generation tasks: CDGen and/or PCGen (paper eq. 5-7)."""

    loss: torch.Tensor
    loss_cdgen: torch.Tensor | None = None
    loss_pcgen: torch.Tensor | None = None
    pred: torch.Tensor | None = None
    """(B, V) generated eq.-1 values (PCGen)."""

    def parts(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in (("cdgen", self.loss_cdgen), ("pcgen", self.loss_pcgen)) if v is not None}


class ScMMGPTNetwork(nn.Module):
    """scMMGPT (Shi et al. 2025) as a tensor module.

    Parameters
    ----------
    config
        The :class:`ModelConfig`. Its ``cell`` section is replaced by the cell encoder's own
        configuration, so the network always reports the encoder it holds.
    cell_encoder, qformer
        Built modules.
    lm
        The causal LM (with LoRA adapters when configured); ``None`` for a network used only for
        embedding and annotation.
    prompt_ids, answer_ids
        (P,) and (A,) LM token ids of ``config.lm.prompt`` and ``config.lm.answer_prompt``: the
        cell tokens sit between them in CDGen. Required with ``lm``.
    """

    def __init__(self, config: ModelConfig, cell_encoder: CellEncoder, qformer: QFormer, lm: nn.Module | None = None,
                 prompt_ids: torch.Tensor | None = None, answer_ids: torch.Tensor | None = None) -> None:
        super().__init__()
        if config.qformer.n_query != qformer.n_query:
            raise ConfigError(f"config.qformer.n_query={config.qformer.n_query} but the Q-Former has "
                              f"{qformer.n_query} queries.")
        self.config = dataclasses.replace(config, cell=cell_encoder.config)
        self.cell_encoder = cell_encoder
        self.qformer = qformer
        d_q, d_cell, D = qformer.d, cell_encoder.d_model, config.qformer.embed_dim
        self.cell_proj = nn.Linear(d_q, D)
        self.text_proj = nn.Linear(d_q, D)
        self.ctm_head = nn.Linear(d_q, 2)
        self.log_temp = nn.Parameter(torch.tensor(float(config.qformer.init_temperature)).log())
        self.lm = lm
        if lm is not None:
            if prompt_ids is None or answer_ids is None:
                raise ConfigError("A network with an LM needs prompt_ids and answer_ids.")
            d_lm = lm.get_input_embeddings().weight.shape[1]
            t = config.text_to_cell
            self.lm_proj = nn.Linear(d_q, d_lm)
            self.text_to_cell = TextToCellProjector(d_lm, d_cell, n_dummy=t.n_dummy_tokens,
                                                    n_cell_queries=t.n_cell_queries, n_layers=t.n_layers,
                                                    n_heads=t.n_heads)
            self.cell_decoder = CellDecoder(d_cell, cell_encoder.config.vocab_size, dim=t.decoder_dim,
                                            gene_chunk=t.gene_chunk, n_cell_queries=t.n_cell_queries,
                                            pooled_dim=t.pooled_dim)
            # token ids, not weights: not saved, but moved with the network
            self.register_buffer("prompt_ids", torch.as_tensor(prompt_ids, dtype=torch.long), persistent=False)
            self.register_buffer("answer_ids", torch.as_tensor(answer_ids, dtype=torch.long), persistent=False)
        self.stage: StageSpec | None = None
        """The stage :meth:`set_trainable` was last called with."""

    # ------------------------------------------------------------------------------- policy
    def submodule_params(self, group: str) -> list[nn.Parameter]:
        """Parameters of one group of :data:`~scmmgpt.models.stages.SUBMODULES`."""
        if group == "qformer" and not self.config.qformer.train_word_embeddings:
            return [p for n, p in self.qformer.named_parameters() if not n.startswith("word_embeddings.")]
        if group in ("cell_encoder", "qformer"):
            return list(getattr(self, group).parameters())
        if group == "align_heads":
            return [*self.cell_proj.parameters(), *self.text_proj.parameters(), *self.ctm_head.parameters(),
                    self.log_temp]
        if self.lm is None:
            return []
        if group == "lora":
            return [p for n, p in self.lm.named_parameters() if "lora_" in n]
        return list(getattr(self, group).parameters())

    def set_trainable(self, stage: str | StageSpec) -> StageSpec:
        """The one place that freezes and unfreezes (paper §3.4): the groups in the stage's
        ``trains`` learn, everything else (and always the base LM) is frozen."""
        spec = stage_spec(stage)
        if spec.needs_lm and self.lm is None:
            raise ConfigError(f"Stage {spec.name!r} needs the text LM; load the model with with_lm=True.")
        self.requires_grad_(False)
        for group in spec.trains:
            for p in self.submodule_params(group):
                p.requires_grad_(True)
        for loss, modules in ONLY_FOR.items():
            if loss not in spec.losses:
                for name in modules:
                    if getattr(self, name, None) is not None:
                        getattr(self, name).requires_grad_(False)
        self.stage = spec
        return spec

    # ------------------------------------------------------------------------------- encoders
    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temp.exp().clamp(0.001, 0.5)

    def encode_cells(self, gene_ids: torch.Tensor, values: torch.Tensor, padding: torch.Tensor) -> CellOutput:
        p = self.cell_encoder.config.token_dropout
        if p > 0 and self.training:
            # step 0 (training only): leave tokens out as padding, for the encoder and the Q-Former alike
            drop = torch.rand(padding.shape, device=padding.device) < p
            drop[:, 0] = False
            padding = padding | drop
        # step 1: cell encoder -> (B, L, d_cell); a narrow one in fp32 (see NARROW_CELL_ENCODER)
        with torch.autocast(gene_ids.device.type, enabled=self.cell_encoder.d_model >= NARROW_CELL_ENCODER):
            states = self.cell_encoder(gene_ids, values, padding)
        # step 2: queries cross-attend to gene states -> (B, Q, d_qformer)
        query = self.qformer.forward_query(states, padding)
        # step 3: contrastive features -> (B, Q, embed_dim), unit norm; the projection heads run in
        # fp32 under autocast: early in training the cells' features differ by less than bf16 resolves
        feats = F.normalize(_fp32_linear(self.cell_proj, query), dim=-1)
        return CellOutput(states, padding, states[:, 0], query, feats)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    embedded: torch.Tensor | None = None) -> torch.Tensor:
        """Text features ``(B, embed_dim)``, unit norm, from the ``[CLS]`` output or the mean over the
        text's tokens (``config.qformer.text_pooling``); ``embedded`` as in ``QFormer.forward_text``."""
        h = self.qformer.forward_text(input_ids, attention_mask, embedded)
        pooled = h[:, 0] if self.config.qformer.text_pooling == "cls" else masked_mean(h, attention_mask.bool())
        return F.normalize(_fp32_linear(self.text_proj, pooled), dim=-1)

    def match_logits(self, states: torch.Tensor, padding: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor, cell_rows: torch.Tensor | None = None,
                     text_rows: torch.Tensor | None = None, embedded: torch.Tensor | None = None) -> torch.Tensor:
        """CTM logits ``(P, 2)`` of the pairs (cell ``cell_rows[p]``, text ``text_rows[p]``), each row
        index defaulting to ``p``; index 1 = matched."""
        q = self.qformer.forward_match(states, padding, input_ids, attention_mask, cell_rows, text_rows, embedded)
        return self.ctm_head(q).mean(1)

    # ------------------------------------------------------------------------------- stage 1
    def forward_align(self, batch: CellBatch, generator: torch.Generator | None = None,
                      losses: tuple[str, ...] = ("ctc", "ctm")) -> AlignOutput:
        """CTC + CTM (paper eq. 2-4); ``losses`` may leave one out (it is then reported as 0).

        Each distinct description of the batch goes through the text tower once (a batch of 16
        PBMCs holds 5-9). Training under several processes gathers the contrastive features of every
        process (with gradients), so CTC's negatives are the whole global batch; hard negatives for
        CTM are drawn within the process's own batch.
        """
        cell = self.encode_cells(batch.gene_ids, batch.values, batch.padding_mask)
        first, inverse = _distinct_rows(batch.texts, cell.features.device)
        text_ids, text_mask = batch.text_input_ids[first], batch.text_attention_mask[first]
        # the distinct texts' token embeddings, shared by the text tower and the matching path (one
        # backward through the word-embedding table, not two)
        embedded = self.qformer.embed_text(text_ids)
        text = self.encode_text(text_ids, text_mask, embedded).index_select(0, inverse)
        # step 4: similarities (B, B) and symmetric InfoNCE with same-description positives
        codes = text_codes(batch.texts, text.device)
        same = codes[:, None] == codes[None, :]
        sim = similarity(cell.features, text)
        zero = sim.new_zeros(())
        l_ctc = zero
        if "ctc" in losses:
            if self.training and torch.is_grad_enabled() and world_size() > 1:
                all_cells, all_text, all_codes = (gather_with_grad(t) for t in (cell.features, text, codes))
                same_all = codes[:, None] == all_codes[None, :]       # local rows x global columns
                l_ctc = ctc_loss(similarity(cell.features, all_text), self.temperature, same_all,
                                 sim_t2c=similarity(all_cells, text).t(), same_t2c=same_all)
            else:
                all_codes = codes
                l_ctc = ctc_loss(sim, self.temperature, same)
            # one description for every cell: every text is every cell's positive, so CTC's exact
            # gradient is 0, but its rounding noise is not, and Adam scales noise up to full-size steps
            # (a fine-tuning on one cell type walked the weights away so at cpu-small's rates). Exactly
            # 0 instead, kept in the graph for every process's parameters; a tensor factor, so the
            # step does not wait for the device to answer a Python branch.
            l_ctc = l_ctc * (all_codes != all_codes[0]).any()
        l_ctm = zero
        if "ctm" in losses:
            # step 5: hard negatives; positives + cell->neg text + text->neg cell through the matching path
            neg_t, neg_c = sample_hard_negatives(sim, same, generator)
            B = sim.shape[0]
            idx = torch.arange(B, device=sim.device)
            ok_t, ok_c = neg_t >= 0, neg_c >= 0
            cell_rows = torch.cat([idx, idx[ok_t], neg_c[ok_c]])
            text_rows = torch.cat([idx, neg_t[ok_t], idx[ok_c]])
            labels = torch.cat([torch.ones(B), torch.zeros(int(ok_t.sum()) + int(ok_c.sum()))]).long().to(sim.device)
            # each cell's keys/values are projected once for its 3 pairs, each distinct text's first
            # layer once for all of its pairs
            logits = self.match_logits(cell.states, cell.padding, text_ids, text_mask, cell_rows,
                                       inverse.index_select(0, text_rows), embedded)
            # every cell sharing one description leaves no pair to tell apart, and positives alone would
            # teach the matching head (and, through it, the cells' states) to call everything a match
            # (benchmarks/results/recipe/README.md, "Fine-tuning rates"): then 0, kept in the graph
            l_ctm = ctm_loss(logits, labels) * (ok_t.any() | ok_c.any())
        return AlignOutput(loss=l_ctc + l_ctm, loss_ctc=l_ctc, loss_ctm=l_ctm, sim=sim.detach())

    # ------------------------------------------------------------------------------- LM side
    def _embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids)

    def cell_prefix(self, cell: CellOutput) -> torch.Tensor:
        """LM input embeddings ``[prompt][cell tokens][answer prompt]`` -> (B, P+Q+A, d_lm)."""
        B = cell.query.shape[0]
        emb_dtype = self.lm.get_input_embeddings().weight.dtype
        prompt = self._embed_tokens(self.prompt_ids)[None].expand(B, -1, -1)
        answer = self._embed_tokens(self.answer_ids)[None].expand(B, -1, -1)
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
        labels = batch.lm_input_ids.masked_fill(batch.lm_attention_mask == 0, -100)      # (B, T)
        T = labels.shape[1]
        parts = _decoder_and_head(self.lm)
        if parts is not None:
            # the vocabulary head on the hidden states that predict a real description token alone: no
            # (B, T, V) logits of padding, and no (B, T, V) gather and scatter to drop them (on a
            # 49k vocabulary that was a fifth of a CPU stage-2 step)
            decoder, head = parts
            hidden = decoder(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
            return cdgen_loss(hidden[:, P - 1:P + T - 1], labels, shifted=True, head=head)
        if _keeps_logits(self.lm):
            # the vocabulary logits of the positions that predict a description token, not of the prefix
            keep = torch.arange(P - 1, P + T - 1, device=embeds.device)
            logits = self.lm(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=keep).logits
            return cdgen_loss(logits, labels, shifted=True)
        logits = self.lm(inputs_embeds=embeds, attention_mask=mask).logits
        return cdgen_loss(logits, torch.cat([torch.full((B, P), -100, device=embeds.device, dtype=torch.long), labels], 1))

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
        # the projector reads hidden states only: the vocabulary head runs on one position, not on all
        # B x (T + n) of them (a 49k x 576 product per token, and its (B, T + n, V) logits)
        keep = {"logits_to_keep": 1} if _keeps_logits(self.lm) else {}
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, output_hidden_states=True,
                      **keep)
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
        """PCGen (eq. 6): ``(loss, pred)``. Each distinct description goes through the LM and the
        projector once (one dropout draw per description); its pseudo-cell is then compared with every
        cell it describes."""
        ids, mask = batch.lm_input_ids, batch.lm_attention_mask
        if batch.texts is not None:
            first, inverse = _distinct_rows(batch.texts, ids.device)
            pred = self.decode_cells(self.text_to_cell_features(ids[first], mask[first])).index_select(0, inverse)
        else:
            pred = self.decode_cells(self.text_to_cell_features(ids, mask))
        return pcgen_loss(pred, batch.target, measured), pred

    def forward_gen(self, batch: CellBatch, measured: torch.Tensor | None = None, *, cdgen: bool = True,
                    pcgen: bool = True) -> GenOutput:
        """CDGen + PCGen (eq. 7), both directions on every batch (1:1)."""
        l_cd = self.forward_cdgen(batch) if cdgen else None
        l_pc, pred = self.forward_pcgen(batch, measured) if pcgen else (None, None)
        loss = sum(part for part in (l_cd, l_pc) if part is not None)
        return GenOutput(loss=loss, loss_cdgen=l_cd, loss_pcgen=l_pc, pred=pred)

    def forward(self, batch: CellBatch, stage: str | StageSpec, measured: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> AlignOutput | GenOutput:
        """The training loss of a stage or task (its ``losses`` in :data:`~scmmgpt.models.stages.STAGES`).

        Training calls the network through ``forward`` so that a DDP/FSDP wrapper sees every step.
        """
        spec = stage_spec(stage)
        if spec.align:
            return self.forward_align(batch, generator, spec.losses)
        return self.forward_gen(batch, measured, cdgen="cdgen" in spec.losses, pcgen="pcgen" in spec.losses)

    # ------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def generate_ids(self, batch: CellBatch, *, eos_token_id: int, pad_token_id: int, max_new_tokens: int = 64,
                     do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
        """Description token ids of each cell: greedy or nucleus sampling, with the LM's KV cache.
        All prefixes have the same length, so no padding is needed."""
        cell = self.encode_cells(batch.gene_ids, batch.values, batch.padding_mask)
        prefix = self.cell_prefix(cell)
        mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        kwargs = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                      pad_token_id=pad_token_id)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        return self.lm.generate(inputs_embeds=prefix, attention_mask=mask, **kwargs)

    @torch.no_grad()
    def generate_cells(self, lm_input_ids: torch.Tensor, lm_attention_mask: torch.Tensor) -> torch.Tensor:
        """Pseudo-cells from tokenised descriptions: (B, V) eq.-1 values (clipped at 0)."""
        return self.decode_cells(self.text_to_cell_features(lm_input_ids, lm_attention_mask)).clamp(min=0)

    def trained_state_dict(self, *, full: bool = False) -> dict[str, torch.Tensor]:
        """Weights to store: everything except the frozen base LM (its LoRA adapters are kept) and,
        with ``qformer.train_word_embeddings=False``, the BERT's token embeddings (the bundled BERT
        holds them)."""
        state = self.state_dict()
        if full:
            return state
        frozen_words = not self.config.qformer.train_word_embeddings
        return {k: v for k, v in state.items() if (not k.startswith("lm.") or "lora_" in k)
                and not (frozen_words and k == "qformer.word_embeddings.weight")}
