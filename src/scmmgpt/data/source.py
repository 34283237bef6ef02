"""The interface every cell collection offers the datasets, training and inference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp

from .prepare import GeneMatch

__all__ = ["CellSource", "MeasuredGenes", "measured_genes"]


@runtime_checkable
class CellSource(Protocol):
    """Cells in a gene vocabulary's space, each a sparse row of eq.-1 values.

    Implemented by :class:`~scmmgpt.data.prepare.CellData` (in memory, from an AnnData) and
    :class:`~scmmgpt.data.shards.ShardedCells` (memory-mapped shard files, for data larger than RAM).
    """

    @property
    def measured(self) -> np.ndarray:
        """(V,) bool: genes the data measured (the PCGen loss is masked to them)."""
        ...

    @property
    def value_kind(self) -> str:
        """What the input values were (``"counts"``, ``"lognorm"``...)."""
        ...

    @property
    def gene_match(self) -> GeneMatch | None:
        """How the data's genes mapped into the vocabulary."""
        ...

    @property
    def obs_names(self) -> np.ndarray:
        """Name of each cell."""
        ...

    def __len__(self) -> int: ...

    def n_expressed(self) -> np.ndarray:
        """(N,) number of expressed vocabulary genes per cell."""
        ...

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Vocabulary gene ids and eq.-1 values of the ``i``-th cell's expressed genes."""
        ...

    def rows_csr(self, idx: Any) -> sp.csr_matrix:
        """The given cells as a CSR matrix over the vocabulary."""
        ...

    def subset(self, rows: np.ndarray) -> "CellSource":
        """The cells at positions ``rows``."""
        ...


@dataclass(frozen=True)
class MeasuredGenes:
    """Which genes each cell's source dataset measured: the PCGen loss and the generation metrics
    score a cell only on those (a corpus joins datasets with different gene panels, and a gene one
    dataset never measured is not a zero in its cells)."""

    masks: np.ndarray
    """(G, V) bool: the genes of each source."""
    group: np.ndarray
    """(N,) int: the source of each cell."""
    names: tuple[str, ...]
    """Name of each source."""

    @property
    def union(self) -> np.ndarray:
        """(V,) bool: genes any source measured."""
        return np.asarray(self.masks.any(axis=0), dtype=bool)


def measured_genes(cells: CellSource) -> MeasuredGenes:
    """Per-source measured genes of ``cells``: a shard folder knows the source file of each shard
    (:meth:`~scmmgpt.data.shards.ShardedCells.measured_genes`); any other source is one dataset."""
    by_source = getattr(cells, "measured_genes", None)
    if callable(by_source):
        result = by_source()
        assert isinstance(result, MeasuredGenes)
        return result
    return MeasuredGenes(np.asarray(cells.measured, dtype=bool)[None], np.zeros(len(cells), dtype=np.int64),
                         ("data",))
