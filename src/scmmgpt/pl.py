"""Plots (matplotlib figures, like scanpy's ``return_fig``): embeddings, confusion matrix,
real vs generated cells, annotation scores."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from .errors import InputDataError

__all__ = ["embedding", "confusion_matrix", "real_vs_generated", "score_heatmap"]


def _figure(figsize: tuple[float, float]):
    """A :class:`matplotlib.figure.Figure` outside pyplot: no global backend or figure registry is
    touched, nothing stays in memory once the caller drops it, and ``savefig`` works anywhere."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def _cmap(name: str = "tab20"):
    import matplotlib

    return matplotlib.colormaps[name]


def umap_coords(x: np.ndarray, *, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """2-d UMAP (umap-learn) of the rows of ``x``; tiny inputs get random initialisation."""
    import umap

    x = np.asarray(x, dtype=np.float32)
    n = len(x)
    if n < 3:
        raise InputDataError(f"A UMAP needs at least 3 cells, got {n}.")
    return umap.UMAP(n_neighbors=min(n_neighbors, n - 1), random_state=seed, n_jobs=1,
                     init="random" if n < 20 else "spectral").fit_transform(x)


def _scatter(ax, xy, values, title: str, categories: Sequence[str] | None = None, size: float = 8):
    values = pd.Series(np.asarray(values, dtype=object)).astype(str)
    cats = list(categories) if categories is not None else sorted(values.unique())
    cmap = _cmap()
    for i, c in enumerate(cats):
        m = (values == c).to_numpy()
        if m.any():
            ax.scatter(xy[m, 0], xy[m, 1], s=size, color=cmap(i % 20), label=c, linewidths=0)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])


def embedding(adata, *, basis: str = "X_scmmgpt_aligned", color: str | Sequence[str], seed: int = 0,
              legend: bool = True):
    """UMAP of ``.obsm[basis]`` with one panel per ``.obs`` key in ``color`` (panels whose labels
    overlap, such as the truth and a prediction, give each label the same colour).

    The 2-d coordinates are cached in ``.obsm[basis + "_umap"]`` (recomputed if the cell count
    changed). Cells with NaN embeddings (no expression in the model's genes) are left out.
    Returns the matplotlib Figure.
    """
    if basis not in adata.obsm:
        raise InputDataError(f".obsm has no {basis!r}; run scmmgpt.tl.embed first (keys: {list(adata.obsm)}).")
    colors = [color] if isinstance(color, str) else list(color)
    for c in colors:
        if c not in adata.obs.columns:
            raise InputDataError(f"obs has no column {c!r}; columns: {list(adata.obs.columns)}.")
    x = np.asarray(adata.obsm[basis], dtype=np.float32)
    ok = np.isfinite(x).all(1)
    key = basis + "_umap"
    cached = adata.obsm.get(key)
    if cached is None or not np.isfinite(np.asarray(cached)[ok]).all():
        xy = np.full((adata.n_obs, 2), np.nan, dtype=np.float32)
        xy[ok] = umap_coords(x[ok], seed=seed)
        adata.obsm[key] = xy
    xy = np.asarray(adata.obsm[key])[ok]
    fig = _figure((6 * len(colors), 5))
    axes = fig.subplots(1, len(colors), squeeze=False)
    values = {c: pd.Series(adata.obs[c].to_numpy()[ok], dtype=object).astype(str) for c in colors}
    # panels over the same labels (truth vs prediction) share one colour per label
    shared = set.intersection(*(set(v) for v in values.values())) if len(colors) > 1 else set()
    union = sorted(set().union(*(set(v) for v in values.values()))) if shared else None
    for ax, c in zip(axes[0], colors):
        _scatter(ax, xy, values[c].to_numpy(), c, categories=union)
        if legend:
            ax.legend(loc="center left", bbox_to_anchor=(1, 0.5), fontsize=7, markerscale=2, frameon=False)
    fig.tight_layout()
    return fig


def confusion_matrix(adata, *, truth: str, pred: str = "scmmgpt_label", normalize: bool = True):
    """Confusion matrix of ``.obs[truth]`` (rows) vs ``.obs[pred]`` (columns), row-normalised
    colours with counts written in the cells. Returns the Figure."""
    for c in (truth, pred):
        if c not in adata.obs.columns:
            raise InputDataError(f"obs has no column {c!r}; columns: {list(adata.obs.columns)}.")
    table = pd.crosstab(adata.obs[truth].astype(str), adata.obs[pred].astype(str))
    counts = table.to_numpy()
    norm = counts / np.maximum(counts.sum(1, keepdims=True), 1) if normalize else counts
    fig = _figure((1 + 0.5 * table.shape[1], 1 + 0.45 * table.shape[0]))
    ax = fig.subplots()
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1 if normalize else None, aspect="auto")
    ax.set_xticks(range(table.shape[1]), table.columns, rotation=90, fontsize=7)
    ax.set_yticks(range(table.shape[0]), table.index, fontsize=7)
    for i in range(table.shape[0]):
        for j in range(table.shape[1]):
            if counts[i, j]:
                ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if normalize and norm[i, j] > 0.5 else "black")
    ax.set_xlabel(pred)
    ax.set_ylabel(truth)
    fig.tight_layout()
    return fig


def real_vs_generated(real, generated, *, label_key: str, prompt_key: str = "prompt", labels: Sequence[str] | None = None,
                      n_pcs: int = 50, seed: int = 0):
    """Real cells (dots, coloured by ``.obs[label_key]``) and generated pseudo-cells (stars,
    coloured by ``.obs[prompt_key]``) on one UMAP of a PCA fitted on the real cells' eq.-1 values
    over the genes both share. ``labels`` maps each prompt to a real label (default: the prompt).
    Returns the Figure."""
    from .eval.cells import expression_pca

    shared = real.var_names.intersection(generated.var_names)
    if len(shared) < 2:
        raise InputDataError("Real and generated cells share fewer than 2 genes; compare them in one gene space.")
    r = real[:, shared].X
    r = np.asarray(r.toarray() if hasattr(r, "toarray") else r, dtype=np.float32)
    g = np.asarray(generated[:, shared].X, dtype=np.float32)
    pca = expression_pca(r, n_pcs)
    xy = umap_coords(np.concatenate([pca(r), pca(g)]), seed=seed)
    prompt_labels = list(labels) if labels is not None else list(generated.obs[prompt_key].astype(str))
    if len(prompt_labels) != generated.n_obs:
        raise InputDataError("labels must give one real label per generated cell.")
    real_labels = real.obs[label_key].astype(str).to_numpy()
    cats = sorted(set(real_labels) | set(prompt_labels))
    fig = _figure((7, 5))
    ax = fig.subplots()
    cmap = _cmap()
    for i, c in enumerate(cats):
        m = real_labels == c
        if m.any():
            ax.scatter(xy[:len(r)][m, 0], xy[:len(r)][m, 1], s=8, color=cmap(i % 20), label=c, linewidths=0)
        m = np.asarray(prompt_labels) == c
        if m.any():
            ax.scatter(xy[len(r):][m, 0], xy[len(r):][m, 1], s=160, marker="*", color=cmap(i % 20),
                       edgecolors="black", linewidths=0.6)
    ax.set_title("real cells (dots) and generated pseudo-cells (stars)")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="center left", bbox_to_anchor=(1, 0.5), fontsize=7, markerscale=1.5, frameon=False)
    fig.tight_layout()
    return fig


def score_heatmap(adata, *, key: str = "scmmgpt_label", groupby: str):
    """Mean annotation score of each candidate label (columns) per group of ``.obs[groupby]``
    (rows), from ``.obsm[key + "_scores"]`` written by :func:`scmmgpt.tl.annotate`. Returns the Figure."""
    if key + "_scores" not in adata.obsm or key not in adata.uns:
        raise InputDataError(f"No {key + '_scores'!r} in .obsm; run scmmgpt.tl.annotate(..., key_added={key!r}) "
                             "with the score matrix stored.")
    if groupby not in adata.obs.columns:
        raise InputDataError(f"obs has no column {groupby!r}; columns: {list(adata.obs.columns)}.")
    scores = pd.DataFrame(np.asarray(adata.obsm[key + "_scores"]), columns=list(adata.uns[key]["labels"]),
                          index=adata.obs_names)
    mean = scores.groupby(adata.obs[groupby].astype(str).to_numpy()).mean()
    fig = _figure((1 + 0.45 * mean.shape[1], 1 + 0.45 * mean.shape[0]))
    ax = fig.subplots()
    im = ax.imshow(mean.to_numpy(), cmap="viridis", aspect="auto")
    ax.set_xticks(range(mean.shape[1]), mean.columns, rotation=90, fontsize=7)
    ax.set_yticks(range(mean.shape[0]), mean.index, fontsize=7)
    ax.set_xlabel("candidate label")
    ax.set_ylabel(groupby)
    fig.colorbar(im, ax=ax, label="mean score")
    fig.tight_layout()
    return fig
