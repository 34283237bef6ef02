"""Bad inputs at the data boundary (issue 8, first part): each is a specific InputDataError that
names the problem and the fix, or a documented warning — never a raw traceback or silent output."""

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scmmgpt.data import DescriptionBuilder, DescriptionConfig, GeneVocab, prepare_cells, read_h5ad
from scmmgpt.errors import InputDataError
from tests.conftest import PBMC3K, data_path


@pytest.fixture(scope="module")
def small():
    a = ad.read_h5ad(PBMC3K)[:200].copy()
    return a, GeneVocab.from_genes(a.var_names)


def _with_x(a, x):
    b = a.copy()
    b.X = x
    return b


def _dense(a):
    return a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)


@pytest.mark.parametrize("bad, match", [(np.nan, "NaN/inf"), (np.inf, "NaN/inf"), (-np.inf, "NaN/inf")])
def test_non_finite_values(small, bad, match):
    a, v = small
    x = _dense(a).copy()
    x[3, 7] = bad
    with pytest.raises(InputDataError, match=match):
        prepare_cells(_with_x(a, x), v)


def test_negative_values_on_a_counts_path(small):
    a, v = small
    with pytest.raises(InputDataError, match="negative values.*scaled"):
        prepare_cells(_with_x(a, _dense(a) - 1), v)


def test_non_numeric_matrix(small):
    _, v = small
    b = ad.AnnData(X=np.array([["1", "2"]], dtype=object), var=pd.DataFrame(index=["CD3E", "LYZ"]))
    with pytest.raises(InputDataError, match="dtype object; expected numbers"):
        prepare_cells(b, v)


def test_all_zero_matrix_and_zero_cells(small):
    a, v = small
    with pytest.raises(InputDataError, match="Every cell .* is empty"):
        prepare_cells(_with_x(a, np.zeros(a.shape, np.float32)), v)
    with pytest.raises(InputDataError, match="is empty \\(0 cells"):
        prepare_cells(a[:0].copy(), v)


def test_some_empty_cells_are_dropped_with_a_warning(small):
    a, v = small
    x = _dense(a).copy()
    x[:5] = 0
    with pytest.warns(UserWarning, match="Dropped 5 of 200 cells"):
        cells = prepare_cells(_with_x(a, sp.csr_matrix(x)), v)
    assert len(cells) == 195 and 0 not in cells.cell_index[:1]


def test_integer_matrix_is_taken_as_counts(small):
    a, v = small
    cells = prepare_cells(_with_x(a, _dense(a).astype(np.int64)), v)
    assert cells.value_kind == "counts"


def test_duplicate_gene_and_cell_names(small):
    a, v = small
    b = a.copy()
    b.var_names = ["GENE"] * b.n_vars
    with pytest.raises(InputDataError, match="duplicate gene names.*var_names_make_unique"):
        prepare_cells(b, v)
    c = a.copy()
    c.obs_names = ["cell"] * c.n_obs
    with pytest.warns(UserWarning, match="200 duplicate cell names|199 duplicate cell names"):
        prepare_cells(c, v)


def test_no_gene_overlap_and_low_coverage(small):
    a, v = small
    b = a.copy()
    b.var_names = [f"{g}_x" for g in b.var_names]
    with pytest.raises(InputDataError, match="None of the 3000 genes"):
        prepare_cells(b, v)
    few = GeneVocab.from_genes(a.var_names[:30])
    with pytest.raises(InputDataError, match="below min_coverage"):
        prepare_cells(a, few)


def test_fractional_values_forced_as_counts_warn(small):
    a, v = small
    with pytest.warns(UserWarning, match="non-integer values"):
        prepare_cells(_with_x(a, np.log1p(_dense(a))), v, value_kind="counts")


@pytest.mark.shared_data
def test_unreadable_files(tmp_path):
    with pytest.raises(InputDataError, match="does not exist"):
        read_h5ad(tmp_path / "missing.h5ad")
    with pytest.raises(InputDataError, match="is a directory"):
        read_h5ad(tmp_path)
    (tmp_path / "notes.h5ad").write_text("not hdf5")
    with pytest.raises(InputDataError, match="not an .h5ad"):
        read_h5ad(tmp_path / "notes.h5ad")
    trunc = tmp_path / "trunc.h5ad"
    trunc.write_bytes(data_path("symphony_pbmcs_small.h5ad").read_bytes()[:100_000])
    with pytest.raises(InputDataError, match="Could not read"):
        read_h5ad(trunc)


def test_label_column_missing_or_all_unknown(small):
    a, _ = small
    with pytest.raises(InputDataError, match="no column 'nope'"):
        DescriptionBuilder(DescriptionConfig(cell_type_key="nope")).build(a.obs)
    obs = pd.DataFrame({"cell_type": ["unknown", "?", "", None]}, index=list("abcd"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = DescriptionBuilder(DescriptionConfig()).build(obs)
    assert out["ambiguous"].all() and (out["description"] == "").all()


@pytest.mark.shared_data
def test_mouse_genes_into_a_human_vocabulary_warn(small):
    _, human = small
    mouse = ad.read_h5ad(data_path("cluey_mouse_lung.h5ad"))[:100].copy()   # upper-cased symbols: 0610007P14RIK
    with pytest.warns(UserWarning, match="look like mouse .* vocabulary is human .* not orthology"):
        cells = prepare_cells(mouse, human, min_coverage=0.0)
    assert cells.gene_match.organism == "mus_musculus"
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # human genes into a human vocabulary: no warning
        prepare_cells(small[0], human)


@pytest.mark.shared_data
def test_ensembl_and_symbol_mix_maps_both(small):
    from scmmgpt.data.prepare import map_genes

    a = ad.read_h5ad(data_path("muscat_kang_se.h5ad"), backed="r")   # Ensembl ids, symbols in var
    ens = np.asarray(a.var_names, dtype=object)
    sym = a.var["gene_symbol"].astype(str).to_numpy()
    vocab = GeneVocab.from_genes(pd.unique(sym))
    mixed = ens.copy()
    mixed[::2] = sym[::2]                                            # every other gene as a symbol
    keep = ~pd.Index(mixed).duplicated(keep=False)
    ids, organism, id_type = map_genes(mixed[keep], vocab)
    ids_ens, _, _ = map_genes(ens[keep], vocab)
    ids_sym = vocab.encode(list(sym[keep]))
    is_sym = (np.arange(len(ens)) % 2 == 0)[keep]
    assert id_type == "mixed" and organism == "homo_sapiens"
    # each gene maps as its own kind would: symbols directly, Ensembl ids through GENCODE
    assert (ids == np.where(is_sym, ids_sym, ids_ens)).all()
    assert (ids[is_sym] >= 0).mean() > 0.99 and (ids[~is_sym] >= 0).mean() > 0.85


def test_all_zero_genes_are_kept_as_measured(small):
    a, v = small
    x = _dense(a).copy()
    x[:, :50] = 0
    cells = prepare_cells(_with_x(a, x), v)
    ids = v.encode(list(a.var_names[:50]))
    assert cells.measured[ids[ids >= 0]].all()               # measured, with zero expression
    assert cells.expr[:, ids[ids >= 0]].nnz == 0


def test_memory_guard_on_preparing_cells(small, monkeypatch):
    from scmmgpt.errors import ResourceError

    a, v = small
    monkeypatch.setenv("SCMMGPT_MEMORY_LIMIT", "10K")
    with pytest.raises(ResourceError, match="prepared cells .* Process the cells in parts"):
        prepare_cells(a, v, chunk_size=50)
    monkeypatch.setenv("SCMMGPT_MEMORY_LIMIT", "1G")
    assert len(prepare_cells(a, v, chunk_size=50)) == 200
