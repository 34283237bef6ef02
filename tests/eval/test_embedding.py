"""Sentence-embedding metrics for generated descriptions: MMD, EMD, the closeness tests, and the
bundled embedder, on real Cell Ontology descriptions."""

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from scmmgpt.eval.embedding import closeness_tests, embed_texts, emd, mmd_rbf
from scmmgpt.eval.text import description_metrics


@pytest.fixture(scope="module")
def cl_texts():
    """Definitions of 12 immune cell types from the Cell Ontology."""
    from scmmgpt.data.ontology import cell_ontology

    cl = cell_ontology()
    ids = ["CL:0000236", "CL:0000623", "CL:0000624", "CL:0000625", "CL:0001054", "CL:0000451",
           "CL:0000233", "CL:0000815", "CL:0000897", "CL:0000895", "CL:0000786", "CL:0000094"]
    return [f"{cl.term(i).label}: {cl.term(i).definition}" for i in ids]


def test_embedder_is_unit_norm_and_semantic(cl_texts):
    e = embed_texts(["a B lymphocyte", "B cell", "a blood platelet"] + cl_texts)
    assert e.shape == (15, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.1                 # paraphrase closer than another type
    np.testing.assert_allclose(embed_texts(["B cell"]), e[1:2], atol=1e-5)   # batching does not change results


def test_mmd_matches_the_formula_and_median_heuristic():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(4, 3)) + 1.0
    z = np.concatenate([x, y])
    d = np.linalg.norm(z[:, None] - z[None], axis=-1)
    sigma = np.median(d[np.triu_indices(9, 1)])
    k = np.exp(-d ** 2 / (2 * sigma ** 2))
    want = k[:5, :5].mean() + k[5:, 5:].mean() - 2 * k[:5, 5:].mean()
    assert mmd_rbf(x, y) == pytest.approx(want, rel=1e-9)
    assert mmd_rbf(x, x) == pytest.approx(0.0, abs=1e-12)
    assert mmd_rbf(x, y, bandwidth=2.0) != pytest.approx(want)
    with pytest.raises(ValueError, match="same width"):
        mmd_rbf(x, y[:, :2])
    with pytest.raises(ValueError, match="NaN"):
        mmd_rbf(np.full((2, 3), np.nan), y)


def test_emd_is_the_optimal_transport_cost():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(7, 4)), rng.normal(size=(7, 4))
    cost = np.linalg.norm(x[:, None] - y[None], axis=-1)
    r, c = linear_sum_assignment(cost)                # equal sizes: an optimal plan is a permutation
    assert emd(x, y) == pytest.approx(cost[r, c].mean(), rel=1e-7)
    shift = np.array([3.0, 0, 4.0, 0])
    assert emd(x, x + shift) == pytest.approx(5.0, rel=1e-7)
    assert emd(x, y[:3]) > 0                           # unequal sizes work


def test_closeness_tests_separate_faithful_from_shuffled(cl_texts):
    ref = embed_texts(cl_texts)
    groups = list(range(len(cl_texts)))
    # "generated" = a shortened version of each reference: close to its own truth
    faithful = embed_texts([t[: len(t) // 2] for t in cl_texts])
    good = closeness_tests(faithful, ref, groups, seed=0)
    assert good["t_pvalue"] < 0.01 and good["ks_pvalue"] < 0.05
    assert good["mean_distance_own"] < good["mean_distance_unrelated"]
    # each generated text paired with another cell's truth: no signal
    bad = closeness_tests(np.roll(faithful, 1, axis=0), ref, groups, seed=0)
    assert bad["t_pvalue"] > 0.05
    assert closeness_tests(faithful, ref, groups, seed=0) == good      # seeded
    with pytest.raises(ValueError, match="same group"):
        closeness_tests(faithful, ref, [0] * len(groups))


def test_description_metrics_report_everything(cl_texts):
    preds = [t[: len(t) // 2] for t in cl_texts]
    m = description_metrics(preds, cl_texts, groups=range(len(cl_texts)))
    for key in ("bleu2", "rouge2", "mmd", "emd", "t_pvalue", "ks_pvalue"):
        assert np.isfinite(m[key]), key
    assert m["embedder"] == "minilm-l6"
    same = description_metrics(cl_texts, cl_texts, groups=range(len(cl_texts)))
    assert same["bleu2"] == pytest.approx(1.0) and same["mmd"] == pytest.approx(0.0, abs=1e-9)
    assert same["emd"] == pytest.approx(0.0, abs=1e-6) and m["emd"] > 0.05
