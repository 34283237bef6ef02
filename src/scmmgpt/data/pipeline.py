"""The data pipeline end to end on one file: read, check, map genes, normalise, describe, tokenise."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .dataset import CellTextDataset, stratified_split
from .descriptions import DescriptionBuilder, DescriptionConfig
from .genes import to_symbols
from .io import read_h5ad, select_matrix
from .prepare import prepare_cells
from .vocab import GeneVocab

__all__ = ["check_dataset", "vocab_from_adata"]


def vocab_from_adata(adata: Any, *, layer: str | None = None, use_raw: bool = False) -> GeneVocab:
    """A vocabulary of the dataset's own genes (Ensembl ids translated to symbols)."""
    _, var_names, _ = select_matrix(adata, layer=layer, use_raw=use_raw)
    return GeneVocab.from_genes(g for g in to_symbols(var_names) if g)


def check_dataset(path: str | os.PathLike[str], *, layer: str | None = None, use_raw: bool = False,
                  label_key: str = "cell_type", backed: bool = False, max_genes: int = 2048,
                  vocab: GeneVocab | None = None) -> dict[str, Any]:
    """Run the data pipeline on ``path`` and report what it found.

    Returns
    -------
    dict with ``cells``, ``genes``, ``value_kind``, ``gene_match``, ``dropped_empty_cells``,
    ``ambiguous_labels``, ``labels`` (counts), ``split`` sizes, ``mean_tokens`` and two
    ``example_descriptions``.
    """
    adata = read_h5ad(path, backed=backed)
    if vocab is None:
        vocab = vocab_from_adata(adata, layer=layer, use_raw=use_raw)
    cells = prepare_cells(adata, vocab, layer=layer, use_raw=use_raw)
    obs = adata.obs.iloc[cells.cell_index]
    desc = DescriptionBuilder(DescriptionConfig(cell_type_key=label_key)).build(obs)
    ds = CellTextDataset(cells, list(desc["description"]), cls_id=vocab.cls_id, max_genes=max_genes)
    split = stratified_split(desc["cell_type"].to_numpy(), exclude=desc["ambiguous"].to_numpy())
    labels = desc.loc[~desc["ambiguous"], "cell_type"].value_counts()
    examples = desc.loc[~desc["ambiguous"], "description"].drop_duplicates().head(2).tolist()
    return {
        "file": str(path),
        "cells": int(adata.n_obs),
        "genes": int(adata.n_vars),
        "value_kind": cells.value_kind,
        "gene_match": cells.gene_match.summary(),
        "dropped_empty_cells": int(cells.n_dropped_empty),
        "ambiguous_labels": int(desc["ambiguous"].sum()),
        "labels": {str(k): int(v) for k, v in labels.items()},
        "split": {k: int(len(v)) for k, v in split.items()},
        "mean_tokens": float(np.mean(ds.lengths())),
        "example_descriptions": examples,
    }
