"""Gene vocabulary: gene token <-> integer index, with the special tokens of scGPT/scMMGPT.

The paper's vocabulary has 60,697 tokens (CELLxGENE census genes plus ``<pad>``, ``<cls>``,
``<eoc>``): :meth:`GeneVocab.named` ``("census")`` gives it, with the indices of scGPT's whole-human
model. A scGPT ``vocab.json`` (``{token: index}``) is imported unchanged, keeping its indices.
Lookup is case-insensitive on gene symbols.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import InputDataError

__all__ = ["GeneVocab", "PAD", "CLS", "EOC", "SPECIAL_TOKENS", "NAMED_VOCABS"]

PAD, CLS, EOC = "<pad>", "<cls>", "<eoc>"
SPECIAL_TOKENS = (PAD, CLS, EOC)

#: Vocabularies shipped with the package, by name: ``census`` is the CELLxGENE census gene list of
#: scGPT's whole-human model (``scgpt==0.2.4``'s ``default_census_vocab.json``, 60,694 genes at its
#: indices), with ``<pad>``, ``<cls>``, ``<eoc>`` at 60694-60696: 60,697 tokens, the paper's.
NAMED_VOCABS = {"census": "census_genes.txt.gz"}


@dataclass
class GeneVocab:
    """Ordered gene vocabulary.

    Attributes
    ----------
    tokens
        Token at each index (``tokens[i]`` has index ``i``).
    """

    tokens: list[str]
    _index: dict[str, int] = field(init=False, repr=False)
    _upper: dict[str, int] = field(init=False, repr=False)
    _organism: str | None = field(default=None, init=False, repr=False, compare=False)
    """Organism of the genes, detected on first use (:func:`scmmgpt.data.prepare.vocab_organism`)."""

    def __post_init__(self) -> None:
        if len(set(self.tokens)) != len(self.tokens):
            raise InputDataError("The gene vocabulary has duplicate tokens; each gene must appear once.")
        self._index = {t: i for i, t in enumerate(self.tokens)}
        self._upper = {}
        for i, t in enumerate(self.tokens):
            self._upper.setdefault(t.upper(), i)
        for special in SPECIAL_TOKENS:
            if special not in self._index:
                raise InputDataError(f"The gene vocabulary lacks the special token {special!r}.")

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_genes(cls, genes: Iterable[str]) -> "GeneVocab":
        """Build a vocabulary: special tokens first (``<pad>``=0, ``<cls>``=1, ``<eoc>``=2), then
        the unique genes in the order given."""
        seen: dict[str, None] = {}
        for g in genes:
            if g is None or g in SPECIAL_TOKENS:
                continue
            seen.setdefault(str(g), None)
        return cls(list(SPECIAL_TOKENS) + list(seen))

    @classmethod
    def named(cls, name: str | os.PathLike[str]) -> "GeneVocab":
        """A shipped vocabulary by name (:data:`NAMED_VOCABS`: ``"census"``), or a ``vocab.json``."""
        if str(name) in NAMED_VOCABS:
            import gzip
            from importlib.resources import files

            with gzip.open(str(files(__package__) / NAMED_VOCABS[str(name)]), "rt") as f:
                genes = [line.rstrip("\n") for line in f if not line.startswith("#")]
            return cls(genes + list(SPECIAL_TOKENS))
        if not Path(name).is_file():
            raise InputDataError(f"Unknown gene vocabulary {str(name)!r}: give one of {sorted(NAMED_VOCABS)} or the "
                                 "path of a vocab.json ({token: index}).")
        return cls.from_json(name)

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> "GeneVocab":
        """Load ``{token: index}`` JSON (our format and scGPT's ``vocab.json``), keeping indices.

        A scGPT vocabulary without ``<eoc>`` gets it appended at the end (a new index), so the
        indices of every existing token stay as the file says.
        """
        path = Path(path)
        try:
            mapping = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputDataError(f"Vocabulary file {path} does not exist.") from None
        except json.JSONDecodeError as exc:
            raise InputDataError(f"Vocabulary file {path} is not valid JSON ({exc}).") from None
        if not isinstance(mapping, dict) or not all(isinstance(v, int) for v in mapping.values()):
            raise InputDataError(f"Vocabulary file {path} must map each token to an integer index.")
        size = max(mapping.values()) + 1
        tokens: list[str | None] = [None] * size
        for tok, idx in mapping.items():
            if idx < 0 or tokens[idx] is not None:
                raise InputDataError(f"Vocabulary file {path}: index {idx} is negative or used twice.")
            tokens[idx] = tok
        holes = [i for i, t in enumerate(tokens) if t is None]
        for i in holes:  # keep indices stable; fill gaps with unreachable placeholders
            tokens[i] = f"<unused{i}>"
        for special in SPECIAL_TOKENS:
            if special not in mapping:
                tokens.append(special)
        return cls([str(t) for t in tokens])

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``{token: index}`` JSON (scGPT-compatible), atomically."""
        from ..utils.io import atomic_write_text

        atomic_write_text(path, json.dumps({t: i for i, t in enumerate(self.tokens)}))

    # -- lookup -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self._index or str(token).upper() in self._upper

    def __getitem__(self, token: str) -> int:
        if token in self._index:
            return self._index[token]
        return self._upper[str(token).upper()]

    @property
    def pad_id(self) -> int:
        return self._index[PAD]

    @property
    def cls_id(self) -> int:
        return self._index[CLS]

    @property
    def eoc_id(self) -> int:
        return self._index[EOC]

    def encode(self, genes: Sequence[str | None]) -> np.ndarray:
        """Indices of ``genes`` (exact match first, then case-insensitive); ``-1`` where absent."""
        out = np.full(len(genes), -1, dtype=np.int64)
        for i, g in enumerate(genes):
            if g is None:
                continue
            idx = self._index.get(g)
            if idx is None:
                idx = self._upper.get(str(g).upper())
            if idx is not None and self.tokens[idx] not in SPECIAL_TOKENS:
                out[i] = idx
        return out

    def gene_mask(self) -> np.ndarray:
        """Boolean mask over indices, False for special/placeholder tokens."""
        return np.array([not (t in SPECIAL_TOKENS or t.startswith("<unused")) for t in self.tokens])
