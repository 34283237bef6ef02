"""Open-set annotation after fine-tuning on some of the types: a novelty gate between the fine-tuned
model and the zero-shot model it started from.

Fine-tuned on a few cell types, the model learns those and forgets the rest: on pbmc3k, fine-tuned
on 2 or 3 of 9 types, the unseen types fell from 65% / 58% Acc@1 (zero-shot, the same cells) to 9% /
8% (README, "Measured results"; ``benchmarks/results/recipe/README.md``, "Fine-tuning on two types"
and "Novelty gate"). The gate
sends a cell that does not look like the fine-tuning cells back to the zero-shot model, which then
picks among the labels the fine-tuning never saw; a cell that does look like them is labelled by the
fine-tuned model among the fine-tuning types. This is the two-expert scheme of Socher et al.,
"Zero-shot learning through cross-modal transfer" (NeurIPS 2013), with their novelty detection by
the distance to the seen classes' centroids.

The gate reads the zero-shot model's aligned embedding (the re-normalised mean of its query
features, :meth:`~scmmgpt.inference.CellFeatures.embedding`): fine-tuning on two or three types
collapses the fine-tuned space (all cosines negative), while the pre-trained space still keeps the
other types apart. A cell is *known* when its best cosine to a fine-tuning type's centroid reaches
``threshold``: the ``quantile`` (default 5%) of the same score over held-out fine-tuning cells, so
that about 95% of cells of the fine-tuned types go to the fine-tuned model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError, InputDataError

__all__ = ["NoveltyGate", "calibrate_gate", "route_scores", "ROUTE_OFFSET"]

#: Scores of the labels a cell is not routed to are lowered by this much. The scores are cosines
#: (in [-1, 1]), so the routed group's labels always rank first and each group keeps its order.
ROUTE_OFFSET = 4.0
#: Fewer held-out cells than this calibrate the threshold on the training cells themselves.
MIN_CALIBRATION_CELLS = 20


@dataclass
class NoveltyGate:
    """Centroids of the fine-tuning types in the zero-shot model's embedding, and the threshold."""

    types: list[str]
    """The fine-tuning types as the data names them."""
    ids: list[str]
    """Their Cell Ontology ids (``""`` where a type has none)."""
    centroids: np.ndarray
    """(n_types, D) unit vectors: the mean embedding of each type's training cells, re-normalised."""
    threshold: float
    quantile: float
    calibrated_on: str
    """``"validation"`` or ``"training"`` cells (fewer than 20 held-out cells)."""

    def scores(self, embedding: np.ndarray) -> np.ndarray:
        """(N,) each cell's best cosine to a fine-tuning type's centroid (NaN rows give -inf)."""
        best = np.asarray(embedding, dtype=np.float32) @ self.centroids.T
        best = best.max(1) if best.shape[1] else np.full(len(best), -np.inf, dtype=np.float32)
        return np.where(np.isnan(best), -np.inf, best)

    def known(self, embedding: np.ndarray) -> np.ndarray:
        """(N,) True where a cell looks like the fine-tuning cells."""
        return self.scores(embedding) >= self.threshold

    def seen_labels(self, names: Sequence[str], ids: Sequence[str]) -> np.ndarray:
        """(T,) True for the candidate labels that are fine-tuning types (by name or CL id)."""
        types, terms = set(self.types), {i for i in self.ids if i}
        return np.array([n in types or (bool(i) and i in terms) for n, i in zip(names, ids)], dtype=bool)

    def to_dict(self) -> dict:
        return {"types": list(self.types), "ids": list(self.ids),
                "centroids": np.round(self.centroids.astype(np.float64), 6).tolist(),
                "threshold": float(self.threshold), "quantile": float(self.quantile),
                "calibrated_on": self.calibrated_on}

    @classmethod
    def from_dict(cls, d: dict) -> "NoveltyGate":
        c = np.asarray(d["centroids"], dtype=np.float32).reshape(len(d["types"]), -1)
        return cls(types=list(d["types"]), ids=list(d["ids"]), centroids=c, threshold=float(d["threshold"]),
                   quantile=float(d["quantile"]), calibrated_on=str(d["calibrated_on"]))


def calibrate_gate(zero_shot, train, train_types: Sequence[str], *, val=None, terms: dict[str, str] | None = None,
                   quantile: float = 0.05, batch_size: int = 64) -> NoveltyGate:
    """The gate of a fine-tuning run, from the model it starts from (``zero_shot``, before training).

    ``train``: the run's training cells (:meth:`ScMMGPT.dataset`) and ``train_types`` their types;
    ``val``: its held-out cells of the same types, or ``None``. ``terms``: ``{type: CL id}`` (as
    :meth:`LabelledCells.label_set` gives it). The threshold is the
    ``quantile`` of the validation cells' scores (:meth:`NoveltyGate.scores`), or of the training
    cells' where fewer than 20 validation cells are given."""
    if not 0.0 <= quantile < 1.0:
        raise ConfigError(f"The gate's quantile must be in [0, 1), got {quantile}.")
    y = np.asarray(train_types).astype(str)
    if len(y) != len(train) or len(y) == 0:
        raise InputDataError(f"calibrate_gate needs one type per training cell ({len(train)} cells, {len(y)} types).")
    emb = zero_shot.encode(train, batch_size=batch_size).embedding()
    ok = ~np.isnan(emb).any(1)
    types = sorted(set(y[ok]))
    cents = np.stack([emb[ok & (y == t)].mean(0) for t in types]).astype(np.float32)
    cents /= np.linalg.norm(cents, axis=1, keepdims=True).clip(min=1e-12)
    terms = terms or {}
    gate = NoveltyGate(types=types, ids=[str(terms.get(t, "")) for t in types], centroids=cents,
                       threshold=-np.inf, quantile=quantile, calibrated_on="training")
    if val is not None and len(val) >= MIN_CALIBRATION_CELLS:
        held = gate.scores(zero_shot.encode(val, batch_size=batch_size).embedding())
        gate.calibrated_on = "validation"
    else:
        held = gate.scores(emb)
    held = held[np.isfinite(held)]
    gate.threshold = float(np.quantile(held, quantile)) if len(held) else float("inf")
    return gate


def route_scores(tuned: torch.Tensor, zero: torch.Tensor, seen: np.ndarray, known: np.ndarray) -> torch.Tensor:
    """One score matrix (B, T) from the fine-tuned model's (``tuned``) and the zero-shot model's
    (``zero``) scores over the same candidates: a *known* cell ranks the fine-tuning types
    (``seen`` columns) by ``tuned`` first; a novel cell ranks the other labels by ``zero`` first. The
    group a cell is not routed to follows, lowered by :data:`ROUTE_OFFSET`. With no candidate outside
    the fine-tuning types (or none inside), every cell keeps ``tuned``."""
    if seen.all() or not seen.any():
        return tuned
    s = torch.as_tensor(seen, device=tuned.device)[None]
    k = torch.as_tensor(known, device=tuned.device)[:, None]
    own = torch.where(s, tuned, zero)                # each label scored by the model that knows it
    routed = s == k                                  # the labels of the group the cell is sent to
    return torch.where(routed, own, own - ROUTE_OFFSET)
