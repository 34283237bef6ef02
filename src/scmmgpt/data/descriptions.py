"""One text per cell, built from ``obs`` metadata and the ontologies (paper §3.1, appendix A.1.2).

The template (each part present only when its column is, and skipped for unknown values)::

    {Cell type label}: {Cell Ontology definition} Also known as {synonym}, {synonym}.
    Sampled from the {tissue} of a {sex} {development stage} donor with {disease}.

e.g. ``"B cell: A lymphocyte of B lineage that is capable of B cell mediated immunity. Also known
as B lymphocyte, B-cell. Sampled from the blood of a healthy donor."``

The cell type is matched to the Cell Ontology by id (``cell_type_id_key``), label or synonym,
case-insensitively; a label the ontology does not know keeps its own text (``"{label}: a cell
annotated as {label}."``) unless ``label_map`` maps it to a CL id. A user column of free text
(``text_key``) replaces the template. Unknown or ambiguous categories (``"unknown"``, ``"other"``,
``"?"``, ``"unassigned"``, empty, NaN, ...) are flagged in ``ambiguous`` and must be left out of
training and scoring, as the paper does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import pandas as pd

from ..errors import InputDataError
from .ontology import Term, get_index

__all__ = ["DescriptionConfig", "DescriptionBuilder", "is_ambiguous", "AMBIGUOUS_LABELS"]

#: Labels (lower-cased, stripped) that mean "no real cell type".
AMBIGUOUS_LABELS = frozenset(
    {"", "?", "??", "nan", "na", "n/a", "none", "null", "unknown", "other", "others", "unassigned",
     "unclassified", "undefined", "not assigned", "ambiguous", "doublet", "doublets", "multiplet",
     "low quality", "unknown cell", "unknown cell type"}
)


def is_ambiguous(value: object) -> bool:
    """True for NaN/None and for labels in :data:`AMBIGUOUS_LABELS`."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return True
    return str(value).strip().lower() in AMBIGUOUS_LABELS


@dataclass
class DescriptionConfig:
    """Which ``obs`` columns feed the description, and how."""

    cell_type_key: str = "cell_type"
    """Column with the cell type label (name or CL id)."""
    cell_type_id_key: str | None = "cell_type_ontology_term_id"
    """Optional column with CL ids; used when present and valid, else the label is matched."""
    tissue_key: str | None = "tissue"
    """Optional tissue column (UBERON label or id)."""
    disease_key: str | None = "disease"
    """Optional disease column (MONDO label or id; ``"normal"`` reads as a healthy donor)."""
    development_stage_key: str | None = "development_stage"
    """Optional development stage column (HsapDv/MmusDv label or id)."""
    sex_key: str | None = "sex"
    """Optional sex column."""
    text_key: str | None = None
    """A column of free text that replaces the template entirely."""
    max_synonyms: int = 3
    """How many CL synonyms to list (0 for none)."""
    label_map: Mapping[str, str] = field(default_factory=dict)
    """Extra ``{label: CL id}`` for labels the ontology does not know by name."""

    def __post_init__(self) -> None:
        if self.max_synonyms < 0:
            raise InputDataError("max_synonyms must be >= 0.")


def _clean(value: object) -> str | None:
    return None if is_ambiguous(value) else str(value).strip()


class DescriptionBuilder:
    """Builds descriptions for cells (from ``obs``) and for candidate labels (from text).

    Examples
    --------
    >>> b = DescriptionBuilder()  # doctest: +SKIP
    >>> b.describe_cell_type("CL:0000236")[:8]  # doctest: +SKIP
    'B cell: '
    """

    def __init__(self, config: DescriptionConfig | None = None) -> None:
        self.config = config or DescriptionConfig()
        self._cl = get_index("CL")

    # -- cell type ---------------------------------------------------------------------------
    def resolve_cell_type(self, label: object, term_id: object = None) -> Term | None:
        """CL :class:`~scmmgpt.data.ontology.Term` for a label/id, or ``None`` if not in CL."""
        for candidate in (term_id, self.config.label_map.get(str(label)) if label is not None else None, label):
            if candidate is None or is_ambiguous(candidate):
                continue
            term = self._cl.resolve(str(candidate))
            if term is not None:
                return term
        return None

    def describe_cell_type(self, label: object, term_id: object = None) -> str:
        """The cell-type part of a description (also the text of a candidate label)."""
        term = self.resolve_cell_type(label, term_id)
        shown = _clean(label) if label is not None and not str(label).startswith("CL:") else None
        if term is None:
            if shown is None:
                raise InputDataError(f"Cannot describe the cell type {label!r}: not a known CL id or label.")
            return f"{shown}: a cell annotated as {shown}."
        name = shown or term.label
        text = f"{name}: {term.definition.strip()}" if term.definition else f"{name}: a {term.label}."
        if not text.endswith("."):
            text += "."
        names = [term.label] + list(term.synonyms)
        extra = [s for s in names if s.lower() != name.lower()][: self.config.max_synonyms]
        if extra:
            text += " Also known as " + ", ".join(extra) + "."
        return text

    # -- context -----------------------------------------------------------------------------
    def _label(self, ontology: str, value: object) -> str | None:
        value = _clean(value)
        if value is None:
            return None
        if ":" in value:
            term = get_index(ontology).resolve(value)
            return term.label if term is not None else value
        return value

    def _context(self, tissue: object, sex: object, stage: object, disease: object) -> str:
        tissue = self._label("UBERON", tissue)
        stage = self._label("HsapDv", stage) if not (isinstance(stage, str) and stage.startswith("MmusDv")) else self._label("MmusDv", stage)
        disease = self._label("MONDO", disease)
        sex = _clean(sex)
        if not any((tissue, sex, stage, disease)):
            return ""
        donor = " ".join(w for w in (sex if sex and sex.lower() != "unknown" else None, stage) if w)
        sentence = f"Sampled from the {tissue}" if tissue else "Sampled"
        if donor:
            sentence += f" of a {donor} donor"
        elif not tissue:
            sentence += " from a donor"
        healthy = disease is None or disease.lower() in {"normal", "healthy", "control"}
        sentence += "." if disease is None else " with no disease." if healthy else f" with {disease}."
        return sentence

    # -- cells -------------------------------------------------------------------------------
    def build(self, obs: pd.DataFrame) -> pd.DataFrame:
        """Describe every cell of ``obs``.

        Returns
        -------
        DataFrame indexed like ``obs`` with columns ``description`` (str, ``""`` when ambiguous),
        ``cell_type`` (the label shown), ``cell_type_id`` (CL id or ``""``) and ``ambiguous`` (bool).

        Raises
        ------
        InputDataError
            If ``cell_type_key`` (or ``text_key``) is not a column of ``obs``.
        """
        cfg = self.config
        if cfg.text_key is not None:
            if cfg.text_key not in obs.columns:
                raise InputDataError(
                    f"obs has no column {cfg.text_key!r} (text_key). Columns: {list(obs.columns)}."
                )
            text = obs[cfg.text_key]
            amb = text.map(lambda v: is_ambiguous(v) or not str(v).strip())
            labels = obs[cfg.cell_type_key].astype(str) if cfg.cell_type_key in obs.columns else pd.Series("", index=obs.index)
            return pd.DataFrame({"description": text.where(~amb, "").astype(str), "cell_type": labels,
                                 "cell_type_id": "", "ambiguous": amb.astype(bool)}, index=obs.index)
        if cfg.cell_type_key not in obs.columns:
            raise InputDataError(
                f"obs has no column {cfg.cell_type_key!r} with cell type labels. Pass label_key= one of "
                f"{list(obs.columns)} (or text_key= a column of free-text descriptions)."
            )
        keys = [cfg.cell_type_key, cfg.cell_type_id_key, cfg.tissue_key, cfg.sex_key,
                cfg.development_stage_key, cfg.disease_key]
        frame = pd.DataFrame(index=obs.index)
        for name, key in zip(("ct", "ctid", "tissue", "sex", "stage", "disease"), keys):
            frame[name] = obs[key].astype(object) if key is not None and key in obs.columns else None
        frame = frame.where(frame.notna(), None)
        uniq = frame.drop_duplicates()
        rows = {}
        for row in uniq.itertuples(index=False):
            ct, ctid, tissue, sex, stage, disease = row
            if is_ambiguous(ct) and is_ambiguous(ctid):
                rows[tuple(row)] = ("", "" if ct is None else str(ct), "", True)
                continue
            label = ct if not is_ambiguous(ct) else ctid
            term = self.resolve_cell_type(label, ctid)
            desc = self.describe_cell_type(label, ctid)
            ctx = self._context(tissue, sex, stage, disease)
            rows[tuple(row)] = ((desc + " " + ctx).strip(), str(label), term.id if term else "", False)
        out = [rows[tuple(r)] for r in frame.itertuples(index=False)]
        return pd.DataFrame(out, index=obs.index, columns=["description", "cell_type", "cell_type_id", "ambiguous"])
