"""Zero-shot cell type annotation from free-text label sets."""

from __future__ import annotations

import os
import warnings
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..data.label_texts import MAX_LABELS, candidate_labels
from ..errors import InputDataError
from ._common import full_rows, in_order, label_scores, resolve_model, start

__all__ = ["annotate"]

MAX_SCORE_ENTRIES = 50_000_000
"""Above this many cell x label scores (200 MB) the full matrix is kept only with store_scores=True."""


def annotate(adata, model, *, labels: Sequence[str] | None = None, labels_key: str | None = None,
             descendants_of: str | None = None, context: str | None = None, alpha: float = 0.0,
             rerank_top: int = 10, top_k: int = 3, min_score: float | None = None, min_margin: float | None = None,
             unassigned: str = "unassigned", key_added: str = "scmmgpt_label", store_scores: bool | None = None,
             use_rep: str | None = None, batch_size: int = 64, layer: str | None = None, use_raw: bool = False,
             gene_symbol_key: str | None = None, min_coverage: float = 0.5, device: str | None = None,
             precision: str = "auto", backoff: bool = True, zero_shot_model=None,
             progress: bool = False, max_labels: int = MAX_LABELS, copy: bool = False):
    """Zero-shot annotation: score every cell against every candidate label's description.

    Candidate labels come from exactly one of ``labels`` (names or CL ids), ``labels_key`` (the
    distinct values of an ``.obs`` column) or ``descendants_of`` (a CL term and all its descendants,
    e.g. ``"CL:0000542"`` for every lymphocyte type). Each label's text is built like a training
    description (Cell Ontology definition and synonyms; ``context`` such as "Sampled from the blood."
    is appended); ambiguous labels ("unknown", "?") are dropped.

    Scores are those of :meth:`ScMMGPT.score_labels <scmmgpt.models.scmmgpt.ScMMGPT.score_labels>`
    (the same path the demo, the benchmarks and training validation report): the CTC similarity
    (cosine of cell and text features, max over the Q-Former queries). With ``alpha > 0`` the
    ``rerank_top`` best labels of each cell are re-scored with the CTM head:
    ``(1 - alpha) * similarity + alpha * P(match)``.
    With ``backoff``, a label finer than the model's training labels is also scored by its
    trained Cell Ontology ancestors that are not candidates themselves
    (:func:`~scmmgpt.data.label_texts.backoff_labels`). For example, naive and memory CD4 T cells
    can fall back on "CD4-positive, alpha-beta T cell"; its own score still orders it among its
    siblings.
    A cell whose best score is below ``min_score``, or beats the second best by less than
    ``min_margin``, is ``unassigned`` (open-set annotation).

    ``zero_shot_model``: the model that ``model`` was fine-tuned from (``scmmgpt finetune --task
    annotate``, which records a novelty gate in ``model``; :mod:`scmmgpt.models.gate`). A cell that
    looks like the fine-tuning cells is then labelled by ``model`` among the fine-tuning types; any
    other cell by ``zero_shot_model`` among the remaining labels. Use it when the labels include
    types the fine-tuning never saw: fine-tuned on a few types, a model forgets the others.

    With ``use_rep`` (``"X_scmmgpt_queries"``, written by ``tl.embed(adata, model, queries=True)``) the
    labels are scored against those stored query features without running the cell encoder (the same
    similarity up to float16 storage); CTM re-ranking (``alpha > 0``) needs the cells and is refused.

    ``precision`` (``auto | fp32 | bf16 | fp16``; :mod:`scmmgpt.utils.precision`) is resolved for the
    model's device (``auto``: bf16 where it has native bf16 matmul) and stored with the parameters.

    Returns
    -------
    ``None``, or the annotated copy with ``copy=True``. Writes

    * ``.obs[key_added]`` — categorical top-1 label (``unassigned`` as above; ``""`` for cells with
      no expression in the model's genes);
    * ``.obs[key_added + "_score"]`` — the top-1 score;
    * ``.obsm[key_added + "_topk"]`` — DataFrame of the ``top_k`` best labels (columns
      ``top1``...) and ``.obsm[key_added + "_topk_score"]`` their scores;
    * ``.obsm[key_added + "_scores"]`` — (n_obs, n_labels) all scores, columns in the order of
      ``.uns[key_added]["labels"]`` (kept unless it would exceed 50M entries, or ``store_scores``);
    * ``.uns[key_added]`` — labels, CL ids, texts, parameters and the gene coverage report.

    Raises
    ------
    InputDataError
        No candidate label left, more than ``max_labels`` of them, or an empty / over-long / not
        UTF-8 label.
    ResourceError
        ``store_scores=True`` and the full score matrix cannot fit in memory.
    """
    if not 0.0 <= alpha <= 1.0:
        raise InputDataError(f"alpha must be in [0, 1], got {alpha}.")
    if top_k < 1 or rerank_top < 1:
        raise InputDataError("top_k and rerank_top must be >= 1.")
    adata = start(adata, copy)
    obs_values = None
    if labels_key is not None:
        if labels_key not in adata.obs.columns:
            raise InputDataError(f"obs has no column {labels_key!r}; columns: {list(adata.obs.columns)}.")
        col = adata.obs[labels_key]
        obs_values = list(col.cat.categories) if isinstance(col.dtype, pd.CategoricalDtype) else list(pd.unique(col))
    cands = candidate_labels(labels=labels, obs_values=obs_values, descendants_of=descendants_of, context=context,
                             max_labels=max_labels)
    T = len(cands.names)
    model = resolve_model(model, device=device, with_lm=False)
    zero_shot = None if zero_shot_model is None else resolve_model(zero_shot_model, device=device, with_lm=False)
    gate = model.gate
    seen = gate.seen_labels(cands.names, cands.ids) if gate is not None else None
    if zero_shot is None and seen is not None and not seen.all():
        warnings.warn(f"This model was fine-tuned on {len(gate.types)} cell types, and {int((~seen).sum())} of the "
                      f"{T} candidate labels are not among them: fine-tuned on a few types, a model forgets the others. "
                      "Pass zero_shot_model=<the model it was fine-tuned from> to label cells unlike the fine-tuning "
                      "cells with that model.", stacklevel=2)
    prec = model.precision(precision)
    mc, scored = label_scores(adata, model, cands, use_rep=use_rep, precision=prec, batch_size=batch_size,
                              progress=progress, desc="annotate", alpha=alpha, rerank_top=rerank_top, backoff=backoff,
                              layer=layer, use_raw=use_raw, gene_symbol_key=gene_symbol_key, min_coverage=min_coverage,
                              zero_shot=zero_shot)
    keep_all = store_scores if store_scores is not None else len(mc.rows) * T <= MAX_SCORE_ENTRIES
    if keep_all:
        from ..utils.memory import check_fits

        check_fits(2 * 4 * len(mc.rows) * T, f"The full score matrix ({len(mc.rows)} cells x {T} labels)",
                   "Pass store_scores=False: the top-k labels and scores are still stored.")
    if store_scores is None and not keep_all:
        warnings.warn(f"{len(mc.rows)} cells x {T} labels: the full score matrix is not stored (pass "
                      "store_scores=True to keep it); top-k labels and scores are.", stacklevel=2)
    k = min(top_k, T)
    all_scores, top_idx, top_val, second, index = [], [], [], [], []
    for idx, sim in scored:
        best = sim.topk(min(max(k, 2), T), dim=1)
        top_idx.append(best.indices[:, :k])
        top_val.append(best.values[:, :k])
        second.append(best.values[:, 1] if T > 1 else torch.full((len(sim),), -np.inf))
        if keep_all:
            all_scores.append(sim)
        index.append(idx)
    top_idx, top_val = in_order(top_idx, index).numpy(), in_order(top_val, index).numpy()
    second = in_order(second, index).numpy()
    names = np.asarray(cands.names, dtype=object)
    pred = names[top_idx[:, 0]].copy()
    reject = np.zeros(len(pred), dtype=bool)
    if min_score is not None:
        reject |= top_val[:, 0] < min_score
    if min_margin is not None:
        reject |= (top_val[:, 0] - second) < min_margin
    pred[reject] = unassigned
    n, rows = mc.n_obs, mc.rows
    categories = list(dict.fromkeys(list(cands.names) + ([unassigned] if reject.any() else [])))
    full_pred = full_rows(pred, rows, n, fill="")
    adata.obs[key_added] = pd.Categorical(full_pred, categories=categories + ([""] if len(rows) < n else []))
    adata.obs[key_added + "_score"] = full_rows(top_val[:, 0], rows, n)
    topk = pd.DataFrame(full_rows(names[top_idx], rows, n, fill=""), index=adata.obs_names,
                        columns=[f"top{i + 1}" for i in range(k)])
    adata.obsm[key_added + "_topk"] = topk
    adata.obsm[key_added + "_topk_score"] = full_rows(top_val, rows, n)
    if keep_all:
        adata.obsm[key_added + "_scores"] = full_rows(in_order(all_scores, index).numpy(), rows, n)
    adata.uns[key_added] = {
        "labels": list(cands.names), "label_ids": list(cands.ids), "texts": list(cands.texts),
        "params": {"alpha": alpha, "rerank_top": rerank_top, "top_k": k,
                   "min_score": "none" if min_score is None else min_score,
                   "min_margin": "none" if min_margin is None else min_margin, "unassigned": unassigned,
                   "context": context or "", "precision": prec.name, "backoff": backoff},
        "backoff_terms": _backoff_report(cands, model) if backoff else {},
        "n_unassigned": int(reject.sum()), **mc.report(),
    }
    if zero_shot is not None and gate is not None and seen is not None:   # scoring refused it without a gate
        # cells routed to the zero-shot model rank a label outside the fine-tuning types first
        routed = ~seen[top_idx[:, 0]]
        adata.uns[key_added]["gate"] = {"zero_shot_model": str(zero_shot_model)
                                        if isinstance(zero_shot_model, (str, os.PathLike)) else "given",
                                        "fine_tuning_types": list(gate.types), "threshold": gate.threshold,
                                        "quantile": gate.quantile, "n_zero_shot": int(routed.sum())}
    return adata if copy else None


def _backoff_report(cands, model) -> dict[str, list[str]]:
    """``{candidate: [trained ancestors it backs off to]}`` for the candidates that have any."""
    proxies, links = model.label_backoff(cands)
    if proxies is None:
        return {}
    return {name: [proxies.names[i] for i in idx] for name, idx in zip(cands.names, links) if idx}
