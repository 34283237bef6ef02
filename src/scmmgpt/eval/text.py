"""Text generation metrics (paper §4.2, Table 4): BLEU-2 (Papineni et al. 2002) and ROUGE-2
(Lin 2004) of generated descriptions against the reference descriptions.

Both lower-case and split on non-alphanumeric characters, so punctuation and case do not count.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

__all__ = ["tokenize_words", "bleu2", "rouge2", "text_metrics", "description_metrics", "type_named", "cut_to_tokens"]

_WORD = re.compile(r"[a-z0-9]+(?:[+\-][a-z0-9]*)*")


def tokenize_words(text: str) -> list[str]:
    """Lower-cased word tokens; marker names such as ``cd14+`` or ``cd8-positive`` stay whole."""
    return _WORD.findall(text.lower())


def bleu2(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU with uni- and bi-gram precision weighted 1/2 each and the brevity penalty."""
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

    _check(predictions, references)
    return float(corpus_bleu([[tokenize_words(r)] for r in references], [tokenize_words(p) for p in predictions],
                             weights=(0.5, 0.5), smoothing_function=SmoothingFunction().method1))


def rouge2(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-2 F1 (bigram overlap) over pairs."""
    from rouge_score import rouge_scorer

    _check(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rouge2"], tokenizer=_Tokenizer())
    return float(sum(scorer.score(r, p)["rouge2"].fmeasure for p, r in zip(predictions, references)) / len(predictions))


class _Tokenizer:
    def tokenize(self, text: str) -> list[str]:
        return tokenize_words(text)


def _check(predictions, references) -> None:
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"Need as many predictions as references (>0), got {len(predictions)} and {len(references)}.")


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    return {"bleu2": bleu2(predictions, references), "rouge2": rouge2(predictions, references)}


def description_metrics(predictions: Sequence[str], references: Sequence[str], groups: Sequence | None = None, *,
                        embedder: str = "minilm-l6", device: str = "cpu", seed: int = 0) -> dict[str, float | str]:
    """Table 1 + Table 4 of the paper for generated descriptions against their references:
    BLEU-2, ROUGE-2, MMD and EMD between sentence embeddings of the two sets, and the t-/KS-tests
    that each generated text is closer to its own reference than to another type's
    (:func:`~scmmgpt.eval.embedding.closeness_tests`; ``groups`` = each cell's type). The embedder
    is named in the result (``"embedder"``)."""
    from .embedding import closeness_tests, embed_texts, emd, mmd_rbf

    out: dict[str, float | str] = text_metrics(predictions, references)
    g = embed_texts(predictions, model=embedder, device=device)
    r = embed_texts(references, model=embedder, device=device)
    out.update({"mmd": mmd_rbf(g, r), "emd": emd(g, r), "embedder": str(embedder)})
    if len(predictions) >= 3 and (groups is None or len(set(map(str, groups))) > 1):
        out.update(closeness_tests(g, r, groups, seed=seed))
    return out


def type_named(generated: Sequence[str], type_names: Sequence[str]) -> float:
    """Fraction of generated descriptions that open with the true cell type's name (training
    descriptions start ``"<type name>: <definition>"``)."""
    _check(generated, type_names)
    return float(np.mean([g.strip().lower().startswith(t.strip().lower()) for g, t in zip(generated, type_names)]))


def cut_to_tokens(tokenizer, text: str, n_tokens: int) -> str:
    """``text`` cut to its first ``n_tokens`` tokens of ``tokenizer`` (references are compared with
    generated texts of at most that many tokens)."""
    return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]).strip()
