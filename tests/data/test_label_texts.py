"""The Cell Ontology back-off of zero-shot scores: a label finer than the model's training labels is
also scored by its trained ancestors."""

import numpy as np

from scmmgpt.data.label_texts import back_off_scores, backoff_labels, candidate_labels

NAIVE_CD4, MEMORY_CD4, CD8, B = "CL:0000895", "CL:0000897", "CL:0000625", "CL:0000236"
CD4, T_CELL = "CL:0000624", "CL:0000084"


def test_backoff_terms_are_the_trained_ancestors_that_are_not_candidates():
    cands = candidate_labels(labels=[NAIVE_CD4, MEMORY_CD4, CD8, B], context="Sampled from the blood.")
    proxies, links = backoff_labels(cands, [CD4, T_CELL, B, "CL:0000576"])      # + monocyte: no candidate under it
    assert proxies is not None and proxies.ids == [T_CELL, CD4]
    assert proxies.names == ["T cell", "CD4-positive, alpha-beta T cell"]
    assert all(t.endswith("Sampled from the blood.") for t in proxies.texts)
    # both CD4 subtypes reach the CD4 term and T cell; CD8 only T cell; B cell is a candidate itself
    assert links == [[0, 1], [0, 1], [0], []]
    # nothing trained above the candidates, or no record of what was trained: no back-off
    assert backoff_labels(cands, [B, NAIVE_CD4]) == (None, [[], [], [], []])
    assert backoff_labels(cands, []) == (None, [[], [], [], []])
    free = candidate_labels(labels=["a cell that glows"])
    assert backoff_labels(free, [CD4]) == (None, [[]])


def test_backed_off_scores_keep_siblings_in_their_own_order():
    own = np.array([[0.10, 0.20, 0.50, 0.95], [0.10, 0.20, 0.50, 0.05]], dtype=np.float32)
    proxy = np.array([[0.90], [0.30]], dtype=np.float32)
    out = back_off_scores(own, proxy, [[0], [0], [], [0]])
    # cell 0: the ancestor beats the siblings' own texts; they move just under it, ordered by their own score
    assert 0.899 < out[0, 0] < out[0, 1] < 0.9 and out[0, 2] == 0.5 and out[0, 3] == own[0, 3]
    # cell 1: the ancestor only beats the first two, and not the unrelated candidate at 0.5
    assert out[1, 0] < out[1, 1] < 0.3 < out[1, 2] == 0.5 and out[1, 3] < 0.3
    assert out[1].argmax() == 2
