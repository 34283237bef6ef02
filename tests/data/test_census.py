"""The Census / TileDB-SOMA source (issue 7), offline: a local SOMA experiment written with
tiledbsoma from a shared dataset, queried with the paper's filter (10x, primary data), streamed in
blocks and turned into training shards."""

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from scmmgpt.data import GeneVocab, prepare_cells
from scmmgpt.data.census import CensusFilter, SomaSource, soma_blocks, soma_joinids
from scmmgpt.data.shards import ShardedCells, write_shards
from scmmgpt.errors import InputDataError
from tests.conftest import PBMC3K

soma = pytest.importorskip("tiledbsoma")
import tiledbsoma.io  # noqa: E402


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    a = ad.read_h5ad(PBMC3K)[:600].copy()
    rng = np.random.default_rng(0)
    a.obs["assay"] = np.where(rng.random(a.n_obs) < 0.75, "10x 3' v2", "Smart-seq2")
    a.obs["is_primary_data"] = rng.random(a.n_obs) < 0.8
    a.obs["tissue_general"] = "blood"
    a.obs["obs_id"] = a.obs_names.astype(str)
    a.var["feature_id"] = a.var_names.astype(str)
    uri = str(tmp_path_factory.mktemp("soma") / "exp")
    tiledbsoma.io.from_anndata(uri, a, measurement_name="RNA", X_layer_name="raw")
    keep = (a.obs["assay"] == "10x 3' v2").to_numpy() & a.obs["is_primary_data"].to_numpy()
    return uri, a, keep


def test_filter_expression():
    f = CensusFilter(tissue=["lung"], cell_type="B cell", extra="sex == 'female'")
    text = f.value_filter()
    assert text.startswith("is_primary_data == True and assay in ['10x 3\\' v1'")
    assert "tissue_general in ['lung']" in text and "cell_type in ['B cell']" in text and text.endswith(
        "(sex == 'female')")
    assert CensusFilter(tenx_only=False, primary_only=False).value_filter() is None
    with pytest.raises(InputDataError, match="selects no cells"):
        CensusFilter(tissue=[]).value_filter()


def test_paper_filter_selects_10x_primary_cells(experiment):
    uri, a, keep = experiment
    src = SomaSource(uri)
    ids = soma_joinids(src)
    assert len(ids) == keep.sum() > 0
    blocks = list(soma_blocks(src, block_size=100))
    assert [b.n_obs for b in blocks[:-1]] == [100] * (len(blocks) - 1) and blocks[-1].n_obs <= 100
    got = ad.concat(blocks)
    assert list(got.obs_names) == list(a.obs_names[keep])
    assert set(got.obs["assay"]) == {"10x 3' v2"} and got.obs["is_primary_data"].all()
    ref = a[keep]
    ref = ref[:, list(got.var_names)]
    assert (sp.csr_matrix(got.X) != sp.csr_matrix(ref.X)).nnz == 0      # the same counts
    everything = SomaSource(uri, CensusFilter(tenx_only=False, primary_only=False))
    assert len(soma_joinids(everything)) == a.n_obs
    only_b = SomaSource(uri, CensusFilter(cell_type=["B cell"], tenx_only=False, primary_only=False))
    assert len(soma_joinids(only_b)) == int((a.obs["cell_type"] == "B cell").sum())


def test_soma_errors(experiment, tmp_path):
    uri, _, _ = experiment
    with pytest.raises(InputDataError, match="lacks \\['organ_system'\\]"):
        soma_joinids(SomaSource(uri, CensusFilter(tissue=["blood"], tissue_column="organ_system")))
    with pytest.raises(InputDataError, match="No cell of"):
        list(soma_blocks(SomaSource(uri, CensusFilter(tissue=["lung"]))))
    with pytest.raises(InputDataError, match="Could not open the SOMA experiment"):
        soma_joinids(SomaSource(str(tmp_path / "nothing")))


def test_shards_from_soma(experiment, tmp_path):
    uri, a, keep = experiment
    vocab = GeneVocab.from_genes(a.var_names)
    m = write_shards(SomaSource(uri), tmp_path / "shards", vocab=vocab, cells_per_shard=200)
    assert m["n_cells"] == keep.sum() and len(m["shards"]) == int(np.ceil(keep.sum() / 200))
    cells = ShardedCells(tmp_path / "shards")
    ref = prepare_cells(a[keep].copy(), vocab, target_sum=1e4)
    assert len(cells) == len(ref)
    for i in (0, len(ref) // 2, len(ref) - 1):
        g, v = cells.row(i)
        rg, rv = ref.row(i)
        assert (g == rg).all() and np.allclose(v, rv)
