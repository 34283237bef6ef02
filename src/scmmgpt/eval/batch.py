"""Batch-effect view of cell embeddings (paper Fig. 5) as two silhouette scores, defined as in
scIB (Luecken et al. 2022, Nat. Methods 19:41, "Methods: average silhouette width"):

* ``type_asw`` = (ASW of cell-type labels + 1) / 2, in [0, 1]; higher = types better separated.
* ``batch_asw`` = mean over cell types of mean over their cells of ``1 - |s_batch(i)|``, the
  silhouette of each cell's batch label computed within its own type; 1 = batches fully mixed
  within every type, lower = cells cluster by batch. Types present in a single batch are skipped.

Distances are cosine on the embedding (the space scMMGPT compares cells and texts in).
"""

from __future__ import annotations

import numpy as np

__all__ = ["silhouette_scores"]


def silhouette_scores(embedding: np.ndarray, cell_types, batches=None, *, max_cells: int | None = 20000,
                      seed: int = 0) -> dict[str, float]:
    """``{"type_asw", "batch_asw"}`` (``batch_asw`` only with ``batches``) of ``embedding`` (n, d).
    Cells with NaN rows are left out; above ``max_cells`` a seeded random subset is scored."""
    from sklearn.metrics import silhouette_samples

    x = np.asarray(embedding, dtype=np.float64)
    types = np.asarray(cell_types).astype(str)
    b = None if batches is None else np.asarray(batches).astype(str)
    if len(types) != len(x) or (b is not None and len(b) != len(x)):
        raise ValueError("embedding, cell_types and batches need one entry per cell.")
    keep = np.isfinite(x).all(1)
    if max_cells is not None and keep.sum() > max_cells:
        idx = np.random.default_rng(seed).choice(np.flatnonzero(keep), max_cells, replace=False)
        keep = np.zeros(len(x), bool)
        keep[idx] = True
    x, types = x[keep], types[keep]
    if len(set(types)) < 2:
        raise ValueError("Need at least two cell types for a silhouette score.")
    out = {"type_asw": float((silhouette_samples(x, types, metric="cosine").mean() + 1) / 2)}
    if b is not None:
        b = b[keep]
        per_type = []
        for t in np.unique(types):
            m = types == t
            if len(set(b[m])) < 2 or m.sum() < 3:
                continue
            per_type.append(float(np.mean(1.0 - np.abs(silhouette_samples(x[m], b[m], metric="cosine")))))
        out["batch_asw"] = float(np.mean(per_type)) if per_type else float("nan")
    return out
