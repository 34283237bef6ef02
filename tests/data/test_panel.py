"""The input gene panel (scmmgpt.data.panel): a model reads every cell through the same genes, so
a whole-transcriptome file and a variable-gene matrix of the same cells give the same tokens."""

import numpy as np
import pytest

from scmmgpt.data import prepare_cells, tokenize_cell
from scmmgpt.data.dataset import CellTextDataset
from scmmgpt.data.panel import variable_genes


@pytest.fixture(scope="module")
def cells(pbmc3k, pbmc3k_vocab):
    return prepare_cells(pbmc3k, pbmc3k_vocab, target_sum=1e4)


def test_variable_genes_pick_markers_not_housekeeping(cells, pbmc3k_vocab):
    top = variable_genes(cells, 500)
    assert top is not None and len(top) == len(set(top.tolist())) == 500
    chosen = {pbmc3k_vocab.tokens[i] for i in top}
    markers = {"LYZ", "CD79A", "GNLY", "NKG7", "PPBP", "FCER1A", "CST3"}
    assert markers <= chosen, markers - chosen
    ribosomal = [g for g in pbmc3k_vocab.tokens if g.startswith(("RPL", "RPS"))]
    assert len(ribosomal) > 50
    # ribosomal genes hold the most counts of a PBMC but vary little between its types
    assert sum(g in chosen for g in ribosomal) < 0.1 * len(ribosomal)


def test_variable_genes_match_scanpy_seurat_flavour(pbmc3k, pbmc3k_vocab, cells):
    """One source: the same genes as scanpy's highly_variable_genes(flavor="seurat") on the same
    normalisation (eq. 1 with target_sum 1e4 is normalize_total + log1p)."""
    import scanpy as sc

    ref = pbmc3k.copy()
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    sc.pp.highly_variable_genes(ref, flavor="seurat", n_top_genes=500)
    ours = {pbmc3k_vocab.tokens[i] for i in variable_genes(cells, 500)}
    assert len(ours & set(ref.var_names[ref.var["highly_variable"]])) >= 495
    # all genes fit: no panel is needed
    assert variable_genes(cells, int(cells.measured.sum())) is None
    with pytest.raises(ValueError, match="n must be >= 1"):
        variable_genes(cells, 0)


def test_tokens_through_a_panel_do_not_depend_on_the_other_genes(pbmc3k, pbmc3k_vocab, cells):
    """The same cells read from the whole file and from a matrix of only some of its genes (as a
    published variable-gene matrix is) give the same tokens and values through a panel those genes
    contain; without the panel they differ."""
    panel_ids = variable_genes(cells, 400)
    panel = np.zeros(len(pbmc3k_vocab), dtype=bool)
    panel[panel_ids] = True
    names = {pbmc3k_vocab.tokens[i] for i in panel_ids}
    keep = [g for g in pbmc3k.var_names if g in names or g.startswith("HLA")]   # panel + a few others
    sub = prepare_cells(pbmc3k[:, keep].copy(), pbmc3k_vocab, target_sum=1e4, min_coverage=0.0)
    assert len(sub) > 0.9 * len(cells) and set(sub.obs_names) <= set(cells.obs_names)
    whole = CellTextDataset(cells, cls_id=1, max_genes=64, input_genes=panel, target_sum=1e4)
    part = CellTextDataset(sub, cls_id=1, max_genes=64, input_genes=panel, target_sum=1e4)
    pos = {n: i for i, n in enumerate(cells.obs_names)}
    for j in range(0, len(sub), 97):
        a, b = whole[pos[sub.obs_names[j]]], part[j]
        assert a["gene_ids"].tolist() == b["gene_ids"].tolist()
        np.testing.assert_allclose(a["values"], b["values"], rtol=1e-5, atol=1e-5)
        assert panel[a["gene_ids"][1:]].all()
    plain_whole = CellTextDataset(cells, cls_id=1, max_genes=64)
    plain_part = CellTextDataset(sub, cls_id=1, max_genes=64)
    j = 0
    assert plain_whole[pos[sub.obs_names[j]]]["gene_ids"].tolist() != plain_part[j]["gene_ids"].tolist()


def test_panel_values_are_eq1_over_the_panel():
    genes = np.array([3, 5, 7, 9])
    counts = np.array([1.0, 4.0, 10.0, 85.0])
    vals = np.log1p(counts / counts.sum() * 1e4).astype(np.float32)
    panel = np.zeros(12, dtype=bool)
    panel[[3, 5, 7]] = True
    ids, v = tokenize_cell(genes, vals, cls_id=1, max_genes=10, input_genes=panel, target_sum=1e4)
    assert ids.tolist() == [1, 7, 5, 3]
    np.testing.assert_allclose(v[1:], np.log1p(np.array([10.0, 4.0, 1.0]) / 15.0 * 1e4), rtol=1e-5)
    # without target_sum (as_is input) the panel only selects
    ids, v = tokenize_cell(genes, vals, cls_id=1, max_genes=10, input_genes=panel)
    np.testing.assert_allclose(v[1:], vals[[2, 1, 0]])


def test_panel_must_match_the_vocabulary(cells):
    from scmmgpt.errors import InputDataError

    with pytest.raises(InputDataError, match="input panel has 5 genes"):
        CellTextDataset(cells, cls_id=1, max_genes=8, input_genes=np.ones(5, dtype=bool))


def _tiny(n_input_genes):
    from scmmgpt.models.config import ModelConfig

    cfg = ModelConfig.from_preset("tiny", max_genes=32, n_input_genes=n_input_genes)
    cfg.qformer.n_layers, cfg.qformer.n_query, cfg.qformer.cross_attention_freq = 1, 2, 1
    return cfg


def test_fit_chooses_the_panel_once_and_the_model_keeps_it(tmp_path):
    """A fresh model with n_input_genes picks its panel from the training cells, records the types
    it was trained on, saves both and reads cells through the panel; training again keeps them; a
    model without the setting reads every gene."""
    from scmmgpt.data.labelled import DataConfig, load_labelled
    from scmmgpt.models.scmmgpt import ScMMGPT
    from scmmgpt.train.config import TrainConfig
    from scmmgpt.train.loop import fit
    from tests.conftest import PBMC3K

    lab = load_labelled(DataConfig(path=str(PBMC3K)))
    model = ScMMGPT.build(_tiny(300), lab.vocab, with_lm=False)
    assert model.config.input_genes is None and model.reading["input_genes"] is None
    train = lab.dataset("train", **model.reading)
    tc = TrainConfig(stage="stage1", max_steps=2, batch_size=8, warmup_steps=1, progress=False, log_every=1)
    fit(model, train, tc, train_types=lab.types("train"))
    expected = variable_genes(lab.cells.subset(lab.split["train"]), 300)
    assert model.config.input_genes == [lab.vocab.tokens[i] for i in expected]
    assert train.input_genes is not None and np.array_equal(np.flatnonzero(train.input_genes), np.sort(expected))
    assert set(model.config.trained_types) == {lab.label_set()[t] for t in set(lab.types("train"))}
    test = lab.dataset("test", **model.reading)
    assert all(train.input_genes[test[i]["gene_ids"][1:]].all() for i in range(5))

    model.save_pretrained(tmp_path / "m")
    back = ScMMGPT.from_pretrained(tmp_path / "m", with_lm=False)
    assert back.config.input_genes == model.config.input_genes
    assert back.config.trained_types == model.config.trained_types
    fit(back, lab.dataset("train", **back.reading), tc)              # a second run keeps the panel
    assert back.config.input_genes == model.config.input_genes

    plain = ScMMGPT.build(_tiny(None), lab.vocab, with_lm=False)
    fit(plain, lab.dataset("train", **plain.reading), tc)
    assert plain.config.input_genes is None and plain.reading["input_genes"] is None


def test_a_trained_model_without_a_panel_keeps_reading_every_gene(tmp_path):
    """A model whose first run needed no panel (its data had fewer genes than n_input_genes) does not
    pick one on a later run over more genes: fine-tuning would read cells differently from
    pre-training, and from the zero-shot model it started from."""
    from scmmgpt.data.labelled import DataConfig, load_labelled
    from scmmgpt.models.scmmgpt import ScMMGPT
    from scmmgpt.train.config import TrainConfig
    from scmmgpt.train.loop import fit
    from tests.conftest import PBMC3K

    lab = load_labelled(DataConfig(path=str(PBMC3K)))
    tc = TrainConfig(stage="stage1", max_steps=1, batch_size=8, warmup_steps=1, progress=False, log_every=1)
    model = ScMMGPT.build(_tiny(300), lab.vocab, with_lm=False)
    few = lab.cells.subset(lab.split["train"])
    # the first run sees data with fewer measured genes than the panel size: no panel
    assert variable_genes(few, 10**6) is None
    model.net.config = type(model.config).from_dict({**model.config.to_dict(), "n_input_genes": 10**6})
    fit(model, lab.dataset("train", **model.reading), tc)
    assert model.config.input_genes is None
    model.save_pretrained(tmp_path / "m")
    back = ScMMGPT.from_pretrained(tmp_path / "m", with_lm=False)
    back.net.config = type(back.config).from_dict({**back.config.to_dict(), "n_input_genes": 300})
    fit(back, lab.dataset("train", **back.reading), TrainConfig(stage="annotate", max_steps=1, batch_size=8,
                                                                warmup_steps=1, progress=False))
    assert back.config.input_genes is None and back.reading["input_genes"] is None
    # a fresh model with the same setting does pick one
    fresh = ScMMGPT.build(_tiny(300), lab.vocab, with_lm=False)
    fit(fresh, lab.dataset("train", **fresh.reading), tc)
    assert fresh.config.input_genes is not None
