"""Training smoke test on real cells: stage-2 losses go down through the Accelerate loop."""

import numpy as np
import pytest
import torch

from scmmgpt.data import CellTextDataset, DescriptionBuilder, GeneVocab, prepare_cells
from scmmgpt.models.config import ModelConfig
from scmmgpt.models.scmmgpt import ScMMGPT
from scmmgpt.train.config import TrainConfig
from scmmgpt.train.loop import fit
from tests.conftest import data_path


@pytest.fixture(scope="module")
def data():
    import anndata as ad

    a = ad.read_h5ad(data_path("symphony_pbmcs_small.h5ad"))
    a = a[a.obs["cell_type"].isin(["B cell", "CD14-positive monocyte", "natural killer cell",
                                   "CD8-positive, alpha-beta T cell"])]
    a = a[np.random.default_rng(0).permutation(a.n_obs)[:160]].copy()
    vocab = GeneVocab.from_genes(a.var_names)
    cells = prepare_cells(a, vocab, target_sum=1e4)
    desc = DescriptionBuilder().build(a.obs.iloc[cells.cell_index])
    return vocab, cells, list(desc["description"])


def _model(vocab, with_lm=False, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("tiny", max_genes=64)
    cfg.qformer.n_layers = 2
    cfg.qformer.n_query = 4
    return ScMMGPT.build(cfg, vocab, with_lm=with_lm)


def test_stage2_loss_decreases(data):
    vocab, cells, texts = data
    model = _model(vocab, with_lm=True)
    ds = CellTextDataset(cells, texts, cls_id=vocab.cls_id, max_genes=64, with_targets=True)
    cfg = TrainConfig(stage="stage2", max_steps=12, batch_size=8, lr=1e-3, warmup_steps=2, log_every=2)
    out = fit(model, ds, cfg, measured=cells.measured)
    first, last = out["history"][0], out["history"][-1]
    assert last["cdgen"] < first["cdgen"] and last["pcgen"] < first["pcgen"], out["history"]
