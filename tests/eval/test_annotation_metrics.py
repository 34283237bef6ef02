"""Annotation metrics: Acc@k (capped, ties against), ontology-aware credit on real CL terms."""

import numpy as np
import pytest

from scmmgpt.eval.annotation import annotation_metrics, ontology_accuracy, ontology_credit, topk_accuracy


def test_topk_accuracy_ranks_ties_against_the_truth_and_caps_k():
    s = np.array([[0.9, 0.5, 0.1], [0.2, 0.3, 0.1], [0.5, 0.5, 0.5]])
    truth = np.array([1, 1, 2])
    assert topk_accuracy(s, truth, 1) == pytest.approx(1 / 3)       # row 1 only; row 3 is a 3-way tie
    assert topk_accuracy(s, truth, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(s, truth, 10) == 1.0                        # k capped at 3 labels
    assert topk_accuracy(np.ones((4, 5)), np.zeros(4, int), 1) == 0.0
    with pytest.raises(ValueError, match="one row per truth"):
        topk_accuracy(s, truth[:2], 1)


def test_ontology_credit_follows_the_cell_ontology():
    from scmmgpt import assets

    b, nk, cd4, cd8 = "CL:0000236", "CL:0000623", "CL:0000624", "CL:0000625"
    parent = assets.ontology_parser().get_term_parents(b)[0]
    assert ontology_credit(b, b) == 1.0
    assert ontology_credit(parent, b) == 0.5 and ontology_credit(b, parent) == 0.5   # either direction
    assert ontology_credit("CL:0000542", b) == 0.25                   # lymphocyte: two steps up
    assert 0 < ontology_credit("CL:0000000", b) < 0.1                 # "cell" is nearly no information
    assert ontology_credit(cd4, cd8) == 0.0 and ontology_credit(nk, b) == 0.0   # siblings/cousins: wrong
    assert ontology_credit("", b) == 0.0 and ontology_credit("CL:9999999", b) == 0.0
    exact = np.mean([p == t for p, t in zip([b, cd4, parent], [b, cd8, b])])
    acc = ontology_accuracy([b, cd4, parent], [b, cd8, b])
    assert acc == pytest.approx(1.5 / 3) and acc > exact


def test_annotation_metrics_on_a_score_matrix():
    labels = ["B cell", "natural killer cell", "CD14-positive monocyte"]
    ids = ["CL:0000236", "CL:0000623", "CL:0001054"]
    truth = ["B cell", "B cell", "natural killer cell", "CD14-positive monocyte"]
    s = np.array([[0.9, 0.1, 0.0], [0.1, 0.8, 0.3], [0.0, 0.7, 0.2], [0.1, 0.5, 0.6]])
    m = annotation_metrics(s, labels, truth, ks=(1, 2, 5), label_ids=ids,
                           truth_ids=["CL:0000236", "CL:0000236", "CL:0000623", "CL:0001054"])
    assert m["acc@1"] == 0.75 and m["acc@2"] == 0.75 and m["acc@5"] == 1.0   # row 2: B ranks third
    assert m["confusion"] == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    assert m["ontology_accuracy"] == 0.75 and m["n_cells"] == 4
    assert 0 < m["macro_f1"] < 1
    with pytest.raises(ValueError, match="not among the candidates"):
        annotation_metrics(s, labels, ["T cell"] * 4)
