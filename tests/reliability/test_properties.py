"""Property-based checks (hypothesis) at the input boundary: whatever matrix or text a user passes,
the result is either correct or a specific InputDataError — never another exception, never a
silently wrong value."""

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from scmmgpt.data import GeneVocab, prepare_cells
from scmmgpt.data.label_texts import candidate_labels, query_texts
from scmmgpt.errors import InputDataError
from scmmgpt.tl._common import in_order

GENES = ["CD3E", "LYZ", "MS4A1", "NKG7", "GNLY", "CD14", "FCGR3A", "PPBP"]
VOCAB = GeneVocab.from_genes(GENES)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

cell_values = st.one_of(st.integers(0, 50).map(float), st.floats(-3, 20, width=32),
                        st.sampled_from([0.0, 0.0, 0.0, np.nan, np.inf, -1.0]))


shapes = st.tuples(st.integers(0, 6), st.just(len(GENES)))
matrices = st.one_of(arrays(np.float32, shapes, elements=st.integers(0, 30).map(float)),   # counts
                     arrays(np.float32, shapes, elements=cell_values))                    # anything


@FAST
@given(matrices, st.booleans())
def test_prepare_cells_is_right_or_refuses(x, sparse):
    a = ad.AnnData(X=sp.csr_matrix(x) if sparse else x, var=pd.DataFrame(index=GENES),
                   obs=pd.DataFrame(index=[f"c{i}" for i in range(len(x))]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cells = prepare_cells(a, VOCAB, target_sum=1e4)
        except InputDataError as exc:
            msg = str(exc)
            event(f"refused: {msg[:25]}")
            # refused for a reason the matrix really has
            if not np.isfinite(x).all():
                assert "NaN/inf" in msg, msg
            elif len(x) == 0 or not (x != 0).any(axis=1).any():
                assert "empty" in msg, msg
            elif (x < 0).any():
                assert "negative values" in msg, msg
            else:
                raise AssertionError(f"a finite, non-negative, non-empty matrix was refused: {msg}")
            return
    event(f"accepted as {cells.value_kind}")
    # accepted: finite, no empty cell kept, one row per non-empty input cell, values >= 0
    assert np.isfinite(x).all()
    nonempty = np.flatnonzero((x != 0).any(axis=1))
    assert len(cells) == len(nonempty)
    for i in range(len(cells)):
        g, v = cells.row(i)
        assert len(g) > 0 and np.isfinite(v).all() and (v >= 0).all()
        # the kept genes are exactly the cell's non-zero genes
        src = x[nonempty[i]]
        assert sorted(VOCAB.tokens[j] for j in g) == sorted(np.asarray(GENES)[src != 0].tolist())


@FAST
@given(st.lists(st.text(max_size=40), max_size=6))
def test_label_sets_are_accepted_or_refused_by_name(labels):
    try:
        c = candidate_labels(labels=labels)
    except InputDataError as exc:
        assert any(k in str(exc) for k in ("No candidate labels", "UTF-8", "characters", "must be text"))
        return
    assert 1 <= len(c.names) <= len(labels) and len(c.texts) == len(c.names)
    assert all(isinstance(t, str) and t.strip() for t in c.texts)


@FAST
@given(st.text(max_size=3000))
def test_queries_are_accepted_or_refused_by_name(q):
    try:
        (t,) = query_texts([q])
    except InputDataError as exc:
        assert any(k in str(exc) for k in ("is empty", "UTF-8", "characters"))
        assert not q.strip() or len(q) > 2000 or any(0xD800 <= ord(ch) <= 0xDFFF for ch in q)
        return
    assert q.strip() and isinstance(t, str) and t.strip()


@FAST
@given(st.lists(st.integers(1, 5), min_size=1, max_size=8), st.randoms(use_true_random=False))
def test_in_order_undoes_any_batching(sizes, rnd):
    n = sum(sizes)
    perm = list(range(n))
    rnd.shuffle(perm)
    index, chunks, texts, at = [], [], [], 0
    for s in sizes:
        idx = torch.tensor(perm[at:at + s])
        index.append(idx)
        chunks.append(idx.float()[:, None] * 10)
        texts.append([f"cell {i}" for i in idx.tolist()])
        at += s
    assert in_order(chunks, index)[:, 0].tolist() == [10.0 * i for i in range(n)]
    assert in_order(texts, index) == [f"cell {i}" for i in range(n)]
