"""Supervised references that every scMMGPT figure is printed beside.

A logistic regression on the log-normalised expression of the genes the data measured: what a
user gets from a linear classifier trained on the same training cells. A zero-shot model that does
not come near it on its own training types has not been trained well enough. For generation, each
type's mean training profile.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["classifier_scores", "logistic_scores", "logistic_regression_reference", "type_mean_profiles"]


def classifier_scores(clf, x_train, y_train: Sequence[str], x_test, labels: Sequence[str]) -> np.ndarray:
    """(n_test, len(labels)) class probabilities of the scikit-learn classifier ``clf`` fitted on
    ``(x_train, y_train)``; labels without training cells score -1 (they rank last), and a single
    training type scores 1 everywhere."""
    labels = list(labels)
    y_train = np.asarray(y_train).astype(str)
    scores = np.full((x_test.shape[0], len(labels)), -1.0)
    classes = sorted(set(y_train))
    if len(classes) == 1:
        scores[:, labels.index(classes[0])] = 1.0
        return scores
    clf.fit(x_train, y_train)
    p = clf.predict_proba(x_test)
    for j, c in enumerate(clf.classes_):
        scores[:, labels.index(c)] = p[:, j]
    return scores


def logistic_scores(x_train, y_train: Sequence[str], x_test, labels: Sequence[str], *, seed: int = 0,
                    max_iter: int = 2000) -> np.ndarray:
    """:func:`classifier_scores` of a logistic regression (the supervised reference)."""
    from sklearn.linear_model import LogisticRegression

    return classifier_scores(LogisticRegression(max_iter=max_iter, random_state=seed), x_train, y_train, x_test,
                             labels)


def logistic_regression_reference(lab, *, train: str = "train", test: str = "test", seed: int = 0) -> dict:
    """Acc@1 and macro-F1 of :func:`logistic_scores` on a :class:`~scmmgpt.data.labelled.LabelledCells`
    split: fitted on the ``train`` cells, scored on the ``test`` cells, over the measured genes."""
    from sklearn.metrics import f1_score

    def x(part: str):
        return lab.cells.rows_csr(lab.split[part])[:, np.flatnonzero(lab.cells.measured)]

    truth = lab.types(test).astype(str)
    labels = sorted(set(lab.types(train).astype(str)) | set(truth))
    pred = np.array(labels)[logistic_scores(x(train), lab.types(train), x(test), labels, seed=seed).argmax(1)]
    return {"acc1": float((pred == truth).mean()),
            "macro_f1": float(f1_score(truth, pred, average="macro", labels=np.unique(truth)))}


def type_mean_profiles(x, y: Sequence[str], labels: Sequence[str], *, scale: str = "counts") -> np.ndarray:
    """(len(labels), n_genes) each label's mean profile over the rows of ``x`` (cells x genes,
    eq.-1 values, sparse or dense) whose ``y`` is that label.

    ``scale="counts"``: the mean on the counts scale, ``log1p(mean(expm1(x)))``, the expected profile
    of the type's reads. ``scale="log"``: the mean of the eq.-1 values themselves, which is what a
    generator trained with eq. 6's squared error on those values tends to; drawn into reads it is a
    weaker profile (marker genes, zero in many of a type's cells, are pulled down more than
    housekeeping ones)."""
    if scale not in ("counts", "log"):
        raise ValueError(f"scale must be 'counts' or 'log', got {scale!r}.")
    y = np.asarray(y).astype(str)
    if scale == "log":
        return np.stack([_dense(x[y == str(label)]).mean(0) for label in labels]).astype(np.float64)
    return np.stack([np.log1p(np.expm1(_dense(x[y == str(label)])).mean(0)) for label in labels])


def _dense(x) -> np.ndarray:
    return x.toarray() if hasattr(x, "toarray") else np.asarray(x)
