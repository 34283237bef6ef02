"""Typed configuration of the scMMGPT model (paper §3.2, Table 6). Serialised as JSON beside weights."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import ConfigError, check_config_keys
from ..modules.cell_encoder import CellEncoderConfig

__all__ = ["CellEncoderConfig", "QFormerConfig", "LMConfig", "TextToCellConfig", "ModelConfig", "CELL_ENCODER_PRESETS",
           "RUNTIME_KEYS"]


#: Named cell encoder sizes. ``scgpt-whole-human`` is the paper's (12 x 512, 8 heads, ~51M params).
CELL_ENCODER_PRESETS: dict[str, dict] = {
    # fresh encoders for CPUs: no dropout on attention weights (it forces the unfused CPU kernel)
    "tiny": dict(d_model=32, n_layers=2, n_heads=2, d_ff=64, attn_dropout=0.0),
    "small": dict(d_model=256, n_layers=4, n_heads=4, d_ff=512, attn_dropout=0.0),
    "scgpt-whole-human": dict(d_model=512, n_layers=12, n_heads=8, d_ff=512),
}


@dataclass
class QFormerConfig:
    """Cell-to-text projector: a BLIP-2 Q-Former initialised from a BERT (Li et al. 2023)."""

    bert: str = "minilm-l6"
    """BERT to initialise from: ``minilm-l6`` (bundled) or any HF BERT name/path (BiomedBERT)."""
    n_query: int = 32
    """Learned query tokens."""
    cross_attention_freq: int = 2
    """Cross-attention to the cell encoder in every ``cross_attention_freq``-th layer."""
    embed_dim: int = 256
    """Width of the L2-normalised contrastive features (CTC)."""
    max_text_len: int = 128
    """Descriptions are truncated to this many BERT tokens."""
    n_layers: int | None = None
    """Use only the first ``n_layers`` BERT layers (``None``: all)."""
    init_temperature: float = 0.07
    """Initial CTC temperature (learnable, clamped to [0.001, 0.5])."""
    text_pooling: Literal["mean", "cls"] = "mean"
    """How the text tower's token states become the CTC text feature: ``cls``, BLIP-2's ``[CLS]``
    output, or ``mean``, the mean over the description's tokens (how sentence-transformers trained
    the bundled MiniLM). With MiniLM's ``[CLS]`` every PBMC description starts at cosine 0.99999 to
    every other, so CTC's gradient vanishes and stage 1 sits on its ln(B) plateau; mean-pooled
    states of the same texts have cosine ~0.87 (``benchmarks/results/recipe/``). Saved models
    without this key were trained with ``cls`` and load with it."""
    dropout: float | None = None
    """Hidden and attention dropout (``None``: the BERT's own, 0.1). 0 makes short CPU runs ~1.5x
    faster (no dropout masks, fused attention)."""
    train_word_embeddings: bool = True
    """Whether training updates the BERT's token embeddings. ``False`` keeps them as the BERT has
    them: a saved model then does not store them (MiniLM's are 11.7M parameters, 47 MB in fp32, a
    third of a small model) and takes them from the BERT when it loads."""

    def __post_init__(self) -> None:
        if self.n_query < 1 or self.cross_attention_freq < 1 or self.embed_dim < 1:
            raise ConfigError("n_query, cross_attention_freq and embed_dim must be positive.")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"qformer.dropout must be in [0, 1), got {self.dropout}.")
        if self.text_pooling not in ("mean", "cls"):
            raise ConfigError(f"qformer.text_pooling must be 'mean' or 'cls', got {self.text_pooling!r}.")


@dataclass
class LMConfig:
    """Decoder-only text LM (paper: Llama-2 7B) tuned with LoRA (Hu et al. 2022)."""

    name: str = "smollm2-135m"
    """``smollm2-135m`` (bundled) or any HF causal LM name/path (``TinyLlama/TinyLlama-1.1B-Chat-v1.0``)."""
    lora: bool = True
    """Tune with LoRA; otherwise the LM is frozen."""
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_target_modules: list[str] | None = None
    """Module names for LoRA (``None``: peft's default for the architecture)."""
    max_text_len: int = 96
    """Description tokens kept for CDGen/PCGen."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype of the frozen base LM (its LoRA adapters stay fp32). ``auto``: bfloat16 where
    the device the model is loaded on has native bf16 matmul (:func:`scmmgpt.utils.precision.native_bf16`),
    else float32; training resolves it to its ``train.precision``."""
    prompt: str = "Cell:"
    """Text before the cell tokens in CDGen."""
    answer_prompt: str = " Description:"
    """Text between the cell tokens and the description."""

    def __post_init__(self) -> None:
        if self.lora and (self.lora_r < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1):
            raise ConfigError("LoRA needs lora_r >= 1, lora_alpha > 0 and 0 <= lora_dropout < 1.")


@dataclass
class TextToCellConfig:
    """Text-to-cell projector (paper Table 6: 1 cross-attention layer, 4 heads) and cell decoder."""

    n_dummy_tokens: int = 8
    """Dummy cell tokens appended after the description."""
    n_cell_queries: int = 16
    """Learned cell-space queries that cross-attend to the LM states of the dummy tokens."""
    n_layers: int = 1
    n_heads: int = 4
    decoder_dim: int = 64
    """Width of the per-gene attention read-out of the cell decoder."""
    pooled_dim: int = 64
    """Rank of the decoder's pooled read-out of all cell features (0: attention read-out only)."""
    gene_chunk: int = 8192
    """Genes decoded per chunk (bounds memory for a 60k-gene vocabulary)."""
    read_text: bool = True
    """The projector cross-attends to the LM states of the description tokens as well as of the
    dummy tokens. ``False`` is the paper's dummy-only read-out: with a frozen LM the dummy states
    hardly differ between descriptions (cosine ~0.97 across PBMC types with SmolLM2) and
    generation stays at the average cell for many steps."""

    def __post_init__(self) -> None:
        if min(self.n_dummy_tokens, self.n_cell_queries, self.n_layers, self.n_heads, self.decoder_dim) < 1:
            raise ConfigError("text-to-cell sizes must be positive.")
        if self.pooled_dim < 0:
            raise ConfigError("text_to_cell.pooled_dim must be >= 0 (0 turns the pooled read-out off).")


#: Config keys (``section.name``) that do not change the shape or meaning of stored weights: a saved
#: model may be loaded with other values (``ScMMGPT.from_pretrained(overrides=)``, ``init`` runs).
RUNTIME_KEYS = frozenset({"lm.dtype", "text_to_cell.gene_chunk", "cell.token_dropout"})


@dataclass
class ModelConfig:
    """The whole scMMGPT model."""

    cell: CellEncoderConfig = field(default_factory=CellEncoderConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    text_to_cell: TextToCellConfig = field(default_factory=TextToCellConfig)
    max_genes: int = 2048
    """Top expressed genes kept per cell (paper: 2048)."""
    target_sum: float = 1e4
    """Library size in eq. 1: ``log(1 + target_sum * x / sum x)``. 1.0 is eq. 1 verbatim; 1e4
    (log-CP10k) keeps values O(1) so the value encoder and the PCGen loss are well scaled."""
    n_input_genes: int | None = None
    """Size of the input panel (:mod:`scmmgpt.data.panel`): a fresh model's first training run
    picks the ``n_input_genes`` most variable genes of its training cells (per source dataset), and
    cells are then always tokenised from those genes, with eq. 1 re-applied over them. ``None``, or
    training cells whose datasets measure no more genes than that: every gene."""
    input_genes: list[str] | None = None
    """The input panel chosen (gene tokens, most variable first); written by training, kept in the
    saved model. ``None``: every gene."""
    trained_types: list[str] | None = None
    """CL ids of the cell types whose descriptions the model was trained on, recorded by training
    (``fit(train_types=...)``). Zero-shot scores back off to them
    (:func:`~scmmgpt.data.label_texts.backoff_labels`)."""
    trained_losses: list[str] | None = None
    """The losses the model has been trained with, over all of its training runs (recorded by
    ``fit``; ``train.losses`` may leave some out). CTM re-ranking (``alpha > 0``) needs ``ctm``
    among them. ``None``: not recorded yet (a new model, or one saved before 2026-12-07, whose record
then starts from the losses whose own weights it holds trained; ``ScMMGPT.record_trained_losses``)."""
    novelty_gate: dict | None = None
    """Written by fine-tuning (``scmmgpt finetune --task annotate``): the novelty gate of
    :mod:`scmmgpt.models.gate` (the fine-tuning types' centroids in the starting model's embedding,
    and a threshold), read by ``tl.annotate(..., zero_shot_model=...)``. ``None``: no gate."""
    vocab: str | None = None
    """Gene vocabulary of a new model: ``None``, the training data's own genes; ``"census"``, the
    CELLxGENE census vocabulary of scGPT's whole-human model (60,697 tokens at its indices, for a
    model meant to take real scGPT weights or to read any human dataset); or a ``vocab.json`` path
    (:meth:`~scmmgpt.data.vocab.GeneVocab.named`). A saved model keeps its own ``vocab.json``."""
    cell_checkpoint: str | None = None
    """A scGPT checkpoint directory (``args.json``, ``vocab.json``, ``best_model.pt``) to start the
    cell encoder from: its sizes, pad value, value binning and gene vocabulary replace ``cell`` and
    the data's own genes. Kept in saved models as a record; loading a saved model never reads it."""

    def __post_init__(self) -> None:
        for name, typ in (("cell", CellEncoderConfig), ("qformer", QFormerConfig), ("lm", LMConfig),
                          ("text_to_cell", TextToCellConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, typ(**value))
        if self.max_genes < 1:
            raise ConfigError("max_genes must be >= 1.")
        if self.target_sum <= 0:
            raise ConfigError("target_sum must be > 0.")
        if self.n_input_genes is not None and self.n_input_genes < 1:
            raise ConfigError(f"n_input_genes must be >= 1 or null, got {self.n_input_genes}.")
        if self.vocab is not None and self.cell_checkpoint is not None:
            raise ConfigError(f"model.vocab={self.vocab!r} and model.cell_checkpoint were both given; the scGPT "
                              "checkpoint brings its own vocabulary (its vocab.json): drop model.vocab.")

    @classmethod
    def from_preset(cls, cell: str = "small", **kwargs) -> "ModelConfig":
        """A config with a named cell encoder size (``tiny``, ``small``, ``scgpt-whole-human``)."""
        if cell not in CELL_ENCODER_PRESETS:
            raise ConfigError(f"Unknown cell encoder preset {cell!r}; choose from {list(CELL_ENCODER_PRESETS)}.")
        cell_cfg = CellEncoderConfig(**CELL_ENCODER_PRESETS[cell], **kwargs.pop("cell_kwargs", {}))
        return cls(cell=cell_cfg, **kwargs)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        check_config_keys(cls, d, "model")
        return cls(**d)

    def save(self, path: str | os.PathLike) -> None:
        from ..utils.io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelConfig":
        """A saved model's config. Keys added since a model was saved take the value its weights were
        trained with, not today's default (``qformer.text_pooling``: ``cls``)."""
        d = json.loads(Path(path).read_text())
        if isinstance(d.get("qformer"), dict):
            d["qformer"].setdefault("text_pooling", "cls")
        return cls.from_dict(d)
