"""Pseudo-cell k-NN table and silhouette scores on real cells."""

import numpy as np
import pytest

from scmmgpt.eval.batch import silhouette_scores
from scmmgpt.eval.cells import knn_accuracy_table
from tests.conftest import data_path


def _lognorm(a):
    x = np.asarray(a.X.toarray() if hasattr(a.X, "toarray") else a.X, dtype=np.float64)
    return np.log1p(1e4 * x / x.sum(1, keepdims=True))


def test_knn_table_scores_type_means_high_and_shuffled_low(pbmc3k):
    x = _lognorm(pbmc3k)
    y = pbmc3k.obs["cell_type"].astype(str).to_numpy()
    types = sorted(set(y))
    means = np.stack([x[y == t].mean(0) for t in types])
    rng = np.random.default_rng(0)
    # three "seeds": each type's mean of a random half of its cells
    runs = [np.stack([x[rng.choice(np.flatnonzero(y == t), (y == t).sum() // 2 + 1)].mean(0) for t in types])
            for _ in range(3)]
    tab = knn_accuracy_table(x, y, runs, types, ks=(3, 5, 25))
    assert set(tab) == {3, 5, 25} and len(tab[5]["runs"]) == 3
    assert tab[5]["mean"] >= 0.5 and tab[5]["sd"] >= 0
    wrong = knn_accuracy_table(x, y, [means], types[1:] + types[:1], ks=(5,))
    assert wrong[5]["mean"] <= 0.2 and wrong[5]["sd"] == 0.0
    with pytest.raises(ValueError, match="at least one run"):
        knn_accuracy_table(x, y, [], types)


@pytest.mark.shared_data
def test_silhouettes_see_types_and_batches():
    import anndata as ad
    from sklearn.decomposition import PCA

    a = ad.read_h5ad(data_path("symphony_pbmcs_small.h5ad"))
    emb = PCA(20, random_state=0).fit_transform(_lognorm(a))
    types, batch = a.obs["cell_type"].to_numpy(), a.obs["batch"].to_numpy()
    s = silhouette_scores(emb, types, batch)
    assert 0 <= s["batch_asw"] <= 1 and 0 <= s["type_asw"] <= 1
    shuffled = silhouette_scores(emb, np.random.default_rng(0).permutation(types))
    assert s["type_asw"] > shuffled["type_asw"] + 0.02
    # push each batch apart: batch mixing must fall
    codes = np.unique(batch, return_inverse=True)[1]
    split = emb + 20.0 * np.eye(emb.shape[1])[codes] * emb.std()
    assert silhouette_scores(split, types, batch)["batch_asw"] < s["batch_asw"] - 0.1
    nan = emb.copy()
    nan[:5] = np.nan
    assert np.isfinite(silhouette_scores(nan, types, batch)["type_asw"])
