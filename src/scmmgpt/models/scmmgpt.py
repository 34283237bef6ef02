"""The user-facing scMMGPT model: the network plus everything that is not a tensor.

:class:`ScMMGPT` holds the :class:`~scmmgpt.models.network.ScMMGPTNetwork` (``.net``), the gene
vocabulary, the BERT and LM tokenizers, the collator, gene matching and persistence
(:meth:`ScMMGPT.save_pretrained` / :meth:`ScMMGPT.from_pretrained`), and the few verbs every caller
uses — the ``tl`` API, the demo, the benchmarks and validation during training alike:

* :meth:`ScMMGPT.encode` — cell features of a dataset;
* :meth:`ScMMGPT.score_labels` — zero-shot scores of cells against candidate labels;
* :meth:`ScMMGPT.describe` — text for cells;
* :meth:`ScMMGPT.generate_cells` — pseudo-cells from texts.

Building loads weights (BERT, the LM, optionally a scGPT checkpoint) as an explicit step
(:meth:`ScMMGPT.build`); the network's ``__init__`` and ``forward`` never download, tokenise or
touch the file system.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .. import assets
from ..data.dataset import CellBatch, CellTextCollator, CellTextDataset, tokenize_for_bert, tokenize_for_lm
from ..data.label_texts import Candidates, back_off_scores, backoff_labels, candidate_labels
from ..data.prepare import CellData, prepare_cells
from ..data.vocab import GeneVocab
from ..errors import CheckpointError, ConfigError
from ..modules.cell_encoder import CellEncoder
from ..modules.losses import similarity
from ..modules.qformer import QFormer
from ..utils.distinct import distinct
from ..utils.precision import Precision, native_bf16, resolve_precision
from .config import RUNTIME_KEYS, ModelConfig
from .gate import NoveltyGate, route_scores
from .network import AlignOutput, CellOutput, GenOutput, ScMMGPTNetwork, base_lm
from .stages import ONLY_FOR

__all__ = ["ScMMGPT", "LabelScores", "CellOutput", "AlignOutput", "GenOutput", "load_lm"]


@dataclass
class LabelScores:
    """Zero-shot scores of N cells against T candidate labels."""

    scores: np.ndarray
    """(N, T) scores: CTC similarity, or its blend with P(match) when re-ranked."""
    candidates: Candidates
    """The labels scored: names, CL ids and the texts the model read."""

    @property
    def names(self) -> list[str]:
        return self.candidates.names

    def predict(self) -> np.ndarray:
        """(N,) the best label's name per cell."""
        return np.asarray(self.names, dtype=object)[self.scores.argmax(1)]


class ScMMGPT:
    """scMMGPT (Shi et al. 2025): network, vocabulary, tokenizers and the verbs users call.

    Parameters
    ----------
    net
        The tensor network.
    vocab
        Gene vocabulary (``net.config.cell.vocab_size == len(vocab)``).
    bert_tokenizer
        Tokenizer of the Q-Former's BERT.
    lm_tokenizer
        Tokenizer of the LM (``None`` when the network has no LM).
    fresh_parameters
        Names of network parameters still at random initialisation.
    scratch_parameters
        Names of network parameters whose weights started from random initialisation, trained since
        or not (default: ``fresh_parameters``); see :meth:`param_groups`.
    """

    def __init__(self, net: ScMMGPTNetwork, vocab: GeneVocab, bert_tokenizer, lm_tokenizer=None,
                 fresh_parameters: set[str] | None = None, scratch_parameters: set[str] | None = None) -> None:
        if net.config.cell.vocab_size != len(vocab):
            raise ConfigError(f"The cell encoder has {net.config.cell.vocab_size} gene tokens but the vocabulary "
                              f"{len(vocab)}.")
        if (net.lm is None) != (lm_tokenizer is None):
            raise ConfigError("Give lm_tokenizer exactly when the network has an LM.")
        self.net = net
        self.vocab = vocab
        self.bert_tokenizer = bert_tokenizer
        self.lm_tokenizer = lm_tokenizer
        self.fresh_parameters: set[str] = set(fresh_parameters or ())
        """Names of parameters still at random initialisation (empty once trained and reloaded)."""
        self.scratch_parameters: set[str] = set(self.fresh_parameters if scratch_parameters is None
                                                else scratch_parameters)
        """Names of parameters that were not copied from a pretrained checkpoint (BERT, a scGPT
        encoder, the LM) when this model's lineage began, trained since or not: :meth:`param_groups`
        gives them ``lr_new``, in fine-tuning as in pre-training."""

    # ------------------------------------------------------------------------------- basics
    @property
    def config(self) -> ModelConfig:
        """The configuration of the network held (derived from its modules)."""
        return self.net.config

    @property
    def lm(self) -> nn.Module | None:
        return self.net.lm

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device: str | torch.device) -> "ScMMGPT":
        """Move the network (in place) and return ``self``."""
        self.net.to(device)
        set_lm_attention(self.net.lm, device)
        return self

    @property
    def value_bins(self) -> int | None:
        """Per-cell quantile bins applied to values before the encoder (``None``: raw eq.-1 values).
        A scGPT checkpoint brings its own (51)."""
        return self.config.cell.n_bins

    def __repr__(self) -> str:
        c = self.config
        return (f"ScMMGPT(cell={c.cell.n_layers}x{c.cell.d_model}, genes={len(self.vocab)}, "
                f"qformer={c.qformer.bert!r}, lm={c.lm.name if self.lm is not None else None!r})")

    # ------------------------------------------------------------------------------- building
    @classmethod
    def build(cls, config: ModelConfig, vocab: GeneVocab | None = None, *, with_lm: bool = True,
              cell_encoder: CellEncoder | None = None, device: str | torch.device = "cpu") -> "ScMMGPT":
        """Build a model: BERT weights into the Q-Former, the LM (+LoRA) loaded by name/path, and the
        cell encoder new, from ``cell_encoder`` (e.g. :func:`~scmmgpt.models.scgpt.load_scgpt`'s) or
        from ``config.cell_checkpoint`` (a scGPT checkpoint directory, which also gives the vocabulary).

        ``config`` is not modified: the model's :attr:`config` is a new one derived from the modules.
        Random initialisation draws from torch's global RNG (seed it for a reproducible model).
        """
        if config.cell_checkpoint is not None:
            if cell_encoder is not None:
                raise ConfigError("Give either config.cell_checkpoint or cell_encoder=, not both.")
            from .scgpt import load_scgpt

            cell_encoder, ckpt_vocab = load_scgpt(config.cell_checkpoint)
            if vocab is not None and vocab.tokens != ckpt_vocab.tokens:
                raise ConfigError(f"The scGPT checkpoint {config.cell_checkpoint} brings its own gene vocabulary; "
                                  "map the data into it (vocab=None) instead of passing another one.")
            vocab = ckpt_vocab
        if vocab is None:
            raise ConfigError("ScMMGPT.build needs a gene vocabulary (vocab=) or config.cell_checkpoint.")
        pretrained_encoder = cell_encoder is not None
        if cell_encoder is None:
            cell_encoder = CellEncoder(dataclasses.replace(config.cell, vocab_size=len(vocab), pad_id=vocab.pad_id))
        elif cell_encoder.config.vocab_size != len(vocab):
            raise ConfigError(f"The cell encoder has {cell_encoder.config.vocab_size} gene tokens, the vocabulary "
                              f"{len(vocab)}: give the vocabulary the encoder was trained with.")
        return cls._assemble(config, vocab, cell_encoder, pretrained_encoder=pretrained_encoder, with_lm=with_lm,
                             device=device)

    @classmethod
    def _assemble(cls, config: ModelConfig, vocab: GeneVocab, cell_encoder: CellEncoder, *, pretrained_encoder: bool,
                  with_lm: bool, device: str | torch.device = "cpu") -> "ScMMGPT":
        """The Q-Former (BERT weights loaded), the LM and the network around ``cell_encoder``."""
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        bert_path = assets.resolve_bert(config.qformer.bert)
        bert_cfg = AutoConfig.from_pretrained(bert_path)
        qformer = QFormer(bert_cfg, cell_encoder.d_model, n_query=config.qformer.n_query,
                          cross_attention_freq=config.qformer.cross_attention_freq, n_layers=config.qformer.n_layers,
                          dropout=config.qformer.dropout)
        qformer.load_bert(AutoModel.from_pretrained(bert_path).state_dict())
        bert_tok = AutoTokenizer.from_pretrained(bert_path)
        lm = lm_tok = prompt = answer = None
        if with_lm:
            lm, lm_tok = load_lm(config, device)
            prompt = lm_tok(config.lm.prompt, add_special_tokens=False)["input_ids"]
            answer = lm_tok(config.lm.answer_prompt, add_special_tokens=False)["input_ids"]
        net = ScMMGPTNetwork(config, cell_encoder, qformer, lm, prompt, answer).to(device)
        # everything not copied from a pretrained checkpoint starts from random initialisation
        fresh = {
            n for n, _ in net.named_parameters()
            if not (n.startswith("lm.") and "lora_" not in n)
            and not (n.startswith("cell_encoder.") and pretrained_encoder)
            and not (n.startswith("qformer.") and "crossattention" not in n and "query_tokens" not in n)
        }
        return cls(net, vocab, bert_tok, lm_tok, fresh)

    # ------------------------------------------------------------------------------- data
    def collator(self, *, with_text: bool = True) -> CellTextCollator:
        """A collator that pads cells (with the encoder's pad value) and tokenises texts for this
        model's BERT and LM."""
        return CellTextCollator(pad_id=self.vocab.pad_id, pad_value=self.config.cell.pad_value,
                                tokenizer=self.bert_tokenizer if with_text else None,
                                max_text_len=self.config.qformer.max_text_len, vocab_size=len(self.vocab),
                                lm_tokenizer=self.lm_tokenizer if (with_text and self.lm is not None) else None,
                                lm_max_text_len=self.config.lm.max_text_len)

    def match_cells(self, adata, *, layer: str | None = None, use_raw: bool = False,
                    gene_symbol_key: str | None = None, min_coverage: float = 0.5,
                    coverage_fixes: str = "Pass gene_symbol_key= or lower min_coverage= to proceed.") -> CellData:
        """Map an AnnData into this model's gene vocabulary and value scale (eq. 1 with the model's
        ``target_sum``); the result's ``gene_match`` is the coverage report."""
        return prepare_cells(adata, self.vocab, layer=layer, use_raw=use_raw, target_sum=self.config.target_sum,
                             gene_symbol_key=gene_symbol_key, min_coverage=min_coverage,
                             coverage_fixes=coverage_fixes)

    @property
    def input_gene_mask(self) -> np.ndarray | None:
        """(V,) bool: the model's input panel (``config.input_genes``), or ``None`` for every gene."""
        genes = self.config.input_genes
        if genes is None:
            return None
        mask = np.zeros(len(self.vocab), dtype=bool)
        mask[[self.vocab[g] for g in genes]] = True
        return mask

    @property
    def reading(self) -> dict:
        """How this model reads cells, as keyword arguments of
        :class:`~scmmgpt.data.CellTextDataset` and ``LabelledCells.dataset``: ``max_genes``, value
        binning (``n_bins``) and the input panel (``input_genes``, with the ``target_sum`` eq. 1 is
        re-applied with over it)."""
        return {"max_genes": self.config.max_genes, "n_bins": self.value_bins, "input_genes": self.input_gene_mask,
                "target_sum": self.config.target_sum}

    def dataset(self, cells, texts: Sequence[str] | None = None, *, with_targets: bool = False) -> CellTextDataset:
        """Cells (a :class:`~scmmgpt.data.CellSource`) as this model reads them (:attr:`reading`)."""
        return CellTextDataset(cells, texts, cls_id=self.vocab.cls_id, with_targets=with_targets, **self.reading)

    def label_backoff(self, candidates: Candidates) -> tuple[Candidates | None, list[list[int]]]:
        """The trained ancestors each candidate backs off to
        (:func:`~scmmgpt.data.label_texts.backoff_labels` over ``config.trained_types``)."""
        return backoff_labels(candidates, self.config.trained_types or ())

    def record_trained_types(self, types: Sequence[str]) -> None:
        """Add the cell types of training descriptions (names or CL ids; those the Cell Ontology
        does not know are skipped) to ``config.trained_types``."""
        from ..data.ontology import cell_ontology

        cl = cell_ontology()
        ids = {cl.find_id(str(t)) for t in set(types)} - {None}
        if ids:
            known = set(self.config.trained_types or ())
            self.net.config = dataclasses.replace(self.config, trained_types=sorted(known | ids))  # type: ignore[arg-type]

    @property
    def gate(self) -> NoveltyGate | None:
        """The novelty gate fine-tuning recorded (:mod:`scmmgpt.models.gate`), or ``None``."""
        d = self.config.novelty_gate
        return None if d is None else NoveltyGate.from_dict(d)

    def set_gate(self, gate: NoveltyGate | None) -> None:
        """Record ``gate`` in the model's configuration (saved with the model)."""
        self.net.config = dataclasses.replace(self.config, novelty_gate=None if gate is None else gate.to_dict())

    def _check_zero_shot(self, zero_shot: "ScMMGPT") -> NoveltyGate:
        gate = self.gate
        if gate is None:
            raise ConfigError("zero_shot_model routes novel cells through this model's novelty gate, and this model has "
                              "none: gates are calibrated by fine-tuning (scmmgpt finetune --task annotate), or by "
                              "scmmgpt.models.gate.calibrate_gate on the starting model before fit, then "
                              "model.set_gate(gate). Leave zero_shot_model unset to score with this model alone.")
        mine, theirs = self.reading, zero_shot.reading
        same = zero_shot.vocab.tokens == self.vocab.tokens and all(
            np.array_equal(mine[k], theirs[k]) if isinstance(mine[k], np.ndarray) or isinstance(theirs[k], np.ndarray)
            else mine[k] == theirs[k] for k in mine)
        if not same:
            raise ConfigError("zero_shot_model reads cells differently from this model (another gene vocabulary or "
                              "value encoding): pass the model this one was fine-tuned from.")
        return gate

    def record_trained_losses(self, losses: Sequence[str]) -> None:
        """Add the losses of a training run to ``config.trained_losses``. A model without a record
        (saved before it existed) starts from the losses whose own weights
        (:data:`~scmmgpt.models.stages.ONLY_FOR`) it holds trained, i.e. not in
        :attr:`fresh_parameters`; a new model from none."""
        if self.config.trained_losses is not None:
            known = set(self.config.trained_losses)
        else:
            owned = {loss: [n for n, _ in self.net.named_parameters() if n.split(".")[0] in mods]
                     for loss, mods in ONLY_FOR.items()}
            known = {loss for loss, names in owned.items() if names and not set(names) & self.fresh_parameters}
        if not set(losses) <= known:
            self.net.config = dataclasses.replace(self.config, trained_losses=sorted(known | set(losses)))

    def choose_input_panel(self, cells) -> np.ndarray | None:
        """Pick the input panel from training ``cells`` if the config asks for one
        (``n_input_genes``), none is chosen yet and the cell side has never trained (a model's first
        run); record it in the config. A trained model that reads every gene keeps doing so: a later
        run on a file with more genes would otherwise change what it reads between pre-training and
        fine-tuning (and from the model it was fine-tuned from). Returns the panel mask the model
        reads cells through from now on."""
        from ..data.panel import variable_genes

        c = self.config
        first_run = any(n.split(".")[0] in ("cell_encoder", "qformer") for n in self.fresh_parameters)
        if c.n_input_genes is not None and c.input_genes is None and first_run:
            top = variable_genes(cells, c.n_input_genes)
            if top is not None:
                self.net.config = dataclasses.replace(c, input_genes=[self.vocab.tokens[i] for i in top])
        return self.input_gene_mask

    def tokenize_texts(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT token ids and attention mask of ``texts`` (truncated to ``qformer.max_text_len``)."""
        return tokenize_for_bert(self.bert_tokenizer, texts, self.config.qformer.max_text_len)

    # ------------------------------------------------------------------------------- training policy
    def param_groups(self, lr: float, lr_new: float | None = None) -> list[dict]:
        """Optimiser groups of the trainable parameters: those copied from pretrained checkpoints
        (BERT layers, a loaded scGPT encoder, the LM) at ``lr``; those this model's lineage started
        from random initialisation (:attr:`scratch_parameters`: a new cell encoder, the
        cross-attention layers and queries, the heads, projections, LoRA) at ``lr_new`` (default
        ``lr``). A fresh cell encoder and the new cross-attention layers learn orders of magnitude too
        slowly at the paper's 1e-5, which assumes a pretrained scGPT.

        The split holds after training too: fine-tuning a pre-trained model keeps each weight at the
        rate its group pre-trained at. Giving every weight ``lr`` once trained (as before) left a
        40-step annotate fine-tuning of a ``cpu-small`` model on all of pbmc3k's types below the
        model's own zero-shot accuracy (benchmarks/results/recipe/README.md, "Fine-tuning rates")."""
        lr_new = lr if lr_new is None else lr_new
        old, new = [], []
        for n, p in self.net.named_parameters():
            if p.requires_grad:
                (new if n in self.scratch_parameters else old).append(p)
        return [g for g in ({"params": old, "lr": lr}, {"params": new, "lr": lr_new}) if g["params"]]

    # ------------------------------------------------------------------------------- verbs
    def precision(self, requested: str | Precision = "auto", *, quiet: bool = False) -> Precision:
        """``requested`` (``auto | fp32 | bf16 | fp16``) resolved for this model's device."""
        return resolve_precision(requested, self.device, quiet=quiet)

    def encode(self, ds: CellTextDataset, *, batch_size: int = 64, indices: Sequence[int] | None = None,
               precision: str | Precision = "auto"):
        """:class:`~scmmgpt.inference.CellFeatures` of every cell of ``ds`` (or of ``indices``), in order."""
        from ..inference import encode_dataset

        return encode_dataset(self, ds, batch_size, indices=indices, precision=precision)

    def encode_texts(self, texts: Sequence[str], *, batch_size: int = 64, precision: str | Precision = "auto"
                     ) -> torch.Tensor:
        """Text features ``(T, embed_dim)``, unit norm, on the CPU."""
        from ..inference import encode_texts

        return encode_texts(self, texts, batch_size, precision=precision)

    def iter_label_scores(self, batches: Iterator[CellBatch], candidates: Candidates, *, alpha: float = 0.0,
                          rerank_top: int = 10, chunk: int = 2048, precision: str | Precision = "auto",
                          backoff: bool = True, zero_shot: "ScMMGPT | None" = None
                          ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Per batch: ``(batch.index, scores (B, T))``. Scores are the CTC similarity (cosine of cell
        and text features, max over the Q-Former queries; paper eq. 2), computed over label chunks
        to bound the (B, Q, T) intermediate.

        With ``backoff`` (and a model that records its ``trained_types``), a candidate with trained
        ancestors that are not candidates (:func:`~scmmgpt.data.label_texts.backoff_labels`) is
        also scored by them (:func:`~scmmgpt.data.label_texts.back_off_scores`).

        With ``alpha > 0`` each cell's ``rerank_top`` best labels get
        ``(1 - alpha) * sim + alpha * P(match)`` from the CTM head, and the others
        ``(1 - alpha) * sim``. This keeps them below every re-ranked label (BLIP-2's re-ranking, Li et
        al. 2023).

        With ``zero_shot`` (the model this one was fine-tuned from), the recorded novelty gate
        (:mod:`scmmgpt.models.gate`) routes each cell: one like the fine-tuning cells is ranked among
        the fine-tuning types by this model, any other among the remaining candidates by
        ``zero_shot`` (:func:`~scmmgpt.models.gate.route_scores`)."""
        from ..inference import aligned_embedding, evaluation_mode

        done = self.config.trained_losses
        if alpha > 0 and done is not None and "ctm" not in done:
            raise ConfigError(f"CTM re-ranking (alpha={alpha}) reads the matching head, which this model never trained "
                              f"(its training computed {done}: train.losses left CTM out). Score with alpha=0, or "
                              "fine-tune it with CTM first (scmmgpt finetune --task annotate, with no train.losses "
                              "that leaves CTM out).")
        score = self.feature_scorer(candidates, chunk=chunk, backoff=backoff)
        if zero_shot is not None:
            gate = self._check_zero_shot(zero_shot)
            seen = gate.seen_labels(candidates.names, candidates.ids)
            zero_score = zero_shot.feature_scorer(candidates, chunk=chunk, backoff=backoff)
        with evaluation_mode(self.net, precision):
            for batch in batches:
                out = self.net.encode_cells(batch.gene_ids, batch.values, batch.padding_mask)
                sim = score(out.features)
                if alpha > 0:
                    sim = self._rerank(out, sim, candidates.texts, alpha, rerank_top)
                if zero_shot is not None:
                    with evaluation_mode(zero_shot.net, precision):
                        z = zero_shot.net.encode_cells(batch.gene_ids, batch.values, batch.padding_mask).features
                    sim = route_scores(sim, zero_score(z), seen, gate.known(aligned_embedding(z)))
                yield batch.index, sim

    def feature_scorer(self, candidates: Candidates, *, chunk: int = 2048, backoff: bool = True
                       ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The scores of :meth:`iter_label_scores` (without CTM re-ranking) as a function of the cells'
        query features ``(B, Q, D)`` -> ``(B, T)``: the candidates' texts are encoded once, here.
        :meth:`iter_label_scores` applies it to the encoder's output; ``tl.search`` and
        ``tl.annotate`` with ``use_rep`` to features stored by ``tl.embed(queries=True)``."""
        proxies, links = self.label_backoff(candidates) if backoff else (None, [])
        texts = candidates.texts + (proxies.texts if proxies is not None else [])
        n = len(candidates.texts)
        # the candidates are encoded once per call: in fp32, which costs nothing next to the cells and
        # keeps bf16 scores closer to fp32's (labels near a tie flip less)
        text = self.encode_texts(texts, precision="fp32")

        def score(features: torch.Tensor) -> torch.Tensor:
            if features.dtype == torch.float16 and features.device.type == "cpu":
                # features stored in float16 (tl.embed(queries=True)): the same max-over-queries cosine as
                # `similarity`, as one float16 product (fp32 accumulation) without a float32 copy of the
                # cells; 20x faster over 10^5 cells, within ~1e-3 of the fp32 scores
                B, Q, D = features.shape
                sim = torch.cat([(features.reshape(B * Q, D) @ text[i:i + chunk].T.half()).reshape(B, Q, -1)
                                 .amax(1).float() for i in range(0, len(text), chunk)], dim=1)
            else:
                feats = features.float().cpu()
                sim = torch.cat([similarity(feats, text[i:i + chunk]) for i in range(0, len(text), chunk)], dim=1)
            if proxies is not None:
                sim = torch.from_numpy(back_off_scores(sim[:, :n].numpy(), sim[:, n:].numpy(), links))
            return sim

        return score

    def _rerank(self, out: CellOutput, sim: torch.Tensor, texts: list[str], alpha: float, top: int) -> torch.Tensor:
        B, T = sim.shape
        top = min(top, T)
        cand = sim.topk(top, dim=1).indices                                    # (B, top)
        device = out.states.device
        # each candidate text is tokenised once and its pairs point at it (the matching path runs the
        # first layer once per text)
        used, text_rows = torch.unique(cand.flatten(), return_inverse=True)
        ids, mask = self.tokenize_texts([texts[int(j)] for j in used])
        rows = torch.arange(B, device=device).repeat_interleave(top)
        logits = self.net.match_logits(out.states, out.padding, ids.to(device), mask.to(device), rows,
                                       text_rows.to(device))
        p = logits.float().softmax(-1)[:, 1].cpu().view(B, top)
        final = (1 - alpha) * sim
        final.scatter_add_(1, cand, alpha * p)
        return final

    def score_labels(self, ds: CellTextDataset, labels: Sequence[str] | Mapping[str, str] | Candidates, *, alpha: float = 0.0,
                     rerank_top: int = 10, context: str | None = None, batch_size: int = 64,
                     indices: Sequence[int] | None = None, precision: str | Precision = "auto",
                     backoff: bool = True, zero_shot: "ScMMGPT | None" = None) -> LabelScores:
        """Zero-shot scores of the cells of ``ds`` (or of ``indices``) against candidate ``labels``.

        ``labels`` are names or CL ids, each read as :func:`~scmmgpt.data.label_texts.candidate_labels`
        describes it (Cell Ontology definition and synonyms, plus ``context``) — the texts
        :func:`scmmgpt.tl.annotate` uses — or ready :class:`Candidates`. ``backoff``: see
        :meth:`iter_label_scores`; ``zero_shot``: novel cells to the zero-shot model, as there.
        """
        from ..inference import iter_batches, length_order

        if isinstance(labels, Candidates):
            cands = labels
        else:   # a {name: CL term} mapping keeps its terms; a list is names or CL ids
            cands = candidate_labels(labels=labels if isinstance(labels, Mapping) else list(labels), context=context)
        order, inv = length_order(ds, indices)
        chunks = [sim for _, sim in self.iter_label_scores(iter_batches(self, ds, batch_size, indices=order), cands,
                                                           alpha=alpha, rerank_top=rerank_top, precision=precision,
                                                           backoff=backoff, zero_shot=zero_shot)]
        scores = torch.cat(chunks)[inv]
        return LabelScores(scores.numpy(), cands)

    def describe(self, batch: CellBatch, *, max_new_tokens: int = 64, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, precision: str | Precision = "auto") -> list[str]:
        """Descriptions of the cells of ``batch`` (greedy, or nucleus sampling from torch's RNG)."""
        from ..inference import evaluation_mode

        if self.lm is None:
            raise ConfigError("describe needs the text LM: load the model with with_lm=True (a stage-2 model).")
        tok = self.lm_tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with evaluation_mode(self.net, precision):
            ids = self.net.generate_ids(batch, eos_token_id=tok.eos_token_id, pad_token_id=pad,
                                        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                        top_p=top_p)
        return [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]

    def generate_cells(self, texts: Sequence[str], *, batch_size: int = 16, precision: str | Precision = "auto"
                       ) -> np.ndarray:
        """Pseudo-cells from descriptions (used as written): ``(len(texts), V)`` eq.-1 values of
        every vocabulary token, clipped at 0. A repeated text goes through the LM once."""
        from ..inference import evaluation_mode

        if self.lm is None:
            raise ConfigError("generate needs the text LM: load the model with with_lm=True (a stage-2 model).")
        texts = list(texts)
        first, inverse = distinct(texts)
        ids, mask = tokenize_for_lm(self.lm_tokenizer, [texts[i] for i in first], self.config.lm.max_text_len)
        dev = self.device
        out = []
        with evaluation_mode(self.net, precision):
            for s in range(0, len(first), batch_size):
                out.append(self.net.generate_cells(ids[s:s + batch_size].to(dev),
                                                   mask[s:s + batch_size].to(dev)).float().cpu())
        return torch.cat(out)[inverse].numpy()

    def cut_text(self, text: str, n_tokens: int) -> str:
        """``text`` cut to its first ``n_tokens`` LM tokens (references are compared with generated
        texts of at most that many tokens)."""
        from ..eval.text import cut_to_tokens

        return cut_to_tokens(self.lm_tokenizer, text, n_tokens)

    # ------------------------------------------------------------------------------- persistence
    def save_pretrained(self, path: str | os.PathLike, *, full: bool = False, dtype: str | None = None) -> None:
        """Write ``config.json``, ``vocab.json``, ``model.safetensors`` and ``manifest.json``
        (the base LM is referenced by name unless ``full=True``). ``dtype="float16"`` stores the
        weights in half the space (they load back as the model's dtype)."""
        from .persistence import write_model_folder

        write_model_folder(path, self.config, self.vocab, self.net.trained_state_dict(full=full), full=full,
                           dtype=dtype)

    def push_to_hub(self, repo_id: str, *, branch: str | None = None, private: bool | None = None,
                    token: str | None = None, commit_message: str | None = None, card: str | None = None,
                    dtype: str | None = None, api=None) -> str:
        """Write the model folder (:meth:`save_pretrained`) with its model card (``README.md``:
        ``card``, or :func:`~scmmgpt.models.hub.model_card`'s) and upload it to the Hugging Face Hub
        repository ``repo_id`` as one commit. Returns the commit sha: load exactly these weights with
        ``from_pretrained(f"{repo_id}@{sha}")``. ``api``: a ``huggingface_hub.HfApi``."""
        import tempfile

        from .hub import model_card, push_folder_to_hub

        with tempfile.TemporaryDirectory(prefix="scmmgpt-push-") as tmp:
            folder = Path(tmp) / "model"
            self.save_pretrained(folder, dtype=dtype)
            (folder / "README.md").write_text(card if card is not None else
                                              model_card(self.config, len(self.vocab), repo_id=repo_id))
            return push_folder_to_hub(folder, repo_id, branch=branch, private=private, token=token,
                                      commit_message=commit_message, api=api)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, with_lm: bool | None = None,
                        device: str | torch.device = "cpu", overrides: dict | None = None,
                        revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> "ScMMGPT":
        """Load a model written by :meth:`save_pretrained` (checksums verified): a folder, a model
        shipped with the package (``"pbmc-small"``) or a Hugging Face Hub repository id
        (``"owner/name@<commit>"``, or ``revision=``; read through the Hub cache in ``cache_dir``,
        so ``HF_HUB_OFFLINE=1`` loads a cached revision with no network; :func:`~scmmgpt.models.hub.resolve_model`).
        ``with_lm=None`` loads the LM side when the folder has one; ``True`` on a stage-1 model adds a
        fresh one. ``overrides``: dotted config keys that do not touch stored weights
        (``{"lm.dtype": "bfloat16"}``; :data:`~scmmgpt.models.config.RUNTIME_KEYS`)."""
        from .hub import resolve_model
        from .persistence import LM_SIDE, read_model_folder

        path = resolve_model(path, revision=revision, cache_dir=cache_dir)
        config, vocab, state, info = read_model_folder(path)
        for key, value in (overrides or {}).items():
            section, _, name = key.partition(".")
            if key not in RUNTIME_KEYS:
                raise ConfigError(f"{key!r} cannot change on a saved model (its weights depend on it).")
            config = dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section),
                                                                                   **{name: value})})
        has_lm = any(k.startswith(("lm_proj.", "text_to_cell.")) for k in state)
        with_lm = has_lm if with_lm is None else with_lm
        # a new encoder of the stored shape takes the stored weights: a scGPT checkpoint the model
        # started from (config.cell_checkpoint, kept as a record) is never read again
        model = cls._assemble(config, vocab, CellEncoder(config.cell), with_lm=with_lm,
                              pretrained_encoder=config.cell_checkpoint is not None)
        if not with_lm:
            state = {k: v for k, v in state.items() if not k.startswith(LM_SIDE)}
        expected = model.net.trained_state_dict(full=info.get("full", False))
        if with_lm and not has_lm:
            # an aligned (stage-1) model gains a fresh LM side: stage 2 trains it
            expected = {k: v for k, v in expected.items() if not k.startswith(LM_SIDE)}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(model.net.state_dict()))
        if missing or unexpected:
            raise CheckpointError(f"{path}/model.safetensors does not fit the model: missing {missing[:6]}, "
                                  f"unexpected {unexpected[:6]}.")
        model.net.load_state_dict(state, strict=False)
        model.fresh_parameters = {n for n in model.fresh_parameters if n not in state}
        model.net.to(device).eval()
        return model


def lm_dtype(config: ModelConfig, device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype the base LM's weights are held in on ``device`` (``lm.dtype``, ``auto`` resolved)."""
    if config.lm.dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return getattr(torch, config.lm.dtype)


def lm_attention(device: str | torch.device) -> str:
    """The LM's attention implementation (transformers') on ``device``: ``eager`` on a CPU, ``sdpa``
    elsewhere. On a CPU, eager's explicit matmuls with an fp32 softmax trained stage 2 of ``cpu-small``
    10-20% faster under bf16 than torch's fused CPU kernel (whose bf16 backward is slow; see
    ``modules/attention.py``), and as fast in fp32 and in generation (measured side by side)."""
    return "eager" if torch.device(device).type == "cpu" else "sdpa"


def set_lm_attention(lm: torch.nn.Module | None, device: str | torch.device) -> None:
    """Switch a loaded LM (LoRA-wrapped or not) to :func:`lm_attention` of ``device``."""
    if lm is None:
        return
    base = base_lm(lm)
    if hasattr(base, "set_attn_implementation") and base.config._attn_implementation != lm_attention(device):
        base.set_attn_implementation(lm_attention(device))


def load_lm(config: ModelConfig, device: str | torch.device = "cpu"):
    """Load the causal LM and tokenizer by name/path (weights in :func:`lm_dtype`), wrap with LoRA
    when configured."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.resolve_lm(config.lm.name)
    dtype = lm_dtype(config, device)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=lm_attention(device))
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
