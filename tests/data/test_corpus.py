"""The pre-training corpus (issue 18, item 2): labels harmonised to the Cell Ontology, ambiguous and
other-organism cells left out and counted, one vocabulary over every dataset's genes, each dataset's
measured genes recorded, shards that training reads."""

import json

import numpy as np
import pytest

from scmmgpt.data.corpus import CorpusEntry, build_corpus, harmonise_labels, load_corpus_info
from scmmgpt.data.labelled import DataConfig, load_labelled
from scmmgpt.errors import InputDataError
from tests.conftest import PBMC3K


def _pbmc3k_variant(tmp_path):
    """The repository's pbmc3k subset with an ambiguous label, a mouse cell, an unmatched label and
    a label known only by name (no id), written as a second dataset."""
    import anndata as ad

    a = ad.read_h5ad(PBMC3K)[:300].copy()
    obs = a.obs
    for col in ("cell_type", "cell_type_ontology_term_id", "organism"):
        obs[col] = obs[col].astype(str)
    obs.iloc[0, obs.columns.get_loc("cell_type")] = "?"
    obs.iloc[1, obs.columns.get_loc("organism")] = "Mus musculus"
    obs.iloc[2, obs.columns.get_loc("cell_type")] = "glorp cell"
    obs.iloc[2, obs.columns.get_loc("cell_type_ontology_term_id")] = ""
    obs.iloc[3, obs.columns.get_loc("cell_type")] = "B lymphocyte"          # a CL synonym
    obs.iloc[3, obs.columns.get_loc("cell_type_ontology_term_id")] = ""
    a = a[:, :2000].copy()                                                # measures fewer genes
    f = tmp_path / "variant.h5ad"
    a.write_h5ad(f)
    return f


def test_harmonise_labels_by_id_name_synonym_and_map():
    import pandas as pd

    obs = pd.DataFrame({"cell_type": ["whatever", "B lymphocyte", "unknown", "CD19+ B", "glorp"],
                        "cell_type_ontology_term_id": ["CL:0000236", "", "", "", ""]})
    t = harmonise_labels(obs, label_map={"CD19+ B": "CL:0000236"})
    assert t["status"].tolist() == ["ok", "ok", "ambiguous", "ok", "unresolved"]
    assert t["cl_id"].tolist()[:2] == ["CL:0000236", "CL:0000236"] and t["cl_name"][0] == "B cell"
    with pytest.raises(InputDataError, match="no label column 'celltype'"):
        harmonise_labels(obs, label_key="celltype")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("corpus")
    variant = _pbmc3k_variant(tmp_path)
    out = tmp_path / "corpus"
    info = build_corpus(["pbmc68k_reduced", CorpusEntry(str(variant), name="pbmc3k_part")], out,
                        cells_per_shard=200)
    return variant, out, info


def test_build_corpus_from_two_datasets(corpus):
    variant, out, info = corpus
    assert info == load_corpus_info(out) == json.loads((out / "corpus.json").read_text())
    rec = {r["name"]: r for r in info["datasets"]}
    v = rec["pbmc3k_part"]
    assert (v["left_out_ambiguous"], v["left_out_organism"], v["left_out_unresolved"]) == (1, 1, 1)
    assert v["unresolved_labels"] == ["glorp cell"] and v["n_kept"] == 297
    assert rec["pbmc68k_reduced"]["n_kept"] == 700 and rec["pbmc68k_reduced"]["left_out_ambiguous"] == 0
    # pbmc68k's marker-style labels became CL names: both datasets speak one label language
    assert "B cell" in rec["pbmc68k_reduced"]["types"] and "B cell" in v["types"]
    # one vocabulary over both datasets' genes; each dataset's measured genes recorded
    lab = load_labelled(DataConfig(path=str(out), label_key="cell_type"))
    assert len(lab.cells) == 997 and info["n_cells"] == 997
    m68, m3k = (np.load(out / "measured" / f"{n}.npy") for n in ("pbmc68k_reduced", "pbmc3k_part"))
    assert m68.sum() == rec["pbmc68k_reduced"]["n_measured_genes"] <= 765
    assert m3k.sum() == v["n_measured_genes"] <= 2000
    assert (m68 | m3k).sum() == info["n_genes"] and (m68 & ~m3k).any() and (m3k & ~m68).any()
    assert set(lab.descriptions["cell_type"].astype(str)) == set(rec["pbmc68k_reduced"]["types"]) | set(v["types"])
    assert not lab.descriptions["ambiguous"].any()
    # the cell labelled by a synonym only is read as its term
    import anndata as ad

    kept = ad.read_h5ad(out / v["input"])
    third = kept.obs.iloc[0]             # rows 0-2 were left out; row 3 is the synonym
    assert third["cell_type_original"] == "B lymphocyte" and third["cell_type"] == "B cell"
    assert third["cell_type_ontology_term_id"] == "CL:0000236" and third["dataset"] == "pbmc3k_part"
    # a second run on the same folder keeps what is there
    again = build_corpus(["pbmc68k_reduced", CorpusEntry(str(variant), name="pbmc3k_part")], out,
                         cells_per_shard=200)
    assert again["n_cells"] == 997


def test_corpus_refuses_clashing_names_and_skips_other_organisms(tmp_path):
    with pytest.raises(InputDataError, match="share a name"):
        build_corpus(["pbmc68k_reduced", "pbmc68k_reduced"], tmp_path / "c")
    with pytest.raises(InputDataError, match="organism must be one of"):
        build_corpus(["pbmc68k_reduced"], tmp_path / "c", organism="zebrafish")
    # a dataset of another organism is skipped whole, with the reason
    with pytest.raises(InputDataError, match="its genes are homo_sapiens, not mus_musculus"):
        build_corpus(["pbmc68k_reduced"], tmp_path / "m", organism="mus_musculus")


def test_corpus_cells_scored_on_their_own_datasets_genes(corpus):
    """Each cell's PCGen mask is its source dataset's measured genes, not the union of the corpus."""
    import torch

    from scmmgpt.data.source import measured_genes
    from scmmgpt.modules.losses import measured_rows, pcgen_loss
    from scmmgpt.train.loop import _measured_for

    _, out, _ = corpus
    lab = load_labelled(DataConfig(path=str(out), label_key="cell_type"))
    mg = measured_genes(lab.cells)
    assert mg.names == ("pbmc3k_part", "pbmc68k_reduced")
    np.testing.assert_array_equal(mg.masks[0], np.load(out / "measured" / "pbmc3k_part.npy"))
    np.testing.assert_array_equal(mg.masks[1], np.load(out / "measured" / "pbmc68k_reduced.npy"))
    assert all(str(n).startswith(mg.names[g] + ":") for n, g in zip(lab.cells.obs_names, mg.group))
    rows = np.array([5, 900, 3, 990])          # pbmc68k_reduced (700 cells) comes first
    assert measured_genes(lab.cells.subset(rows)).group.tolist() == mg.group[rows].tolist() == [1, 0, 1, 0]
    # a batch of cells from both: each scored on its own genes
    ds = lab.dataset("train", max_genes=64)
    masks, group = _measured_for("by_source", ds, "cpu")
    assert masks.shape == (2, len(lab.vocab)) and group.shape == (len(ds),)

    m = measured_rows(masks, group, torch.arange(len(ds))[:8])
    pred, target = torch.randn(8, len(lab.vocab)), torch.randn(8, len(lab.vocab))
    own = torch.from_numpy(mg.masks[measured_genes(ds.cells).group[:8]])
    by_hand = torch.stack([((pred[i] - target[i])[own[i]] ** 2).mean() for i in range(8)]).mean()
    assert torch.allclose(pcgen_loss(pred, target, m), by_hand)
    assert not torch.allclose(pcgen_loss(pred, target, torch.from_numpy(mg.union)), by_hand)


def test_corpus_training_balances_sources_and_types(corpus):
    """Training on a corpus draws balanced batches by default (train.balance=auto)."""
    from scmmgpt.errors import ConfigError
    from scmmgpt.models.config import ModelConfig
    from scmmgpt.models.scmmgpt import ScMMGPT
    from scmmgpt.train.config import TrainConfig
    from scmmgpt.train.loop import fit

    _, out, _ = corpus
    lab = load_labelled(DataConfig(path=str(out), label_key="cell_type"))
    cfg = ModelConfig.from_preset("tiny", max_genes=32)
    cfg.qformer.n_layers, cfg.qformer.n_query, cfg.qformer.cross_attention_freq = 1, 2, 1
    model = ScMMGPT.build(cfg, lab.vocab, with_lm=False)
    train = lab.dataset("train", max_genes=32)
    tc = TrainConfig(stage="stage1", max_steps=2, batch_size=8, warmup_steps=1, progress=False, log_every=1)
    r = fit(model, train, tc, measured="by_source", train_types=lab.types("train"))
    assert r["balance"] == "source_type" and r["steps"] == 2 and np.isfinite(r["history"][-1]["loss"])
    assert fit(model, train, tc, measured="by_source")["balance"] == "source"
    with pytest.raises(ConfigError, match="needs each training cell's type"):
        fit(model, train, TrainConfig(**{**tc.to_dict(), "balance": "type"}), measured="by_source")


def test_corpus_streams_each_dataset_in_blocks(corpus, tmp_path):
    """Read 64 rows at a time (several pieces joined on disk), the corpus is the same as in one block."""
    import anndata as ad

    variant, out, info = corpus
    again = build_corpus([CorpusEntry(str(variant), name="pbmc3k_part")], tmp_path / "blocks", block_cells=64)
    one = ad.read_h5ad(out / "inputs" / "pbmc3k_part.h5ad")
    blocks = ad.read_h5ad(tmp_path / "blocks" / "inputs" / "pbmc3k_part.h5ad")
    assert blocks.obs_names.tolist() == one.obs_names.tolist()
    assert (blocks.X != one.X).nnz == 0 and blocks.var_names.tolist() == one.var_names.tolist()
    assert blocks.obs["cell_type"].tolist() == one.obs["cell_type"].tolist()
    assert again["datasets"][0]["n_kept"] == 297 and not list((tmp_path / "blocks" / "inputs").glob(".*part*"))


def test_corpus_input_panel_keeps_the_genes_most_cells_show(corpus):
    """The input panel of a corpus holds only genes measured for at least half of its cells: here
    pbmc68k's (700 of the ~1,000 cells), not the genes only the smaller pbmc3k part measured. Among
    eligible genes, each source marks its own most variable ones, and those both mark come first."""
    from scmmgpt.data.panel import variable_genes
    from scmmgpt.data.source import measured_genes

    _, out, _ = corpus
    lab = load_labelled(DataConfig(path=str(out), label_key="cell_type"))
    mg = measured_genes(lab.cells)
    big = int(np.argmax(np.bincount(mg.group)))
    assert mg.names[big] == "pbmc68k_reduced" and (mg.group == big).mean() > 0.5
    top = variable_genes(lab.cells, 500)
    assert top is not None and len(top) == 500 and mg.masks[big, top].all()
    # with no coverage asked, the other dataset's genes count too
    every = variable_genes(lab.cells, 500, min_coverage=0.0)
    assert not mg.masks[big, every].all()
    marked = [set(variable_genes(lab.cells.subset(np.flatnonzero(mg.group == g)), 500).tolist()) for g in range(2)]
    shared = marked[0] & marked[1]
    assert 50 < len(shared) < 500 and set(every[:len(shared)].tolist()) == shared


def test_type_counts_order_is_fixed():
    """corpus.json lists types most first, ties by name, whatever order the cells come in."""
    import pandas as pd

    from scmmgpt.data.corpus import _type_counts

    cells = ["beta", "alpha", "delta", "beta", "alpha", "gamma", "delta", "beta"]
    for order in (cells, cells[::-1]):
        assert list(_type_counts(pd.Series(order)).items()) == [("beta", 3), ("alpha", 2), ("delta", 2), ("gamma", 1)]
