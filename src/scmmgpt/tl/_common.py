"""Shared plumbing of the ``tl`` functions: model resolution, AnnData -> model cells with the gene
coverage report, batched iteration with progress, and the ``copy`` convention."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ..data.dataset import CellBatch, CellTextDataset
from ..data.prepare import CellData, GeneMatch
from ..errors import ConfigError, InputDataError

logger = logging.getLogger("scmmgpt")

COVERAGE_WARN = 0.9
"""Below this fraction of the expression in vocabulary genes, the ``tl`` functions warn."""


class GeneCoverageWarning(UserWarning):
    """Part of the data's expression falls in genes the model does not know."""


class UntrainedWarning(UserWarning):
    """The model part a function needs was never trained (its outputs are meaningless)."""


def resolve_model(model, *, device: str | torch.device | None = None, with_lm: bool | None = None):
    """An :class:`~scmmgpt.models.scmmgpt.ScMMGPT`, given one or a folder written by ``save_pretrained``.

    A folder is loaded onto ``device``. A model object is used where it is: the caller's model is
    never moved behind its back, so a ``device`` other than the model's is an error."""
    from ..models.scmmgpt import ScMMGPT

    if isinstance(model, (str, os.PathLike)):
        return ScMMGPT.from_pretrained(model, with_lm=with_lm, device=device or "cpu")
    if not isinstance(model, ScMMGPT):
        raise ConfigError(f"model must be an ScMMGPT or the path of a saved model folder, not {type(model).__name__}.")
    want, have = (torch.device(device), model.device) if device is not None else (None, None)
    if want is not None and (want.type != have.type or want.index not in (None, have.index)):
        raise ConfigError(f"The model is on {model.device}, not {device}: move it first (model.to({str(device)!r})) "
                          "or pass the model's folder, which is loaded onto device=.")
    return model


def require_lm(model, what: str, parts: tuple[str, ...]) -> None:
    """Error without an LM; warn when the weights ``what`` needs are still at initialisation."""
    if model.lm is None:
        raise ConfigError(f"{what} needs the text LM: load the model with with_lm=True (a stage-2 model).")
    fresh = [n for n in model.fresh_parameters if n.startswith(parts)]
    if fresh:
        warnings.warn(f"{what}: this model's {parts[0].rstrip('.')} weights were never trained (run "
                      "`scmmgpt pretrain --stage 2` first); the output is meaningless.", UntrainedWarning, stacklevel=3)


@dataclass
class ModelCells:
    """An AnnData's cells in the model's vocabulary space."""

    cells: CellData
    dataset: CellTextDataset
    rows: np.ndarray
    """Row in the AnnData of each kept cell (empty cells are dropped)."""
    n_obs: int
    min_coverage: float = 0.5
    """The least gene coverage the call accepted."""

    @property
    def gene_match(self) -> GeneMatch:
        return self.cells.gene_match

    def report(self) -> dict:
        """What went into the model: for ``.uns``."""
        m = self.gene_match
        return {"n_genes": m.n_genes, "n_genes_in_vocab": m.n_mapped, "gene_coverage": round(m.coverage, 4),
                "min_coverage": self.min_coverage,
                "value_kind": self.cells.value_kind, "n_empty_cells": int(self.n_obs - len(self.rows))}


COVERAGE_FIXES = ("Pass gene_symbol_key= (a var column of gene symbols), or lower min_coverage= to proceed "
                  "(CLI: --gene-symbol-key, --min-coverage); or use a model whose vocabulary covers these genes.")
"""The remedies a low gene coverage error names in the ``tl`` verbs and the CLI: both accept them."""


def model_cells(adata, model, *, layer: str | None = None, use_raw: bool = False, gene_symbol_key: str | None = None,
                min_coverage: float = 0.5, with_targets: bool = False, stacklevel: int = 3) -> ModelCells:
    """Map ``adata`` into ``model``'s vocabulary; log and (when low) warn the gene coverage; warn
    about cells with no expression in vocabulary genes (they get no result). ``stacklevel``: the
    warnings point at the caller of the ``tl`` function (3 when it calls this directly)."""
    if not 0.0 <= min_coverage <= 1.0:
        raise ConfigError(f"min_coverage must be in [0, 1], got {min_coverage}.")
    cells = model.match_cells(adata, layer=layer, use_raw=use_raw, gene_symbol_key=gene_symbol_key,
                              min_coverage=min_coverage, coverage_fixes=COVERAGE_FIXES)
    m = cells.gene_match
    logger.info(m.summary())
    if m.coverage < COVERAGE_WARN:
        warnings.warn(f"{m.summary()}; genes outside the vocabulary are ignored (e.g. {m.unmapped_examples[:5]}). "
                      "Check the gene ids, or use a model whose vocabulary covers this data.",
                      GeneCoverageWarning, stacklevel=stacklevel)
    rows = np.asarray(cells.cell_index)
    if len(rows) < adata.n_obs:
        warnings.warn(f"{adata.n_obs - len(rows)} of {adata.n_obs} cells have no expression in the model's genes; "
                      "their results are left empty (NaN / '').", GeneCoverageWarning, stacklevel=stacklevel)
    ds = model.dataset(cells, with_targets=with_targets)
    return ModelCells(cells, ds, rows, adata.n_obs, min_coverage)


def batches(model, ds: CellTextDataset, batch_size: int, *, progress: bool = False, desc: str = "") -> Iterator[CellBatch]:
    """Batches of ``ds`` on the model's device, with an optional progress bar.

    Cells are taken in order of length, so a batch holds cells of similar length and pads little.
    ``batch.index`` holds each cell's position: callers put results back in order with
    :func:`in_order`."""
    from tqdm.auto import tqdm

    from ..inference import iter_batches

    if batch_size < 1:
        raise ConfigError("batch_size must be >= 1.")
    from ..utils.memory import check_batch_memory

    check_batch_memory(model, min(batch_size, len(ds)), training=False, device=model.device,
                       advice="Lower batch_size= (CLI: --batch-size).")
    n = (len(ds) + batch_size - 1) // batch_size
    order = np.argsort(ds.lengths(), kind="stable")
    yield from tqdm(iter_batches(model, ds, batch_size, indices=order), total=n, desc=desc, disable=not progress,
                    leave=False)


def in_order(chunks: list, index: list[torch.Tensor]):
    """Per-batch results (tensors, or lists) of :func:`batches` concatenated in dataset order."""
    inv = torch.argsort(torch.cat([i.cpu() for i in index]))
    if chunks and isinstance(chunks[0], torch.Tensor):
        return torch.cat(chunks)[inv]
    flat = [x for c in chunks for x in c]
    return [flat[int(i)] for i in inv]


def start(adata, copy: bool):
    """scanpy's convention: work on a copy when ``copy=True`` (and return it), else in place."""
    import anndata as ad

    if not isinstance(adata, ad.AnnData):
        raise InputDataError(f"Expected an AnnData as the first argument, got {type(adata).__name__}.")
    return adata.copy() if copy else adata


def full_rows(values: np.ndarray, rows: np.ndarray, n_obs: int, fill=np.nan) -> np.ndarray:
    """Scatter per-kept-cell ``values`` back to all ``n_obs`` rows (``fill`` for dropped cells)."""
    if len(rows) == n_obs:
        return values
    dtype = object if (values.dtype == object or isinstance(fill, str)) else np.promote_types(values.dtype, np.float32)
    out = np.full((n_obs, *values.shape[1:]), fill, dtype=dtype)
    out[rows] = values
    return out


@dataclass
class StoredFeatures:
    """Query features that :func:`~scmmgpt.tl.embed` stored (``queries=True``), read back for scoring
    without the cell encoder: the same ``rows`` / ``n_obs`` / ``report()`` as :class:`ModelCells`."""

    features: np.ndarray
    """(kept cells, Q, D) as stored (float16)."""
    rows: np.ndarray
    n_obs: int
    embed_report: dict

    def report(self) -> dict:
        return {**{k: v for k, v in self.embed_report.items() if k not in ("key_added", "aligned", "queries")},
                "use_rep": True}

    def scores(self, score, chunk: int = 65536) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(index, scores)`` per chunk of cells, as :meth:`ScMMGPT.iter_label_scores` yields them
        (float16 features are scored as they are stored)."""
        for i in range(0, len(self.rows), chunk):
            part = torch.from_numpy(np.ascontiguousarray(self.features[i:i + chunk]))
            yield torch.arange(i, i + len(part)), score(part)


def stored_features(adata, model, use_rep: str) -> StoredFeatures:
    """The query features in ``adata.obsm[use_rep]`` (``tl.embed(..., queries=True)`` writes them to
    ``.obsm["X_scmmgpt_queries"]``), checked against ``model``'s shape; rows that are NaN (cells with
    no expression in the model's genes) are left out, as :func:`model_cells` leaves them out."""
    if use_rep not in adata.obsm:
        raise InputDataError(f"obsm has no {use_rep!r} (keys: {list(adata.obsm.keys())}). Run "
                             "tl.embed(adata, model, queries=True) first, or leave use_rep unset.")
    f = np.asarray(adata.obsm[use_rep])
    q = model.config.qformer
    if f.ndim != 3 or f.shape[1:] != (q.n_query, q.embed_dim):
        raise InputDataError(f"obsm[{use_rep!r}] has shape {f.shape}; this model's query features are "
                             f"(n_obs, {q.n_query}, {q.embed_dim}). Re-run tl.embed(adata, model, queries=True) "
                             "with this model.")
    keep = np.isfinite(f[:, 0, 0])          # an empty cell's row is NaN throughout (tl.embed's fill)
    rows = np.flatnonzero(keep)
    report = dict(adata.uns.get("scmmgpt", {}).get("embed", {}))
    return StoredFeatures(f[rows] if len(rows) < len(f) else f, rows, adata.n_obs, report)


def label_scores(adata, model, candidates, *, use_rep: str | None, precision, batch_size: int, progress: bool,
                 desc: str, alpha: float = 0.0, rerank_top: int = 10, backoff: bool = True, layer: str | None = None,
                 use_raw: bool = False, gene_symbol_key: str | None = None, min_coverage: float = 0.5,
                 zero_shot=None) -> tuple[ModelCells | StoredFeatures, Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """The cells ``tl.search`` and ``tl.annotate`` score, and an iterator of ``(index, scores)`` per
    chunk: through the cell encoder (:meth:`ScMMGPT.iter_label_scores`), or, with ``use_rep``,
    against the query features ``tl.embed(queries=True)`` stored (CTM re-ranking needs the cells).
    ``zero_shot``: the novelty gate's zero-shot model (:meth:`ScMMGPT.iter_label_scores`)."""
    if use_rep is None:
        mc = model_cells(adata, model, layer=layer, use_raw=use_raw, gene_symbol_key=gene_symbol_key,
                         min_coverage=min_coverage, stacklevel=4)
        return mc, model.iter_label_scores(batches(model, mc.dataset, batch_size, progress=progress, desc=desc),
                                           candidates, alpha=alpha, rerank_top=rerank_top, precision=precision,
                                           backoff=backoff, zero_shot=zero_shot)
    if zero_shot is not None:
        raise InputDataError("zero_shot_model scores the cells with a second model, which reads the cells themselves: "
                             "leave use_rep unset.")
    if alpha > 0:
        raise InputDataError("alpha > 0 re-ranks with the CTM head, which reads the cells themselves: leave "
                             "use_rep unset, or set alpha=0 to score the stored features.")
    stored = stored_features(adata, model, use_rep)

    def scored():          # lazy, as iter_label_scores is: the texts are encoded when scoring starts
        yield from stored.scores(model.feature_scorer(candidates, backoff=backoff))

    return stored, scored()

