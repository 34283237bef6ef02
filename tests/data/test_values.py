import numpy as np
import pytest
import scipy.sparse as sp

from scmmgpt.data.values import detect_value_kind, normalize_total_log1p, quantile_bin
from scmmgpt.errors import InputDataError


def _seurat_lognorm(X):
    """Seurat's LogNormalize (scale 1e4) of a counts matrix."""
    dense = X.toarray().astype(np.float64)
    return sp.csr_matrix(np.log1p(1e4 * dense / dense.sum(1, keepdims=True)).astype(np.float32))


def test_detect_kinds_on_real_data(pbmc3k, pbmc68k):
    assert detect_value_kind(pbmc3k.X) == "counts"
    assert detect_value_kind(_seurat_lognorm(pbmc3k.X[:300])) == "lognorm"
    assert detect_value_kind(pbmc68k.raw.X) == "lognorm"
    assert detect_value_kind(pbmc68k.X) == "scaled"
    assert detect_value_kind(pbmc3k.X * 100.5) == "normalized"


def test_eq1_on_counts_matches_formula(pbmc3k):
    X = pbmc3k.X[:50]
    out, kind = normalize_total_log1p(X)
    assert kind == "counts"
    dense = X.toarray().astype(np.float64)
    expected = np.log1p(dense / dense.sum(1, keepdims=True))
    np.testing.assert_allclose(out.toarray(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.shared_data
def test_lognorm_path_recovers_eq1_of_counts(pbmc3k_full):
    """pbmc3k's counts were rebuilt exactly from Seurat's log-normalised layer: both paths agree."""
    a, _ = normalize_total_log1p(pbmc3k_full.X[:200])
    b, kind = normalize_total_log1p(pbmc3k_full.layers["lognorm_seurat"][:200])
    assert kind == "lognorm"
    np.testing.assert_allclose(a.toarray(), b.toarray(), rtol=1e-3, atol=1e-6)


def test_target_sum_scales():
    X = sp.csr_matrix(np.array([[1, 3, 0], [2, 2, 4]], dtype=np.float32))
    out, _ = normalize_total_log1p(X, target_sum=1e4)
    np.testing.assert_allclose(out.toarray()[0, :2], np.log1p([2500, 7500]), rtol=1e-6)


def test_scaled_refused_with_fix(pbmc68k):
    with pytest.raises(InputDataError, match="negative values.*raw counts"):
        normalize_total_log1p(pbmc68k.X)
    out, kind = normalize_total_log1p(pbmc68k.X, value_kind="as_is")
    assert kind == "as_is" and out.min() < 0


def test_nan_and_inf_refused():
    X = np.array([[1.0, np.nan], [2.0, 3.0]])
    with pytest.raises(InputDataError, match="NaN/inf"):
        normalize_total_log1p(X)
    with pytest.raises(InputDataError, match="NaN/inf"):
        detect_value_kind(sp.csr_matrix(np.array([[np.inf, 1.0]])))


def test_negative_on_counts_path_refused():
    X = sp.csr_matrix(np.array([[1.0, -2.0], [2.0, 3.0]]))
    with pytest.raises(InputDataError, match="negative"):
        normalize_total_log1p(X, value_kind="counts")


def test_zero_cell_stays_zero():
    out, _ = normalize_total_log1p(np.array([[0, 0], [1, 1]], dtype=np.float32))
    assert out[0].nnz == 0


def test_quantile_bin_properties():
    rng = np.random.default_rng(0)
    v = np.where(rng.random(500) < 0.5, 0.0, rng.gamma(1.0, 2.0, 500))
    b = quantile_bin(v, 51)
    assert (b[v == 0] == 0).all()
    assert b[v > 0].min() == 1 and b[v > 0].max() == 50
    order = np.argsort(v[v > 0])
    assert np.all(np.diff(b[v > 0][order]) >= 0)  # monotone in the value
    assert quantile_bin(np.zeros(5)).sum() == 0


def test_quantile_bin_spreads_ties_over_their_bins():
    # a count cell: most expressed genes hold 1 or 2 reads, so many bin edges equal those values
    counts = np.array([1.0] * 60 + [2.0] * 25 + [3, 4, 5, 7, 9, 12, 20, 40, 80, 150], dtype=np.float32)
    v = np.log1p(1e4 * counts / counts.sum()).astype(np.float32)
    b = quantile_bin(v, 51, seed=3)
    edges = np.quantile(v, np.linspace(0, 1, 50))
    ones = b[counts == 1]
    # the 60 tied cells spread over the bins their value's edges span, as scGPT's draw does
    lo, hi = np.digitize(v[0], edges, right=True) + 1, np.digitize(v[0], edges)
    assert hi - lo > 10 and ones.min() >= lo and ones.max() <= hi
    assert len(np.unique(ones)) > 10
    assert np.all(b[counts == 2] >= ones.max())                      # still monotone across values
    np.testing.assert_array_equal(quantile_bin(v, 51, seed=3), b)   # reproducible by seed
    assert not np.array_equal(quantile_bin(v, 51, seed=4), b)
    assert b[-1] == 50 and np.all(np.diff(b[counts > 2]) >= 0)
