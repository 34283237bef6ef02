"""Annotation metrics (paper §4.1, Table 3): Acc@k, macro-F1, the confusion matrix, and an
ontology-aware accuracy that gives partial credit to predictions on the true type's lineage in
the Cell Ontology.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["topk_accuracy", "ontology_credit", "ontology_accuracy", "annotation_metrics"]


def topk_accuracy(scores: np.ndarray, truth: np.ndarray, k: int = 1) -> float:
    """Fraction of rows ``i`` whose true column ``truth[i]`` is among the ``k`` best scores.

    ``k`` is capped at the number of labels (Acc@10 over 9 labels = Acc@9 = 1). Ties count against
    the truth: a label scoring the same as the true one ranks above it, so a constant score matrix
    gets Acc@1 = 0 when there are several labels, never a lucky 1.
    """
    scores = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(truth, dtype=int)
    if len(truth) == 0:
        return float("nan")
    if scores.ndim != 2 or len(scores) != len(truth):
        raise ValueError(f"scores must be (n_cells, n_labels) with one row per truth entry, got {scores.shape} "
                         f"and {len(truth)} truths.")
    k = min(int(k), scores.shape[1])
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    own = scores[np.arange(len(truth)), truth]
    rank = (scores >= own[:, None]).sum(1) - 1          # other labels scoring at least as well
    return float((rank < k).mean())


def ontology_credit(predicted: str, truth: str, *, decay: float = 0.5) -> float:
    """Credit for predicting Cell Ontology term ``predicted`` when the truth is ``truth``.

    The rule: 1 for the same term; ``decay ** d`` when one is an ancestor of the other, ``d`` being
    the shortest number of ``is_a``/``part_of`` steps between them (a parent or child gets 0.5, a
    grandparent 0.25, ``cell`` almost nothing); 0 for terms on different lineages (siblings and
    cousins included: "CD4 T cell" for a CD8 T cell is wrong, not half right); 0 when either id is
    empty or unknown.
    """
    from .. import assets

    if not predicted or not truth:
        return 0.0
    if predicted == truth:
        return 1.0
    parser = assets.ontology_parser()
    for child, parent in ((truth, predicted), (predicted, truth)):
        try:
            dist = parser.get_term_ancestors_with_distances(child)
        except (ValueError, KeyError):      # not an ontology id / not in this ontology release
            return 0.0
        if parent in dist:
            return float(decay ** dist[parent])
    return 0.0


def ontology_accuracy(predicted: Sequence[str], truth: Sequence[str], *, decay: float = 0.5) -> float:
    """Mean :func:`ontology_credit` over cells (CL ids); >= the exact accuracy on the same calls."""
    predicted, truth = list(predicted), list(truth)
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predictions for {len(truth)} truths.")
    if not truth:
        return float("nan")
    cache: dict[tuple[str, str], float] = {}
    total = 0.0
    for p, t in zip(predicted, truth):
        key = (str(p), str(t))
        if key not in cache:
            cache[key] = ontology_credit(*key, decay=decay)
        total += cache[key]
    return total / len(truth)


def annotation_metrics(scores: np.ndarray, labels: Sequence[str], truth: Sequence[str], *,
                       ks: Sequence[int] = (1, 5, 10), label_ids: Sequence[str] | None = None,
                       truth_ids: Sequence[str] | None = None) -> dict:
    """Every annotation figure for one score matrix.

    ``scores`` (n_cells, n_labels); ``labels`` the column names; ``truth`` each cell's true label
    (a name in ``labels``; cells whose truth is not a candidate are an error, not skipped).
    With CL ids for the labels and the truths, adds ``ontology_accuracy``. Returns ``acc@k`` for
    each k (capped at the label count), ``macro_f1`` over the true classes present, the confusion
    matrix (rows truth, columns prediction, over ``labels``) and the counts.
    """
    from sklearn.metrics import confusion_matrix, f1_score

    labels = [str(x) for x in labels]
    index = {lab: i for i, lab in enumerate(labels)}
    missing = sorted({str(t) for t in truth} - set(index))
    if missing:
        raise ValueError(f"True labels not among the candidates: {missing[:5]}; add them to the candidate labels "
                         "or drop those cells before scoring.")
    t = np.array([index[str(x)] for x in truth], dtype=int)
    scores = np.asarray(scores)
    pred = scores.argmax(1)
    out = {f"acc@{k}": topk_accuracy(scores, t, k) for k in ks}
    out["macro_f1"] = float(f1_score(t, pred, average="macro", labels=np.unique(t))) if len(t) else float("nan")
    out["confusion"] = confusion_matrix(t, pred, labels=range(len(labels))).tolist()
    out["n_cells"], out["n_labels"] = int(len(t)), len(labels)
    if label_ids is not None and truth_ids is not None:
        ids = np.asarray([str(x) for x in label_ids])
        out["ontology_accuracy"] = ontology_accuracy(ids[pred], [str(x) for x in truth_ids])
    return out
