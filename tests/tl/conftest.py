"""The tl tests run on the real small model users get with no training: the shipped pre-trained
``pbmc-small`` (stages 1 and 2 on the PBMC corpus), read on the repository's pbmc3k cells that its
pre-training held out (``held_out.json``, 262 cells of 9 types). Loading it takes seconds, where
training a fixture model took a quarter of an hour on a 2-core CPU without bf16 units and gave a
model whose quality hung on the machine; this one is the same bits everywhere."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from tests.conftest import PBMC3K


@pytest.fixture(scope="session")
def trained():
    import anndata as ad

    import scmmgpt
    from scmmgpt.models.hub import shipped_model_dir

    folder = shipped_model_dir("pbmc-small")
    held = set(json.loads((folder / "held_out.json").read_text()))
    full = ad.read_h5ad(PBMC3K)
    test = full[np.array([f"pbmc3k_clustifyr:{n}" in held for n in full.obs_names])].copy()
    assert test.n_obs > 200, "the shipped model's held-out pbmc3k cells"
    return SimpleNamespace(path=folder, model=scmmgpt.load_model("pbmc-small"), test=test, h5ad=PBMC3K)


@pytest.fixture
def test_cells(trained):
    """A fresh copy of the held-out cells for each test."""
    return trained.test.copy()
