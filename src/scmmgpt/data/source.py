"""The interface every cell collection offers the datasets, training and inference."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp

from .prepare import GeneMatch

__all__ = ["CellSource"]


@runtime_checkable
class CellSource(Protocol):
    """Cells in a gene vocabulary's space, each a sparse row of eq.-1 values.

    Implemented by :class:`~scmmgpt.data.prepare.CellData` (in memory, from an AnnData) and
    :class:`~scmmgpt.data.shards.ShardedCells` (memory-mapped shard files, for data larger than RAM).
    """

    measured: np.ndarray
    """(V,) bool: genes the data measured (the PCGen loss is masked to them)."""
    value_kind: str
    """What the input values were (``"counts"``, ``"lognorm"``...)."""
    gene_match: GeneMatch | None
    """How the data's genes mapped into the vocabulary."""

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

    def rows_csr(self, idx) -> sp.csr_matrix:
        """The given cells as a CSR matrix over the vocabulary."""
        ...

    def subset(self, rows: np.ndarray) -> "CellSource":
        """The cells at positions ``rows``."""
        ...
