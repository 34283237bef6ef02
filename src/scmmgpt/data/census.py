"""CELLxGENE Census / any TileDB-SOMA experiment as a data source.

The paper pre-trains on Census cells filtered to human, 10x assays and primary data (each cell
once, no duplicates across collections). :class:`CensusFilter` builds that SOMA ``value_filter``
(plus optional tissue / cell type / disease terms); :func:`soma_blocks` streams the matching cells
as AnnData blocks of ``block_size`` cells, so a query larger than memory never loads at once; and
``write_shards(..., soma=SomaSource(...))`` turns them into training shards.

``uri`` is a local or cloud TileDB-SOMA experiment (for Census, ``census_data/homo_sapiens`` inside
a Census release; ``cellxgene_census.open_soma()`` gives the release URI). Tested offline against
a local experiment written with ``tiledbsoma.io.from_anndata``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from ..errors import AssetMissingError, InputDataError

if TYPE_CHECKING:
    import anndata as ad

__all__ = ["TENX_ASSAYS", "CensusFilter", "SomaSource", "soma_joinids", "soma_blocks"]

#: Census ``assay`` values of 10x Genomics chemistries (the paper keeps 10x data only).
TENX_ASSAYS = ("10x 3' v1", "10x 3' v2", "10x 3' v3", "10x 5' v1", "10x 5' v2", "10x 3' transcription profiling",
               "10x 5' transcription profiling", "10x multiome", "10x gene expression flex")


def _soma() -> Any:
    try:
        import tiledbsoma
    except ImportError:
        raise AssetMissingError("Reading TileDB-SOMA / Census needs tiledbsoma: pip install 'scmmgpt[census]'.") from None
    return tiledbsoma


def _quote(v: str) -> str:
    return "'" + str(v).replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass
class CensusFilter:
    """Which cells to take. Every given term narrows the selection (``and``)."""

    tenx_only: bool = True
    """Keep only 10x assays (:data:`TENX_ASSAYS`)."""
    primary_only: bool = True
    """Keep only ``is_primary_data == True``: each cell once, as the paper de-duplicates."""
    tissue: Sequence[str] | None = None
    """``tissue_general`` values (e.g. ``["lung", "blood"]``)."""
    cell_type: Sequence[str] | None = None
    assay: Sequence[str] | None = None
    """Exact ``assay`` values (replaces the 10x list)."""
    disease: Sequence[str] | None = None
    extra: str | None = None
    """Any further SOMA value-filter expression, e.g. ``"sex == 'female'"``."""
    tissue_column: str = "tissue_general"

    def value_filter(self) -> str | None:
        terms = []
        if self.primary_only:
            terms.append("is_primary_data == True")
        assays = self.assay if self.assay is not None else (TENX_ASSAYS if self.tenx_only else None)
        for col, values in (("assay", assays), (self.tissue_column, self.tissue), ("cell_type", self.cell_type),
                            ("disease", self.disease)):
            if values is not None:
                values = [values] if isinstance(values, str) else list(values)
                if not values:
                    raise InputDataError(f"An empty list for {col!r} selects no cells.")
                terms.append(f"{col} in [{', '.join(_quote(v) for v in values)}]")
        if self.extra:
            terms.append(f"({self.extra})")
        return " and ".join(terms) or None


@dataclass(frozen=True)
class SomaSource:
    """A SOMA experiment and the cells to read from it."""

    uri: str
    filter: CensusFilter = field(default_factory=CensusFilter)
    measurement: str = "RNA"
    layer: str = "raw"
    """X layer with counts (Census: ``raw``)."""
    gene_column: str | None = None
    """var column used as gene names (default: ``feature_id`` (Census, Ensembl), else the index)."""


def _open(uri: str) -> Any:
    soma = _soma()
    try:
        return soma.Experiment.open(uri)
    except Exception as exc:   # tiledbsoma raises several types for a wrong URI
        raise InputDataError(f"Could not open the SOMA experiment {uri!r}: {type(exc).__name__}: {exc}") from None


def soma_joinids(src: SomaSource, *, allow_empty: bool = True) -> np.ndarray:
    """``soma_joinid`` of every cell that passes the filter (sorted); with ``allow_empty=False`` an
    empty selection is an :class:`InputDataError`."""
    soma = _soma()
    with _open(src.uri) as exp:
        cols = set(exp.obs.schema.names)
        flt = src.filter.value_filter()
        needed = {"is_primary_data"} if src.filter.primary_only else set()
        if src.filter.tenx_only or src.filter.assay is not None:
            needed.add("assay")
        if src.filter.tissue is not None:
            needed.add(src.filter.tissue_column)
        missing = sorted(needed - cols)
        if missing:
            raise InputDataError(f"The experiment's obs lacks {missing} needed by the filter; drop those terms "
                                 "(e.g. CensusFilter(tenx_only=False, primary_only=False)).")
        with exp.axis_query(src.measurement, obs_query=soma.AxisQuery(value_filter=flt)) as q:
            ids = q.obs_joinids().to_numpy()
    if len(ids) == 0 and not allow_empty:
        raise InputDataError(f"No cell of {src.uri} passes the filter {flt!r}.")
    return np.sort(ids)


def _gene_column(var_columns: Sequence[str], wanted: str | None) -> str | None:
    """The var column of gene ids: ``wanted``, else ``feature_id`` (Census, Ensembl), else ``gene_ids``,
    else ``feature_name``; ``None``: the index already holds them (``var_id`` of ``from_anndata``)."""
    if wanted is not None:
        if wanted not in var_columns:
            raise InputDataError(f"var has no column {wanted!r}; columns: {list(var_columns)}.")
        return wanted
    for c in ("feature_id", "gene_ids", "feature_name"):
        if c in var_columns:
            return c
    return None


def read_soma_block(src: SomaSource, joinids: np.ndarray) -> ad.AnnData:
    """The given cells (in ``soma_joinid`` order) as an AnnData: counts in ``X``, gene ids as
    ``var_names``, ``obs_id`` (or the join id) as ``obs_names``."""
    soma = _soma()
    with _open(src.uri) as exp:
        with exp.axis_query(src.measurement, obs_query=soma.AxisQuery(coords=(np.asarray(joinids, np.int64),))) as q:
            adata = q.to_anndata(X_name=src.layer)
    col = _gene_column(list(adata.var.columns), src.gene_column)
    if col is not None:
        adata.var_names = adata.var[col].astype(str).to_numpy()
    return adata


def soma_blocks(src: SomaSource, block_size: int = 50_000) -> Iterator[ad.AnnData]:
    """Stream the filtered cells as AnnData blocks of at most ``block_size`` cells."""
    ids = soma_joinids(src, allow_empty=False)
    for s in range(0, len(ids), block_size):
        yield read_soma_block(src, ids[s:s + block_size])
