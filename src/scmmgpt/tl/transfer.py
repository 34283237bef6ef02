"""Reference mapping: labels of a labelled reference carried to query cells by their nearest
neighbours in the model's embedding space.

The reference and the query are embedded by the same model (:func:`~scmmgpt.tl.embed`), so both
sit in one fixed space: nothing is trained on the query. Each query cell takes the labels of its
``k`` nearest reference cells (cosine), each vote weighted by its similarity; the confidence is the
share of the weight that went to the winning label, and a cell below ``min_confidence`` is
``unassigned`` (the idea of k-NN transfer with an uncertainty cut-off in scArches, Lotfollahi et al.
2022, Nat. Biotechnol. 40:121, and Symphony, Kang et al. 2021).

Neighbour search: exact (a matrix product over unit vectors, in chunks) up to ``exact_max``
reference cells, above it approximate with ``pynndescent`` (Dong et al. 2011's NN-descent). Why
``pynndescent`` and not faiss: it is already installed with scanpy (through umap-learn), builds its
index in a few seconds for 10^5-10^6 cells on a CPU and answers cosine queries with recall near 1 at
its defaults; faiss-cpu would add a compiled dependency for a speed this step does not need.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

from ..errors import InputDataError
from ._common import resolve_model, start
from .embed import embed

__all__ = ["transfer_labels", "knn_vote", "UNASSIGNED"]

UNASSIGNED = "unassigned"


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nearest_neighbours(ref: np.ndarray, query: np.ndarray, k: int, exact_max: int = 100_000, seed: int = 0
                       ) -> tuple[np.ndarray, np.ndarray, str]:
    """``(indices, similarities, method)`` of each query row's ``k`` most cosine-similar ``ref`` rows:
    exact up to ``exact_max`` reference rows, ``pynndescent`` above (the explorer places pseudo-cells
    with it too)."""
    ref, query = _unit(ref), _unit(query)
    if len(ref) <= exact_max:
        idx = np.empty((len(query), k), dtype=np.int64)
        sim = np.empty((len(query), k), dtype=np.float32)
        for s in range(0, len(query), 4096):
            block = query[s:s + 4096] @ ref.T
            top = np.argpartition(-block, k - 1, axis=1)[:, :k]
            vals = np.take_along_axis(block, top, 1)
            order = np.argsort(-vals, axis=1)
            idx[s:s + 4096], sim[s:s + 4096] = np.take_along_axis(top, order, 1), np.take_along_axis(vals, order, 1)
        return idx, sim, "exact"
    from pynndescent import NNDescent

    index = NNDescent(ref, metric="cosine", n_neighbors=max(30, k), random_state=seed)
    idx, dist = index.query(query, k=k)
    return idx.astype(np.int64), (1.0 - dist).astype(np.float32), "pynndescent"


def knn_vote(neighbour_labels: np.ndarray, similarities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Similarity-weighted vote over each row's neighbour labels: ``(label, confidence)``, the
    confidence being the winner's share of the (non-negative) weight."""
    w = np.clip(similarities, 0, None).astype(np.float64) + 1e-12
    labels, conf = np.empty(len(w), dtype=object), np.empty(len(w))
    for i in range(len(w)):
        names, inv = np.unique(neighbour_labels[i], return_inverse=True)
        votes = np.bincount(inv, weights=w[i], minlength=len(names))
        j = int(votes.argmax())
        labels[i], conf[i] = names[j], votes[j] / votes.sum()
    return labels, conf


def transfer_labels(query, reference, model, *, label_key: str = "cell_type", space: Literal["aligned", "cls"] = "aligned",
                    k: int = 15, min_confidence: float = 0.5, move_query: bool = False,
                    key_added: str = "scmmgpt_transfer",
                    exact_max: int = 100_000, batch_size: int = 64, layer: str | None = None, use_raw: bool = False,
                    gene_symbol_key: str | None = None, min_coverage: float = 0.5, device: str | None = None,
                    precision: str = "auto", seed: int = 0, progress: bool = False, copy: bool = False):
    """Label the ``query`` cells from a labelled ``reference`` by k-NN in the model's embedding.

    Parameters
    ----------
    query, reference
        AnnData of cells (counts or log-normalised; see :func:`~scmmgpt.tl.embed`); the reference
        has labels in ``.obs[label_key]`` (cells without a label are left out of the reference).
    model
        An :class:`~scmmgpt.models.scmmgpt.ScMMGPT` or the folder of a saved one.
    space
        ``aligned``: the contrastive features (where cells meet texts); ``cls``: the cell encoder's
        ``<cls>`` state.
    k, min_confidence
        Neighbours per query cell; below this share of the neighbours' weight a cell is
        ``"unassigned"``.
    move_query
        Move the query's cells as a whole onto the reference before the vote: each query
        embedding gets ``mean(reference) - mean(query)`` added, so the reference's space stays as it
        is. This is the least a query-side adaptation (scArches' idea) does: it removes a batch's
        offset. It assumes the query holds roughly the reference's mix of types (a query of one
        type would be pulled to the reference's centre). ``benchmarks/mapping_diagnosis.py``
        measures what it recovers on a chemistry shift.
    exact_max
        Exact search up to this many reference cells, ``pynndescent`` above.
    layer, use_raw, gene_symbol_key, min_coverage, device, precision
        As in :func:`~scmmgpt.tl.embed`, for both datasets.

    Returns
    -------
    ``None``, or the annotated copy of ``query`` with ``copy=True``. Writes into ``query``:

    * ``.obs[key_added]`` — the transferred label (categorical; ``"unassigned"`` below the cut-off
      and for cells the model cannot read);
    * ``.obs[key_added + "_confidence"]`` — the winner's weight share in [0, 1] (NaN where unread);
    * ``.uns["scmmgpt"]["transfer_labels"]`` — the parameters, the precision used, the search method, the
      query's gene coverage and the counts.
    """
    if label_key not in reference.obs:
        raise InputDataError(f"The reference has no obs column {label_key!r}; pass label_key= (its columns: "
                             f"{list(reference.obs.columns)[:10]}).")
    if not 1 <= k:
        raise InputDataError(f"k must be >= 1, got {k}.")
    if not 0 <= min_confidence <= 1:
        raise InputDataError(f"min_confidence must be in [0, 1], got {min_confidence}.")
    if space not in ("aligned", "cls"):
        raise InputDataError(f"space must be 'aligned' or 'cls', not {space!r}.")
    kw = dict(batch_size=batch_size, layer=layer, use_raw=use_raw, gene_symbol_key=gene_symbol_key,
              min_coverage=min_coverage, device=device, precision=precision, progress=progress, copy=True)
    key = "X_scmmgpt_aligned" if space == "aligned" else "X_scmmgpt"
    target = start(query, copy)
    model = resolve_model(model, device=device, with_lm=False)        # loaded once for both datasets
    ref = embed(reference, model, **kw).obsm[key]
    q_emb = embed(query, model, **kw)
    q, report = q_emb.obsm[key], q_emb.uns["scmmgpt"]["embed"]
    labels = reference.obs[label_key]
    use = np.isfinite(ref).all(1) & labels.notna().to_numpy()
    if use.sum() < k:
        raise InputDataError(f"The reference has {int(use.sum())} labelled cells the model can read, fewer than k={k}.")
    ref_labels = labels.astype(str).to_numpy()[use]
    read = np.isfinite(q).all(1)
    pred = np.full(len(q), UNASSIGNED, dtype=object)
    conf = np.full(len(q), np.nan)
    method = "none"
    if read.any():
        qr = q[read]
        if move_query:
            qr = qr - qr.mean(0) + ref[use].mean(0)
        idx, sim, method = nearest_neighbours(ref[use], qr, k, exact_max, seed)
        lab, c = knn_vote(ref_labels[idx], sim)
        lab[c < min_confidence] = UNASSIGNED
        pred[read], conf[read] = lab, c
    target.obs[key_added] = pd.Categorical(pred)
    target.obs[key_added + "_confidence"] = conf
    target.uns.setdefault("scmmgpt", {})["transfer_labels"] = {
        "label_key": label_key, "space": space, "k": k, "min_confidence": min_confidence, "move_query": move_query,
        "search": method,
        "precision": report["precision"], "gene_coverage": report["gene_coverage"], "n_reference": int(use.sum()),
        "n_unassigned": int((pred == UNASSIGNED).sum())}
    return target if copy else None
