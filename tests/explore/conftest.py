"""The explorer's tests run the real shipped model (pbmc-small, with its language model) on the
pbmc3k cells its pre-training held out (262 cells, 9 types). The map comes with the data as
``.obsm["X_umap"]`` (here a 2-D PCA), as in most users' files; the slow test lets the explorer fit
its own UMAP (numba compiles its kernels on first use, about a minute)."""

import json

import numpy as np
import pytest

from tests.conftest import PBMC3K


@pytest.fixture(scope="session")
def pbmc_small_lm():
    import scmmgpt

    return scmmgpt.load_model("pbmc-small")


@pytest.fixture(scope="session")
def held_out_cells():
    import anndata as ad

    from scmmgpt.models.hub import shipped_model_dir

    held = set(json.loads((shipped_model_dir("pbmc-small") / "held_out.json").read_text()))
    a = ad.read_h5ad(PBMC3K)
    a = a[np.array([f"pbmc3k_clustifyr:{n}" in held for n in a.obs_names])].copy()
    # a 2-D map with the data, as a user's file usually has one: a PCA of log-normalised expression
    x = np.log1p(1e4 * a.X.toarray() / a.X.sum(1).A)
    x -= x.mean(0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    a.obsm["X_umap"] = (u[:, :2] * s[:2]).astype(np.float32)
    return a
