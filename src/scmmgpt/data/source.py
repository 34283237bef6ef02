"""The interface every cell collection offers the datasets, training and inference."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

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
