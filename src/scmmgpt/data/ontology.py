"""Ontology look-ups (Cell Ontology, UBERON, MONDO, HsapDv, MmusDv, PATO) for descriptions.

Backed by ``cellxgene-ontology-guide``, which ships the ontologies offline. A term is found by its
id (``"CL:0000236"``), its label or one of its synonyms, case-insensitively.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from .. import assets

__all__ = ["Term", "OntologyIndex", "cell_ontology"]

_TERM_ID = re.compile(r"^[A-Za-z]+:\d+$")


@dataclass(frozen=True)
class Term:
    """One ontology term."""

    id: str
    label: str
    definition: str | None = None
    synonyms: tuple[str, ...] = field(default_factory=tuple)


class OntologyIndex:
    """Case-insensitive label/synonym index over one ontology (e.g. ``"CL"``).

    Examples
    --------
    >>> cl = OntologyIndex("CL")  # doctest: +SKIP
    >>> cl.resolve("b lymphocyte").id  # doctest: +SKIP
    'CL:0000236'
    """

    def __init__(self, ontology: str) -> None:
        self.ontology = ontology
        self._parser = assets.ontology_parser()
        label_to_id = self._parser.get_term_label_to_id_map(ontology)
        self._ids = list(label_to_id.values())
        self._by_label = {lab.lower(): tid for lab, tid in label_to_id.items()}
        self._by_synonym: dict[str, str] = {}
        for tid, syns in self._parser.map_term_synonyms(self._ids).items():
            for s in syns or []:
                self._by_synonym.setdefault(s.lower(), tid)

    def __len__(self) -> int:
        return len(self._ids)

    def find_id(self, text: str) -> str | None:
        """Term id for an id, label or synonym (case-insensitive); ``None`` if unknown."""
        text = str(text).strip()
        if _TERM_ID.match(text):
            prefix, number = text.split(":")
            if prefix.upper() != self.ontology.upper():
                return None
            tid = f"{self.ontology}:{number}"
            try:
                return tid if self._parser.is_valid_term_id(tid) else None
            except ValueError:
                return None
        key = text.lower()
        return self._by_label.get(key) or self._by_synonym.get(key)

    @lru_cache(maxsize=65536)
    def term(self, term_id: str) -> Term:
        """The :class:`Term` of an id known to this ontology."""
        p = self._parser
        definition = p.get_term_description(term_id)
        synonyms = tuple(p.get_term_synonyms(term_id) or ())
        return Term(id=term_id, label=p.get_term_label(term_id), definition=definition, synonyms=synonyms)

    def resolve(self, text: str) -> Term | None:
        """:class:`Term` for an id, label or synonym; ``None`` if unknown."""
        tid = self.find_id(text)
        return None if tid is None else self.term(tid)

    def descendants(self, term_id: str, *, include_self: bool = True) -> list[str]:
        """Ids of all descendants of ``term_id`` (and itself)."""
        out = list(self._parser.get_term_descendants(term_id))
        return ([term_id] if include_self else []) + out

    def ancestors(self, term_id: str) -> list[str]:
        """Ids of all ancestors of ``term_id``."""
        return list(self._parser.get_term_ancestors(term_id))


@lru_cache(maxsize=8)
def get_index(ontology: str) -> OntologyIndex:
    """A cached :class:`OntologyIndex` for ``"CL"``, ``"UBERON"``, ``"MONDO"``, ``"HsapDv"``..."""
    return OntologyIndex(ontology)


def cell_ontology() -> OntologyIndex:
    """The Cell Ontology index."""
    return get_index("CL")
