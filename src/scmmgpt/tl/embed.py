"""Cell embeddings and text search over cells."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from ..data.label_texts import Candidates, query_texts
from ..errors import InputDataError
from ..inference import aligned_embedding, evaluation_mode
from ._common import batches, full_rows, in_order, label_scores, model_cells, resolve_model, start

__all__ = ["embed", "search"]


def _cell_features(model, mc, batch_size: int, progress: bool, desc: str, precision):
    """Per kept cell: ``<cls>`` embedding (N, d_cell), query features (N, Q, D) as float32 CPU tensors."""
    cls, feats, index = [], [], []
    with evaluation_mode(model.net, precision):
        for batch in batches(model, mc.dataset, batch_size, progress=progress, desc=desc):
            out = model.net.encode_cells(batch.gene_ids, batch.values, batch.padding_mask)
            cls.append(out.cell_embedding.float().cpu())
            feats.append(out.features.float().cpu())
            index.append(batch.index)
    return in_order(cls, index), in_order(feats, index)


def embed(adata, model, *, aligned: bool = True, queries: bool = False, key_added: str = "X_scmmgpt",
          batch_size: int = 64,
          layer: str | None = None, use_raw: bool = False, gene_symbol_key: str | None = None, min_coverage: float = 0.5,
          device: str | None = None, precision: str = "auto", progress: bool = False, copy: bool = False):
    """Embed cells with the model's cell encoder and Q-Former.

    Parameters
    ----------
    adata
        Cells x genes: counts, log-normalised or normalised values (detected; see
        :func:`~scmmgpt.data.prepare_cells`), symbols or Ensembl ids.
    model
        An :class:`~scmmgpt.models.scmmgpt.ScMMGPT` or the folder of a saved one.
    aligned
        Also store the aligned features: the mean of the Q-Former query features in the space where
        cells and texts are compared (unit norm).
    queries
        Also store every Q-Former query feature, ``(n_obs, n_query, embed_dim)`` in float16, so that
        :func:`search` and :func:`~scmmgpt.tl.annotate` with ``use_rep`` score texts against them
        without running the cell encoder again (the explorer's search over 10^5 cells).
    key_added
        ``.obsm`` key of the embedding.
    layer, use_raw, gene_symbol_key
        Which matrix and which gene names to read.
    min_coverage
        Refuse data whose genes in the model's vocabulary hold less than this fraction of the
        expression (default 0.5; lower it to proceed on a partly covered file, with a warning).
    precision
        ``auto | fp32 | bf16 | fp16`` (:mod:`scmmgpt.utils.precision`; ``auto`` is bf16 where the
        hardware has native bf16 matmul). The choice made is stored with the parameters.

    Returns
    -------
    ``None``, or the annotated copy with ``copy=True``. Writes

    * ``.obsm[key_added]`` — (n_obs, d_cell) the cell encoder's ``<cls>`` embedding;
    * ``.obsm[key_added + "_aligned"]`` — (n_obs, embed_dim) aligned features (``aligned=True``);
    * ``.obsm[key_added + "_queries"]`` — (n_obs, n_query, embed_dim) float16 query features
      (``queries=True``);
    * ``.uns["scmmgpt"]["embed"]`` — parameters and the gene coverage report.

    Cells with no expression in the model's genes get NaN rows.
    """
    adata = start(adata, copy)
    model = resolve_model(model, device=device, with_lm=False)
    mc = model_cells(adata, model, layer=layer, use_raw=use_raw, gene_symbol_key=gene_symbol_key,
                     min_coverage=min_coverage)
    prec = model.precision(precision)
    cls, feats = _cell_features(model, mc, batch_size, progress, "embed", prec)
    adata.obsm[key_added] = full_rows(cls.numpy(), mc.rows, mc.n_obs)
    if aligned:
        al = aligned_embedding(feats)
        adata.obsm[key_added + "_aligned"] = full_rows(al, mc.rows, mc.n_obs)
    if queries:
        # full_rows widens to float32 when it fills empty cells with NaN: cast once, after it
        adata.obsm[key_added + "_queries"] = full_rows(feats.numpy(), mc.rows, mc.n_obs).astype(np.float16)
    adata.uns.setdefault("scmmgpt", {})["embed"] = {"key_added": key_added, "aligned": aligned, "queries": queries,
                                                "precision": prec.name, **mc.report()}
    return adata if copy else None


def search(adata, model, query: str | Sequence[str], *, top_k: int = 10, expand: bool = True,
           key_added: str | None = None, use_rep: str | None = None, batch_size: int = 64, layer: str | None = None,
           use_raw: bool = False,
           gene_symbol_key: str | None = None, min_coverage: float = 0.5, device: str | None = None,
             precision: str = "auto",
           progress: bool = False) -> pd.DataFrame:
    """The cells that best match free-text queries.

    Each query is compared with every cell by the CTC similarity (cosine, max over the Q-Former
    queries; paper eq. 2). With ``expand=True`` a query that is exactly a Cell Ontology id, label or
    synonym (``"B cell"``, ``"CL:0000236"``) is replaced by the same description the model was
    trained on; any other text is used as it is.

    ``precision`` (``auto | fp32 | bf16 | fp16``; :mod:`scmmgpt.utils.precision`) is resolved for the
    model's device (``auto``: bf16 where it has native bf16 matmul) and used for every score.

    With ``use_rep`` (e.g. ``"X_scmmgpt_queries"``, written by ``tl.embed(adata, model, queries=True)``)
    the texts are scored against those stored query features instead of running the cell encoder: the
    same similarity, up to their float16 storage, in a fraction of the time on a large dataset.

    Returns
    -------
    DataFrame with one row per hit, best first within each query: ``query``, ``rank`` (1-based),
    ``obs_name``, ``score`` and the hit's ``.obs`` columns. With ``key_added`` the score of every
    cell for the first query is written to ``.obs[key_added]`` (NaN for empty cells).
    """
    queries = [query] if isinstance(query, str) else list(query)
    if not queries:
        raise InputDataError("search needs at least one query text.")
    if top_k < 1:
        raise InputDataError("top_k must be >= 1.")
    model = resolve_model(model, device=device, with_lm=False)
    texts = query_texts(queries, expand=expand)
    mc, scored = label_scores(adata, model, Candidates(list(queries), [""] * len(queries), texts), use_rep=use_rep,
                              precision=model.precision(precision), batch_size=batch_size, progress=progress,
                              desc="search", layer=layer, use_raw=use_raw, gene_symbol_key=gene_symbol_key,
                              min_coverage=min_coverage)
    sims, index = [], []
    for idx, sim in scored:
        sims.append(sim)
        index.append(idx)
    sim = in_order(sims, index).numpy()                       # (kept cells, queries)
    frames = []
    k = min(top_k, len(mc.rows))
    for j, q in enumerate(queries):
        order = np.argsort(-sim[:, j], kind="stable")[:k]
        rows = mc.rows[order]
        frame = adata.obs.iloc[rows].copy()
        frame.insert(0, "score", sim[order, j])
        frame.insert(0, "obs_name", adata.obs_names[rows].to_numpy())
        frame.insert(0, "rank", np.arange(1, k + 1))
        frame.insert(0, "query", q)
        frames.append(frame.reset_index(drop=True))
    if key_added is not None:
        adata.obs[key_added] = full_rows(sim[:, 0], mc.rows, mc.n_obs)
    return pd.concat(frames, ignore_index=True)
