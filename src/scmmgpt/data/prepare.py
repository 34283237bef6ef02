"""Turn an AnnData into model-ready cells: genes mapped to the vocabulary, values per eq. 1.

This is the one place where user matrices are checked. Each problem is a clear
:class:`~scmmgpt.errors.InputDataError` naming the matrix and the fix: empty matrix, NaN/inf,
negative values on a counts path, duplicate gene names, too little of the expression in
vocabulary genes. Cells with zero counts are dropped with a warning giving their number.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, cast

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputDataError
from ..utils.memory import check_fits
from .genes import detect_id_type, detect_organism, to_symbols
from .io import select_matrix
from .values import ValueKindArg, check_finite, detect_value_kind, normalize_total_log1p
from .vocab import GeneVocab

__all__ = ["GeneMatch", "CellData", "map_genes", "prepare_cells"]


@dataclass
class GeneMatch:
    """How the genes of a dataset map onto the model's vocabulary."""

    n_genes: int
    """Genes (columns) in the matrix."""
    n_mapped: int
    """Genes found in the vocabulary."""
    coverage: float
    """Fraction of all expression (sum of values) that falls in mapped genes."""
    organism: str
    id_type: str
    unmapped_examples: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.n_mapped}/{self.n_genes} genes ({self.id_type}, {self.organism}) are in the vocabulary, "
                f"covering {100 * self.coverage:.1f}% of the expression")


@dataclass
class CellData:
    """Cells ready for the model, in vocabulary space.

    Attributes
    ----------
    expr
        ``(n_cells, len(vocab))`` CSR float32 of eq.-1 values (explicit zeros removed).
    measured
        ``(len(vocab),)`` bool: genes this dataset measured (the PCGen loss is masked to them).
    obs_names
        Names of the kept cells.
    cell_index
        Row of each kept cell in the source AnnData.
    value_kind
        What the input values were (``"counts"``, ``"lognorm"``...).
    gene_match
        The :class:`GeneMatch` report.
    n_dropped_empty
        Cells dropped because they had no expression at all.
    """

    expr: sp.csr_matrix
    measured: np.ndarray
    obs_names: np.ndarray
    cell_index: np.ndarray
    value_kind: str
    gene_match: GeneMatch
    n_dropped_empty: int = 0

    def __len__(self) -> int:
        return self.expr.shape[0]

    def n_expressed(self) -> np.ndarray:
        """Number of expressed (non-zero) vocabulary genes per cell."""
        return np.diff(self.expr.indptr)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Vocabulary gene ids and eq.-1 values of the ``i``-th cell's expressed genes."""
        lo, hi = self.expr.indptr[i], self.expr.indptr[i + 1]
        return self.expr.indices[lo:hi], self.expr.data[lo:hi]

    def rows_csr(self, idx: Any) -> sp.csr_matrix:
        """The given cells as a CSR matrix over the vocabulary."""
        return self.expr[np.asarray(idx)]

    def subset(self, rows: np.ndarray) -> "CellData":
        """A :class:`CellData` with the given rows (positions, not obs names)."""
        rows = np.asarray(rows)
        return CellData(self.expr[rows], self.measured, self.obs_names[rows], self.cell_index[rows],
                        self.value_kind, self.gene_match, self.n_dropped_empty)


def map_genes(var_names: Any, vocab: GeneVocab, *, organism: str | None = None,
              symbols: pd.Series | None = None) -> tuple[np.ndarray, str, str]:
    """Vocabulary index of each gene (``-1`` if absent), the organism and the id type.

    Duplicate gene names raise: they would silently merge or split one gene's counts.
    """
    names = pd.Index([str(v) for v in var_names])
    if names.has_duplicates:
        dups = names[names.duplicated()].unique()[:5].tolist()
        raise InputDataError(
            f"{names.duplicated().sum()} duplicate gene names (e.g. {dups}). Make them unique with "
            f"adata.var_names_make_unique() or sum the duplicates before using scmmgpt."
        )
    id_type = detect_id_type(names)
    organism = organism or detect_organism(names)
    if symbols is not None:
        mapped = [None if pd.isna(s) else str(s) for s in symbols]
    else:
        mapped = to_symbols(names, organism)
    ids = vocab.encode(mapped)
    if id_type != "symbol":  # also try the raw names (a vocabulary keyed by Ensembl ids)
        raw = vocab.encode(list(names))
        ids = np.where(ids >= 0, ids, raw)
    model_organism = vocab_organism(vocab)
    if (ids >= 0).any() and model_organism != organism:
        warnings.warn(
            f"The genes look like {_SPECIES.get(organism, organism)} genes but the model's vocabulary is "
            f"{_SPECIES.get(model_organism, model_organism)}: {int((ids >= 0).sum())} of {len(ids)} matched by "
            f"spelling only (symbols compared case-insensitively), which is not orthology, and the model never saw "
            f"this species. Treat the results as approximate; map genes to orthologues first for real use, or pass "
            f"organism= if the detection is wrong.", UserWarning, stacklevel=3)
    return ids, organism, id_type


_SPECIES = {"homo_sapiens": "human (Homo sapiens)", "mus_musculus": "mouse (Mus musculus)"}


def vocab_organism(vocab: GeneVocab) -> str:
    """The organism of a vocabulary's genes (detected once and kept in the vocabulary's own cache field)."""
    org = vocab._organism
    if org is None:
        org = detect_organism([t for t, ok in zip(vocab.tokens, vocab.gene_mask()) if ok])
        vocab._organism = org
    return org


def prepare_cells(
    adata: ad.AnnData,
    vocab: GeneVocab,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    value_kind: ValueKindArg = "auto",
    target_sum: float = 1.0,
    organism: str | None = None,
    gene_symbol_key: str | None = None,
    min_coverage: float = 0.5,
    chunk_size: int = 20_000,
    coverage_fixes: str = "Pass gene_symbol_key=, the right organism=, or lower min_coverage= to proceed.",
) -> CellData:
    """Map genes, check values, normalise (eq. 1) and move cells into vocabulary space.

    Works on in-memory and backed AnnData (rows are read ``chunk_size`` at a time).

    Parameters
    ----------
    adata
        Cells x genes. Gene ids are symbols or Ensembl ids (human or mouse).
    vocab
        The model's gene vocabulary.
    layer, use_raw
        Which matrix to read (default ``adata.X``).
    value_kind
        ``"auto"`` (detect), ``"counts"``, ``"lognorm"``, ``"normalized"`` or ``"as_is"``.
    target_sum
        See :func:`~scmmgpt.data.values.normalize_total_log1p` (1.0 = eq. 1 exactly).
    organism
        ``"homo_sapiens"`` / ``"mus_musculus"``; detected from the gene ids when ``None``.
    gene_symbol_key
        A ``var`` column with gene symbols to use instead of ``var_names``.
    min_coverage
        Fail when mapped genes hold less than this fraction of the expression.
    coverage_fixes
        The remedies the low-coverage error names: a caller with other parameters (``tl.annotate``,
        the CLI) names its own, so the error only suggests what exists where it is raised.

    Raises
    ------
    InputDataError
        Empty matrix, NaN/inf, negatives on a counts path, duplicate genes, low gene coverage.
    """
    X, var_names, where = select_matrix(adata, layer=layer, use_raw=use_raw)
    _check_matrix(adata, X, where)
    symbols = None
    if gene_symbol_key is not None:
        var = adata.raw.var if use_raw else adata.var
        if gene_symbol_key not in var.columns:
            raise InputDataError(f"var has no column {gene_symbol_key!r}. Columns: {list(var.columns)}.")
        symbols = var[gene_symbol_key]
    ids, organism, id_type = map_genes(var_names, vocab, organism=organism, symbols=symbols)
    keep_cols = np.flatnonzero(ids >= 0)
    sub, kind, totals, mapped_totals = _normalise_chunks(X, keep_cols, value_kind, target_sum, chunk_size, where)
    unmapped = [str(v) for v, i in zip(var_names[:2000], ids[:2000]) if i < 0][:10]
    match = GeneMatch(n_genes=X.shape[1], n_mapped=int(keep_cols.size), coverage=mapped_totals / totals,
                      organism=organism, id_type=id_type, unmapped_examples=unmapped)
    _check_coverage(match, min_coverage, where, coverage_fixes)
    expr, keep_rows, measured = _into_vocabulary(sub, ids[keep_cols], len(vocab), where)
    return CellData(expr=expr, measured=measured, obs_names=np.asarray(adata.obs_names)[keep_rows],
                    cell_index=keep_rows, value_kind=kind, gene_match=match,
                    n_dropped_empty=X.shape[0] - keep_rows.size)


def _check_matrix(adata: ad.AnnData, X: Any, where: str) -> None:
    """Refuse an empty or non-numeric matrix; warn about duplicate cell names."""
    n_cells, n_genes = X.shape
    if n_cells == 0 or n_genes == 0:
        raise InputDataError(f"{where} is empty ({n_cells} cells x {n_genes} genes); nothing to do.")
    dtype = getattr(X, "dtype", None)
    if dtype is not None and np.dtype(dtype).kind not in "fiub":
        raise InputDataError(f"{where} has dtype {dtype}; expected numbers (counts). Convert it first, e.g. "
                             "adata.X = adata.X.astype('float32'), after checking why it holds non-numbers.")
    if not pd.Index(adata.obs_names).is_unique:
        warnings.warn(f"{int(pd.Index(adata.obs_names).duplicated().sum())} duplicate cell names; results are "
                      "written by position, but run adata.obs_names_make_unique() so they can be told apart.",
                      UserWarning, stacklevel=3)


def _normalise_chunks(X: Any, keep_cols: np.ndarray, value_kind: str, target_sum: float, chunk_size: int,
                      where: str) -> tuple[sp.csr_matrix, str, float, float]:
    """One pass over row chunks: detect the value kind on the first chunk, check and normalise
    (eq. 1) each, keep the mapped columns. Returns ``(cells x mapped genes, kind, total expression,
    expression in mapped genes)``."""
    n_cells, n_genes = X.shape
    kind = value_kind
    blocks: list[sp.csr_matrix] = []
    totals = mapped_totals = 0.0
    if not sp.issparse(X) and not isinstance(X, np.ndarray):
        # a dense matrix read from disk (backed): each chunk is densely in memory; keep it near 256 MiB
        itemsize = np.dtype(getattr(X, "dtype", None) or np.float32).itemsize
        chunk_size = max(1, min(chunk_size, (256 << 20) // max(1, n_genes * itemsize)))
    for start in range(0, n_cells, chunk_size):
        chunk = X[start:start + chunk_size]
        chunk = sp.csr_matrix(chunk) if not sp.issparse(chunk) else chunk.tocsr()
        check_finite(chunk, where=where)
        if kind == "auto":
            kind = detect_value_kind(chunk)
        if kind in ("counts", "lognorm", "normalized") and chunk.data.size and chunk.data.min() < 0:
            raise InputDataError(
                f"{where} holds negative values but was treated as {kind}. Pass raw counts "
                f"(layer= / use_raw=True) or value_kind='as_is'."
            )
        norm, kind = normalize_total_log1p(chunk, value_kind=cast(ValueKindArg, kind), target_sum=target_sum,
                                           where=where)
        raw_abs = abs(chunk) if kind != "lognorm" else chunk.copy()
        if kind == "lognorm":
            np.expm1(raw_abs.data, out=raw_abs.data)
        totals += float(raw_abs.sum())
        mapped_totals += float(raw_abs[:, keep_cols].sum()) if keep_cols.size else 0.0
        blocks.append(norm[:, keep_cols])
        if start == 0 and n_cells > chunk_size:
            # the cells are kept in memory as CSR (float32 value + int32 index per non-zero), built twice
            nnz = blocks[0].nnz / blocks[0].shape[0] * n_cells
            check_fits(nnz * 8 * 2.5, f"The prepared cells of {where} ({n_cells} cells, about "
                                      f"{nnz / n_cells:.0f} non-zero values each)",
                       "Process the cells in parts (e.g. adata[:100_000] from a backed file, then the next part) "
                       "or on a machine with more memory.")
    if totals == 0:
        raise InputDataError(f"Every cell of {where} is empty (all values are 0): there is no expression to use. "
                             "Check that the right matrix was read (layer= / use_raw=True).")
    sub = sp.vstack(blocks).tocsr() if len(blocks) > 1 else blocks[0].tocsr()
    return sub, kind, totals, mapped_totals


def _check_coverage(match: GeneMatch, min_coverage: float, where: str, fixes: str) -> None:
    """Refuse data whose genes are not (or too little) in the vocabulary."""
    if match.n_mapped == 0:
        raise InputDataError(
            f"None of the {match.n_genes} genes of {where} is in the model's vocabulary (e.g. "
            f"{match.unmapped_examples[:5]}). Check the organism and the gene ids (symbols or Ensembl), or pass "
            f"gene_symbol_key= a var column of gene symbols."
        )
    if match.coverage < min_coverage:
        raise InputDataError(
            f"Only {match.summary()}, below min_coverage={min_coverage:.0%}. Unmapped examples: "
            f"{match.unmapped_examples[:5]}. {fixes}"
        )


def _into_vocabulary(sub: sp.csr_matrix, col_map: np.ndarray, vocab_size: int, where: str
                     ) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Mapped columns -> vocabulary indices (two source genes with one symbol are summed); cells
    with no expression left are dropped with a warning. Returns ``(expr, kept rows, measured)``."""
    n_cells = sub.shape[0]
    coo = sub.tocoo()
    expr = sp.csr_matrix((coo.data, (coo.row, col_map[coo.col])), shape=(n_cells, vocab_size), dtype=np.float32)
    expr.sum_duplicates()
    expr.eliminate_zeros()
    keep_rows = np.flatnonzero(np.diff(expr.indptr) > 0)
    dropped = n_cells - keep_rows.size
    if keep_rows.size == 0:
        raise InputDataError(f"Every cell of {where} has zero expression in vocabulary genes; nothing to do.")
    if dropped:
        warnings.warn(f"Dropped {dropped} of {n_cells} cells with no expression in vocabulary genes.", stacklevel=3)
        expr = expr[keep_rows]
    measured = np.zeros(vocab_size, dtype=bool)
    measured[col_map] = True
    return expr, keep_rows, measured
