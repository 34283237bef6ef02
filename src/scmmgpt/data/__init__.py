"""Data pipeline: reading, value checks and eq.-1 normalisation, gene mapping, vocabulary,
descriptions, tokenisation, datasets and collation."""

from .dataset import CellBatch, CellTextCollator, CellTextDataset, LengthBucketSampler, stratified_split, tokenize_cell
from .descriptions import DescriptionBuilder, DescriptionConfig, is_ambiguous
from .io import read_h5ad, select_matrix
from .prepare import CellData, GeneMatch, prepare_cells
from .values import detect_value_kind, normalize_total_log1p, quantile_bin
from .vocab import GeneVocab

__all__ = [
    "CellBatch", "CellTextCollator", "CellTextDataset", "LengthBucketSampler", "stratified_split", "tokenize_cell",
    "DescriptionBuilder", "DescriptionConfig", "is_ambiguous", "read_h5ad", "select_matrix", "CellData",
    "GeneMatch", "prepare_cells", "detect_value_kind", "normalize_total_log1p", "quantile_bin", "GeneVocab",
]
