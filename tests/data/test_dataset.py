import numpy as np
import pytest

from scmmgpt.data import (
    CellTextCollator,
    CellTextDataset,
    DescriptionBuilder,
    LengthBucketSampler,
    prepare_cells,
    stratified_split,
    tokenize_cell,
)
from scmmgpt.errors import InputDataError


def test_tokenize_top_k_by_value():
    genes = np.array([10, 11, 12, 13])
    vals = np.array([0.1, 0.5, 0.3, 0.5], dtype=np.float32)
    ids, v = tokenize_cell(genes, vals, cls_id=1, max_genes=3)
    assert ids.tolist() == [1, 11, 13, 12]  # <cls> first, then by value, ties by gene id
    np.testing.assert_allclose(v, [0, 0.5, 0.5, 0.3])
    ids, _ = tokenize_cell(genes, vals, cls_id=1, max_genes=100)
    assert len(ids) == 5  # fewer kept when fewer are expressed


@pytest.fixture(scope="module")
def ds(pbmc3k, pbmc3k_vocab):
    cells = prepare_cells(pbmc3k, pbmc3k_vocab)
    desc = DescriptionBuilder().build(pbmc3k.obs.iloc[cells.cell_index])
    return CellTextDataset(cells, list(desc["description"]), cls_id=pbmc3k_vocab.cls_id, max_genes=256,
                           with_targets=True)


def test_dynamic_padding_and_targets(ds, pbmc3k_vocab):
    from transformers import AutoTokenizer

    from scmmgpt import assets

    tok = AutoTokenizer.from_pretrained(assets.minilm_dir())
    col = CellTextCollator(pad_id=pbmc3k_vocab.pad_id, tokenizer=tok, vocab_size=len(pbmc3k_vocab))
    items = [ds[i] for i in range(4)]
    b = col(items)
    L = max(len(it["gene_ids"]) for it in items)
    assert b.gene_ids.shape == (4, L) <= (4, 257)
    assert (b.gene_ids[:, 0] == pbmc3k_vocab.cls_id).all()
    assert (b.gene_ids[b.padding_mask] == pbmc3k_vocab.pad_id).all()
    assert b.text_input_ids.shape[0] == 4 and b.text_attention_mask.sum() > 0
    assert b.target.shape == (4, len(pbmc3k_vocab))
    row = ds.cells.expr[0].toarray().ravel()
    np.testing.assert_allclose(b.target[0].numpy(), row)


def test_length_bucketing_reduces_padding(ds):
    lengths = CellTextDataset(ds.cells, cls_id=1, max_genes=2048).lengths()
    assert lengths.max() > 2 * lengths.min()
    bucketed = LengthBucketSampler(lengths, 16, seed=0)
    plain = LengthBucketSampler(lengths, 16, seed=0, pool_batches=1)
    def waste(sampler):
        return sum(len(b) * max(lengths[b]) - lengths[b].sum() for b in sampler)
    assert waste(bucketed) < 0.5 * waste(plain)
    assert sorted(i for b in bucketed for i in b) == list(range(len(lengths)))


def test_sampler_ranks_disjoint_and_equal(ds):
    lengths = ds.lengths()
    r0 = list(LengthBucketSampler(lengths, 8, num_replicas=2, rank=0))
    r1 = list(LengthBucketSampler(lengths, 8, num_replicas=2, rank=1))
    assert len(r0) == len(r1)
    covered = {i for b in r0 + r1 for i in b}
    assert covered == set(range(len(lengths)))


def test_stratified_split():
    labels = np.array(["a"] * 50 + ["b"] * 20 + ["c"] * 3 + ["?"] * 5, dtype=object)
    exclude = labels == "?"
    s = stratified_split(labels, (0.8, 0.1, 0.1), seed=1, exclude=exclude)
    allidx = np.concatenate(list(s.values()))
    assert len(allidx) == len(set(allidx)) == 73
    assert not set(np.flatnonzero(exclude)) & set(allidx)
    for part in ("train", "val", "test"):
        assert {"a", "b", "c"} <= set(labels[s[part]])
    assert all((stratified_split(labels, seed=1, exclude=exclude)[k] == s[k]).all() for k in s)
    with pytest.raises(InputDataError):
        stratified_split(labels, (0.5, 0.5, 0.5))


def test_binned_dataset(pbmc68k):
    from scmmgpt.data import GeneVocab

    vocab = GeneVocab.from_genes(pbmc68k.raw.var_names)
    cells = prepare_cells(pbmc68k, vocab, use_raw=True)
    ds = CellTextDataset(cells, cls_id=vocab.cls_id, max_genes=64, n_bins=51)
    item = ds[0]
    assert item["values"][0] == 0 and item["values"][1:].max() <= 50 and item["values"][1:].min() >= 1


def _two_sources():
    """A large source A (types x: 800, y: 100) and a small one B (z: 95, w: 5)."""
    sources = np.array(["A"] * 900 + ["B"] * 100)
    types = np.array(["x"] * 800 + ["y"] * 100 + ["z"] * 95 + ["w"] * 5)
    return sources, types


def test_balance_weights_temper_sources_and_types():
    from scmmgpt.data.dataset import balance_weights

    sources, types = _two_sources()
    stratum, p = balance_weights(sources, types, power=0.5)
    share = {(s, t): p[stratum[i]] for i, (s, t) in enumerate(zip(sources, types))}
    # sources: sqrt(900) : sqrt(100) = 3 : 1; types inside A: sqrt(800) : sqrt(100)
    assert share["A", "x"] + share["A", "y"] == pytest.approx(0.75)
    assert share["A", "x"] / share["A", "y"] == pytest.approx(np.sqrt(8))
    assert share["B", "w"] == pytest.approx(0.25 * np.sqrt(5) / (np.sqrt(5) + np.sqrt(95)))
    # power 1: as the data comes; power 0: every source and every type in it alike
    _, p1 = balance_weights(sources, types, power=1.0)
    assert sorted(p1) == pytest.approx(sorted(np.array([800, 100, 95, 5]) / 1000))
    _, p0 = balance_weights(sources, types, power=0.0)
    assert sorted(p0) == pytest.approx([0.25] * 4)
    with pytest.raises(InputDataError, match="balance power must be in"):
        balance_weights(sources, types, power=2.0)


def test_balanced_sampler_shares_rare_types_and_resume():
    from scmmgpt.data.dataset import BalancedBatchSampler, balance_weights

    sources, types = _two_sources()
    stratum, p = balance_weights(sources, types, power=0.5)
    s = BalancedBatchSampler(stratum, p, 16, seed=3)
    counts = np.zeros(len(types))
    for epoch in range(5):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s) == 1000 // 16 and all(len(b) == 16 for b in batches)
        for b in batches:
            np.add.at(counts, b, 1)
    drawn = {t: counts[types == t].sum() / counts.sum() for t in "xyzw"}
    expect = {t: p[stratum[np.flatnonzero(types == t)[0]]] for t in "xyzw"}
    for t in "xyzw":
        assert drawn[t] == pytest.approx(expect[t], abs=0.02), (drawn, expect)
    assert drawn["x"] < 0.6 < 0.8            # the large type no longer fills the batches
    assert drawn["w"] > 0.03 > 0.005         # the 5-cell type turns up ~9x as often as in the data
    # a stratum hands out all of its cells before any of them again
    w = counts[types == "w"]
    assert w.max() - w.min() <= 5
    # same seed and epoch: same batches; resuming with skip continues them; another epoch differs
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, skip=10)
    assert list(s) == full[10:] and len(s) == len(full) - 10
    s.set_epoch(3)
    assert list(s) != full
    # ranks: disjoint halves of the same batch list, equal length
    ranks = [BalancedBatchSampler(stratum, p, 16, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(2)
    b0, b1 = list(ranks[0]), list(ranks[1])
    assert len(b0) == len(b1) == 31 and b0 == full[0:62:2] and b1 == full[1:62:2]
