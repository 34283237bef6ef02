"""Metrics on cells: k-NN accuracy of generated pseudo-cells against real cells (paper §4.3) and
annotation accuracy summaries."""

from __future__ import annotations

import numpy as np

__all__ = ["knn_accuracy", "expression_pca"]


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
