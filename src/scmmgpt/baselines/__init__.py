"""Baselines the benchmarks run beside scMMGPT."""

from .cell_sentence import CellSentenceConfig, CellSentenceLM, RankToExpression, cell_sentences

__all__ = ["CellSentenceConfig", "CellSentenceLM", "RankToExpression", "cell_sentences"]
