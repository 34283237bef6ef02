import anndata as ad
import numpy as np
import pytest

from scmmgpt.data import GeneVocab, prepare_cells, read_h5ad
from scmmgpt.errors import InputDataError
from tests.conftest import DATASETS, PBMC3K, data_path


def _toy(X, genes=("CD3E", "MS4A1", "LYZ", "NKG7")):
    a = ad.AnnData(np.asarray(X, dtype=np.float32))
    a.var_names = list(genes)[: a.n_vars]
    a.obs_names = [f"c{i}" for i in range(a.n_obs)]
    return a


VOCAB = GeneVocab.from_genes(["CD3E", "MS4A1", "LYZ", "NKG7"])


@pytest.mark.shared_data
@pytest.mark.parametrize("name", DATASETS)
def test_every_shared_dataset(name):
    a = read_h5ad(data_path(name))
    vocab = GeneVocab.from_genes(["CD3E", "MS4A1", "LYZ"] + list(a.var["gene_symbol"] if "gene_symbol" in a.var else a.var_names))
    cells = prepare_cells(a, vocab, min_coverage=0.0)
    assert cells.value_kind == "counts"
    assert len(cells) == a.n_obs
    assert cells.gene_match.n_mapped > 0.5 * a.n_vars
    row = cells.expr[0]
    assert np.all(row.data > 0) and np.all(row.data < np.log(2) + 1e-6)  # log(1 + fraction)
    # fractions of the library in vocabulary genes: <= 1, and close to 1 where coverage is high
    sums = np.expm1(cells.expr[:50].toarray().astype(np.float64)).sum(1)
    assert np.all(sums <= 1 + 1e-4)
    assert abs(sums.mean() - cells.gene_match.coverage) < 0.1


def test_pbmc68k_raw_lognorm(pbmc68k):
    vocab = GeneVocab.from_genes(pbmc68k.raw.var_names)
    with pytest.raises(InputDataError, match="scaled"):
        prepare_cells(pbmc68k, vocab)
    cells = prepare_cells(pbmc68k, vocab, use_raw=True)
    assert cells.value_kind == "lognorm" and len(cells) == 700


def test_backed_equals_in_memory(pbmc3k_vocab):
    path = PBMC3K
    mem = prepare_cells(read_h5ad(path), pbmc3k_vocab)
    backed = prepare_cells(read_h5ad(path, backed=True), pbmc3k_vocab, chunk_size=500)
    assert (mem.expr != backed.expr).nnz == 0


def test_layer_and_raw_selection(pbmc3k, pbmc3k_vocab):
    b = pbmc3k[:100].copy()
    dense = b.X.toarray().astype(np.float64)
    b.layers["lognorm"] = np.log1p(1e4 * dense / dense.sum(1, keepdims=True)).astype(np.float32)
    a = prepare_cells(b, pbmc3k_vocab, layer="lognorm")
    assert a.value_kind == "lognorm"
    with pytest.raises(InputDataError, match="no layer 'nope'"):
        prepare_cells(pbmc3k, pbmc3k_vocab, layer="nope")
    with pytest.raises(InputDataError, match="adata.raw is empty"):
        prepare_cells(pbmc3k, pbmc3k_vocab, use_raw=True)


def test_missing_file(tmp_path):
    with pytest.raises(InputDataError, match="does not exist"):
        read_h5ad(tmp_path / "none.h5ad")


def test_not_h5ad(tmp_path):
    p = tmp_path / "x.h5ad"
    p.write_text("cell,gene\n")
    with pytest.raises(InputDataError, match="not an .h5ad"):
        read_h5ad(p)


def test_truncated_h5ad(tmp_path):
    src = PBMC3K.read_bytes()
    p = tmp_path / "t.h5ad"
    p.write_bytes(src[: len(src) // 3])
    with pytest.raises(InputDataError, match="t.h5ad"):
        read_h5ad(p)


def test_empty_matrix():
    with pytest.raises(InputDataError, match="empty"):
        prepare_cells(_toy(np.zeros((0, 4))), VOCAB)


def test_zero_count_cells_dropped_with_warning():
    a = _toy([[1, 2, 0, 0], [0, 0, 0, 0], [0, 5, 5, 1]])
    with pytest.warns(UserWarning, match="Dropped 1 of 3 cells"):
        cells = prepare_cells(a, VOCAB)
    assert list(cells.obs_names) == ["c0", "c2"] and cells.n_dropped_empty == 1


def test_nan_refused():
    with pytest.raises(InputDataError, match="NaN/inf"):
        prepare_cells(_toy([[1, np.nan, 0, 0]]), VOCAB)


def test_negative_on_counts_path():
    with pytest.raises(InputDataError, match="negative"):
        prepare_cells(_toy([[1, -1, 0, 2]]), VOCAB, value_kind="counts")


def test_duplicate_genes():
    a = _toy([[1, 2, 3, 4]], genes=("CD3E", "CD3E", "LYZ", "NKG7"))
    with pytest.raises(InputDataError, match="duplicate gene names.*var_names_make_unique"):
        prepare_cells(a, VOCAB)


def test_no_overlap_and_low_coverage():
    a = _toy([[1, 2, 3, 4]], genes=("G1", "G2", "G3", "G4"))
    with pytest.raises(InputDataError, match="None of the 4 genes"):
        prepare_cells(a, VOCAB)
    b = _toy([[1, 1, 30, 30]], genes=("CD3E", "MS4A1", "G3", "G4"))
    with pytest.raises(InputDataError, match="min_coverage"):
        prepare_cells(b, VOCAB)
    assert len(prepare_cells(b, VOCAB, min_coverage=0.0)) == 1


@pytest.mark.shared_data
def test_gene_symbol_key():
    a = ad.read_h5ad(data_path("muscat_kang_se.h5ad"))[:50]
    vocab = GeneVocab.from_genes(a.var["gene_symbol"])
    cells = prepare_cells(a, vocab, gene_symbol_key="gene_symbol")
    assert cells.gene_match.n_mapped == a.var["gene_symbol"].nunique()
    with pytest.raises(InputDataError, match="no column 'sym'"):
        prepare_cells(a, vocab, gene_symbol_key="sym")
