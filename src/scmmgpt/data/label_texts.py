"""Texts for candidate labels and queries, built like the training descriptions.

One builder serves every caller: ``tl.annotate``/``tl.search``/``tl.generate``, the demo, the
benchmarks and validation during training read labels through :func:`candidate_labels`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..errors import InputDataError
from .descriptions import DescriptionBuilder, DescriptionConfig, is_ambiguous

__all__ = ["Candidates", "MAX_LABELS", "back_off_scores", "backoff_labels", "candidate_labels", "query_texts"]

MAX_TEXT_CHARS = 2000
"""Longer prompts/queries are refused: the encoders read at most a few hundred tokens anyway."""


@dataclass
class Candidates:
    """Candidate labels for annotation: shown names, CL ids ('' when none) and model texts."""

    names: list[str]
    ids: list[str]
    texts: list[str]
    context: str | None = None
    """The context sentence appended to every text."""


def _check_text(t: object, what: str) -> str:
    if not isinstance(t, str):
        raise InputDataError(f"{what} must be text, got {type(t).__name__} ({t!r}).")
    try:
        t.encode("utf-8")
    except UnicodeEncodeError:
        # lone surrogates: bytes that were not UTF-8 (a file or argv in another encoding)
        raise InputDataError(f"{what} {t[:40]!r} is not valid UTF-8 text; re-save the file (or the terminal "
                             "input) as UTF-8.") from None
    t = t.strip()
    if not t:
        raise InputDataError(f"{what} is empty; give a cell type or a description.")
    if len(t) > MAX_TEXT_CHARS:
        raise InputDataError(f"{what} has {len(t)} characters; keep it under {MAX_TEXT_CHARS} (the model reads "
                             "only the first few hundred tokens).")
    return t


def query_texts(queries: Sequence[str], *, expand: bool = True) -> list[str]:
    """Model input for each query: the training-style description when the whole query is a CL
    id/label/synonym and ``expand``, else the query itself."""
    out = []
    builder = DescriptionBuilder() if expand else None
    for q in queries:
        q = _check_text(q, "A query")
        if builder is not None and builder.resolve_cell_type(q) is not None:
            out.append(builder.describe_cell_type(q))
        else:
            out.append(q)
    return out


MAX_LABELS = 20_000
"""More candidate labels than this are refused unless ``max_labels=`` is raised: the Cell Ontology
has about 3,000 cell types, so a longer list is almost always a mistake (a column of cell ids
passed as labels_key, a file read whole)."""


def candidate_labels(*, labels: Sequence[str] | Mapping[str, str] | None = None, obs_values: Sequence[object] | None = None,
                     descendants_of: str | None = None, context: str | None = None,
                     max_labels: int = MAX_LABELS) -> Candidates:
    """Candidate labels from exactly one source, each described like a training cell type.

    ``labels``: names or CL ids, or a mapping of names to their CL terms (``{"CD19+ B":
    "CL:0000236"}``: the name is kept and the term's definition used, as the training descriptions
    of a dataset with a ``label_map`` read); ``obs_values``: the values of an ``.obs`` column (its distinct
    values); ``descendants_of``: a CL term (id or name) and all its descendants. Ambiguous labels
    ("unknown", "?", NaN...) are dropped, as in training. ``context`` (e.g. "Sampled from the
    blood.") is appended to every text, like the context sentence of training descriptions.
    """
    given = sum(x is not None for x in (labels, obs_values, descendants_of))
    if given != 1:
        raise InputDataError("Give exactly one source of candidate labels: labels=[...], an .obs column "
                             "(labels_key=) or descendants_of='CL:...'.")
    label_map = dict(labels) if isinstance(labels, Mapping) else {}
    builder = DescriptionBuilder(DescriptionConfig(label_map=label_map)) if label_map else DescriptionBuilder()
    if descendants_of is not None:
        term = builder.resolve_cell_type(descendants_of)
        if term is None:
            raise InputDataError(f"{descendants_of!r} is not a Cell Ontology id or label.")
        from .ontology import cell_ontology

        cl = cell_ontology()
        ids = cl.descendants(term.id, include_self=True)
        raw = ids
    else:
        if isinstance(labels, str):
            raise InputDataError("labels must be a list of labels, not one string.")
        values = list(labels) if labels is not None else list(obs_values or [])
        raw = []
        for v in values:
            if is_ambiguous(v):
                continue
            if isinstance(v, (bytes, bytearray)):
                raise InputDataError(f"A candidate label must be text, got bytes ({v[:40]!r}); decode it first, "
                                     "e.g. label.decode('utf-8').")
            if not isinstance(v, str):
                v = str(v)   # numeric cluster ids from an .obs column
            raw.append(_check_text(v, "A candidate label"))
        raw = list(dict.fromkeys(raw))
    if not raw:
        raise InputDataError("No candidate labels left (all were empty or ambiguous like 'unknown').")
    if len(raw) > max_labels:
        raise InputDataError(f"{len(raw)} candidate labels (e.g. {list(raw[:3])}), more than max_labels={max_labels}: "
                             "the Cell Ontology has about 3,000 cell types. Check the label source (a column of "
                             "cell ids?), use descendants_of= a CL subtree, or raise max_labels.")
    names, ids, texts = [], [], []
    for v in raw:
        term = builder.resolve_cell_type(v)
        name = term.label if (term is not None and v.startswith("CL:") and v not in label_map) else v
        names.append(name)
        ids.append(term.id if term is not None else "")
        text = builder.describe_cell_type(v)
        texts.append(f"{text} {context.strip()}" if context else text)
    dup = [n for n in set(names) if names.count(n) > 1]
    if dup:
        raise InputDataError(f"Candidate labels {sorted(dup)[:5]} appear twice (e.g. as a name and its CL id); "
                             "give each once.")
    return Candidates(names, ids, texts, context)


def backoff_labels(candidates: Candidates, trained: Sequence[str]) -> tuple[Candidates | None, list[list[int]]]:
    """The Cell Ontology back-off of zero-shot scores: for each candidate, its ancestors that the
    model was trained on (``trained``: CL ids) and that are not candidates themselves.

    A label set is often finer than the training labels. A corpus names "CD4-positive,
    alpha-beta T cell" while a user asks for its naive and memory subtypes, whose texts the model
    places less well. :meth:`~scmmgpt.models.scmmgpt.ScMMGPT.iter_label_scores` then scores such
    a candidate by the best of its own text and those ancestors. Its own score still orders it
    among the candidates that share an ancestor's score.

    The label set is read as a partition: a cell the model takes for a CD4 T cell is one of the
    CD4 subtypes offered. Every trained ancestor counts, not only the nearest. A broad one such as
    "T cell" then lifts all of its descendants among the candidates alike, CD8 T cells included.

    Returns ``(proxies, links)``. ``proxies`` are the ancestors as candidates, described like
    training cell types with the candidates' context (``None`` when there are none). ``links[j]``
    indexes the proxies of candidate ``j``.
    """
    from .ontology import cell_ontology

    trained_set = {t for t in trained if t}
    own = {i for i in candidates.ids if i}
    if not trained_set or not own:
        return None, [[] for _ in candidates.ids]
    cl = cell_ontology()
    per = [sorted(a for a in cl.ancestors(cid) if a in trained_set and a not in own) if cid else []
           for cid in candidates.ids]
    terms = sorted({a for p in per for a in p})
    if not terms:
        return None, [[] for _ in per]
    proxies = candidate_labels(labels=terms, context=candidates.context)
    return proxies, [[terms.index(a) for a in p] for p in per]


#: How far under its ancestor's score a backed-off candidate sits, per unit of its own deficit.
BACKOFF_TIE = 1e-3


def back_off_scores(own: np.ndarray, proxy: np.ndarray, links: Sequence[Sequence[int]]) -> np.ndarray:
    """Scores ``(N, T)`` with each candidate's trained ancestors taken into account
    (:func:`backoff_labels`). ``proxy`` ``(N, P)`` holds the ancestors' scores and ``links[j]`` those
    of candidate ``j``. Where the best of them, ``m``, beats the candidate's own score ``s``, the
    candidate scores ``m - 1e-3 * (m - s)``. That is just under ``m``, with siblings in the order of
    their own texts; elsewhere the score stays ``s``."""
    out = np.array(own, copy=True)
    for j, idx in enumerate(links):
        if len(idx):
            m = proxy[:, list(idx)].max(axis=1)
            s = own[:, j]
            out[:, j] = np.where(m > s, m - BACKOFF_TIE * (m - s), s)
    return out
