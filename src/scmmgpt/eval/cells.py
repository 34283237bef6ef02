"""Metrics on cells: k-NN accuracy of generated pseudo-cells against real cells (paper §4.3) and
annotation accuracy summaries."""

from __future__ import annotations

import numpy as np

__all__ = ["knn_accuracy", "knn_accuracy_table", "expression_pca"]


def expression_pca(real: np.ndarray, n_components: int = 50, seed: int = 0):
    """A PCA fitted on real cells' eq.-1 values (columns with zero variance dropped).
    Returns ``transform(x) -> (N, k)``."""
    from sklearn.decomposition import PCA

    real = np.asarray(real, dtype=np.float32)
    keep = real.std(0) > 0
    k = int(min(n_components, keep.sum(), len(real) - 1))
    if k < 1:
        raise ValueError("Real cells have no variable gene to fit a PCA on.")
    pca = PCA(n_components=k, random_state=seed).fit(real[:, keep])
    return lambda x: pca.transform(np.asarray(x, dtype=np.float32)[:, keep])


def knn_accuracy(real: np.ndarray, real_labels, generated: np.ndarray, generated_labels, *, k: int = 5,
                 n_components: int = 50, transform=None) -> float:
    """Fraction of generated cells whose k nearest real cells (majority vote, in a PCA of the real
    cells' expression) carry the label the cell was generated for. ``transform``: a PCA from
    :func:`expression_pca` already fitted on ``real`` (fitted here when ``None``)."""
    from sklearn.neighbors import KNeighborsClassifier

    if transform is None:
        transform = expression_pca(real, n_components)
    clf = KNeighborsClassifier(n_neighbors=min(k, len(real))).fit(transform(real), np.asarray(real_labels))
    pred = clf.predict(transform(generated))
    return float((pred == np.asarray(generated_labels)).mean())


def knn_accuracy_table(real: np.ndarray, real_labels, generated_runs, generated_labels, *,
                       ks=(3, 5, 10, 25), n_components: int = 50, transform=None) -> dict[int, dict[str, float]]:
    """Table 2 of the paper: k-NN accuracy of pseudo-cells for each ``k``, mean and sd over runs.

    ``generated_runs``: one (n, n_genes) array per seed (the same prompts ``generated_labels``
    each time). The feature space (documented here, the paper does not say) is a PCA with
    ``n_components`` components fitted on the real cells' eq.-1 values; ``k`` is capped at the
    number of real cells. Returns ``{k: {"mean", "sd", "runs": [...]}}`` (sd with ddof=1; 0 for
    one run).
    """
    runs = [np.asarray(g) for g in generated_runs]
    if not runs:
        raise ValueError("Need at least one run of generated cells.")
    if transform is None:
        transform = expression_pca(real, n_components)
    out = {}
    for k in ks:
        accs = [knn_accuracy(real, real_labels, g, generated_labels, k=int(k), transform=transform) for g in runs]
        out[int(k)] = {"mean": float(np.mean(accs)), "sd": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
                       "runs": [float(a) for a in accs]}
    return out
