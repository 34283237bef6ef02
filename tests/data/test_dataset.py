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
