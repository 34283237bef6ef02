"""Baselines the benchmarks run beside scMMGPT."""

from .cell_sentence import CellSentenceConfig, CellSentenceLM, RankToExpression, cell_sentences
from .reference import classifier_scores, logistic_regression_reference, logistic_scores

__all__ = ["CellSentenceConfig", "CellSentenceLM", "RankToExpression", "cell_sentences", "classifier_scores", "logistic_regression_reference",
           "logistic_scores"]
