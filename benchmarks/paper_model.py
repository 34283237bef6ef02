"""The paper's model size for throughput runs, without downloading weights.

Issue 7's GPU configuration: the cell encoder at ``scgpt-whole-human`` (12 layers x 512, 8 heads)
with 2048 genes, a BERT-base-sized Q-Former, and a Llama-architecture LM of at least 1B
parameters. Throughput does not depend on the weights' values, so the BERT and the LM are built
from their configs with random weights and written as ordinary Hugging Face folders (the bundled
MiniLM's and SmolLM2's tokenizers beside them). ``ScMMGPT.build`` then loads them by path, as it
would load the real BiomedBERT or Llama-2.

The LM's sizes are TinyLlama-1.1B's (hidden 2048, 22 layers, 32 heads, 4 key/value heads, MLP
5632) with SmolLM2's 49,152-token vocabulary: about 1.17B parameters.
"""

from __future__ import annotations

import shutil
from pathlib import Path

BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 vocab_size=30522, max_position_embeddings=512, type_vocab_size=2)
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
                tie_word_embeddings=False)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                    "vocab.json", "merges.txt")


def _copy_tokenizer(src: Path, dest: Path) -> None:
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dest / name)


def synthetic_bert(dest: str | Path, *, n_layers: int | None = None) -> Path:
    """A BERT-base-sized model with random weights and the bundled MiniLM's (uncased BERT) tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    from scmmgpt import assets

    dest = Path(dest)
    if (dest / "config.json").is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    cfg = BertConfig(**{**BERT_BASE, **({"num_hidden_layers": n_layers} if n_layers else {})})
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(dest)
    _copy_tokenizer(Path(assets.resolve_bert("minilm-l6")), dest)
    return dest


def synthetic_llama(dest: str | Path, *, n_layers: int | None = None, dtype: str = "bfloat16") -> Path:
    """A Llama-architecture causal LM of TinyLlama-1.1B's sizes (``n_layers`` to shrink it for a smoke
    test), random weights, SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from scmmgpt import assets

    dest = Path(dest)
    if (dest / "config.json").is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    src = Path(assets.resolve_lm("smollm2-135m"))
    tok = AutoTokenizer.from_pretrained(src)
    cfg = LlamaConfig(**{**LLAMA_1B, **({"num_hidden_layers": n_layers} if n_layers else {})},
                      vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cpu"):
        lm = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    lm.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def paper_model_config(assets_dir: str | Path, *, lm_layers: int | None = None, bert_layers: int | None = None,
                       lm_dtype: str = "bfloat16"):
    """A :class:`~scmmgpt.models.config.ModelConfig` of the paper's sizes over the synthetic BERT and LM."""
    from scmmgpt.models.config import ModelConfig

    assets_dir = Path(assets_dir)
    bert = synthetic_bert(assets_dir / f"bert-base-l{bert_layers or 12}", n_layers=bert_layers)
    lm = synthetic_llama(assets_dir / f"llama-1b-l{lm_layers or 22}-{lm_dtype}", n_layers=lm_layers, dtype=lm_dtype)
    cfg = ModelConfig.from_preset("scgpt-whole-human", max_genes=2048)
    cfg.qformer.bert, cfg.qformer.n_query, cfg.qformer.cross_attention_freq = str(bert), 32, 2
    cfg.lm.name, cfg.lm.dtype = str(lm), lm_dtype
    return cfg


def n_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())
