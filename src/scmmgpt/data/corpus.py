"""A pre-training corpus from several labelled datasets: labels harmonised to the Cell Ontology,
one gene vocabulary, each dataset's measured genes recorded, written once as shards.

:func:`build_corpus` reads each dataset (an ``.h5ad``, or ``"pbmc68k_reduced"`` for the bundled
PBMCs), keeps the cells of the requested organism, resolves every cell's label to a Cell Ontology
term (a valid id in ``cell_type_ontology_term_id`` first, else the label by name or synonym, else
the dataset's ``label_map``) and leaves out the cells whose label is ambiguous (``?``,
``unknown``...) or that resolve to no term, counting each reason. The kept cells of each dataset
are written (block by block, never a whole dataset in memory) as one model-ready file under ``inputs/`` (``obs['cell_type']`` is the CL term's name,
``obs['dataset']`` the dataset's name) and all of them as shards (:func:`~scmmgpt.data.shards.write_shards`)
over the union of the datasets' genes. ``corpus.json`` records, per dataset, what went in and what
was left out, its types and the shards that hold it; ``measured/NAME.npy`` is the (V,) mask of the
genes that dataset measured (the generation loss and metrics are scored only on those).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from ..errors import InputDataError
from ..utils.io import atomic_write_text
from .descriptions import is_ambiguous
from .vocab import SPECIAL_TOKENS, GeneVocab

__all__ = ["CorpusEntry", "harmonise_labels", "build_corpus", "load_corpus_info"]

_HUMAN = {"homo sapiens", "human", "homo_sapiens", "ncbitaxon:9606"}
_MOUSE = {"mus musculus", "mouse", "mus_musculus", "ncbitaxon:10090"}
_ORGANISMS = {"homo_sapiens": _HUMAN, "mus_musculus": _MOUSE}


@dataclass(frozen=True)
class CorpusEntry:
    """One dataset of the corpus."""

    path: str
    """An ``.h5ad`` file, or ``"pbmc68k_reduced"`` (the bundled PBMCs, read from ``raw``)."""
    name: str | None = None
    """The dataset's name in the corpus (default: the file's stem)."""
    label_key: str = "cell_type"
    """obs column with the cell type labels (names or CL ids)."""
    id_key: str | None = "cell_type_ontology_term_id"
    """obs column with CL ids (used where valid)."""
    label_map: Mapping[str, str] = field(default_factory=dict)
    """Extra ``{label: CL id}`` for labels the ontology does not know by name or synonym."""
    layer: str | None = None
    use_raw: bool = False

    @property
    def dataset_name(self) -> str:
        return self.name or ("pbmc68k_reduced" if self.path == "pbmc68k_reduced" else Path(self.path).stem)


def harmonise_labels(obs: pd.DataFrame, *, label_key: str = "cell_type",
                     id_key: str | None = "cell_type_ontology_term_id",
                     label_map: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Every cell's Cell Ontology term: columns ``cl_id``, ``cl_name`` and ``status``
    (``"ok"``, ``"ambiguous"`` for labels such as ``?`` / ``unknown``, ``"unresolved"`` for labels
    no CL term matches). Resolved once per distinct (label, id) pair."""
    from .ontology import cell_ontology

    if label_key not in obs.columns:
        raise InputDataError(f"obs has no label column {label_key!r}; columns: {list(obs.columns)}.")
    cl = cell_ontology()
    labels = obs[label_key].astype(object)
    ids = obs[id_key].astype(object) if id_key and id_key in obs.columns else pd.Series([None] * len(obs),
                                                                                       index=obs.index)
    extra = dict(label_map or {})
    found: dict[tuple[str, str], tuple[str, str, str]] = {}
    out = []
    for lab, tid in zip(labels, ids):
        key = (str(lab), str(tid))
        if key not in found:
            if is_ambiguous(lab):
                found[key] = ("", "", "ambiguous")
            else:
                term = None
                for cand in (tid, extra.get(str(lab)), lab):
                    if cand is not None and not is_ambiguous(cand) and str(cand).strip():
                        term = cl.resolve(str(cand))
                        if term is not None:
                            break
                found[key] = (term.id, term.label, "ok") if term is not None else ("", "", "unresolved")
        out.append(found[key])
    return pd.DataFrame(out, columns=["cl_id", "cl_name", "status"], index=obs.index)


def _open(entry: CorpusEntry) -> tuple[Any, pd.DataFrame, pd.Index, dict[str, str]]:
    """``(adata, obs, genes, label map)``: the entry's cells (an ``.h5ad`` opened backed, its matrix
    still on disk; pbmc68k's raw counts in memory), their obs, the genes of the chosen matrix and
    the built-in ``{label: CL id}`` the dataset needs (pbmc68k's marker-style names)."""
    import anndata as ad

    from .io import read_h5ad, select_matrix

    if entry.path == "pbmc68k_reduced":
        from ..datasets import PBMC68K_LABEL_MAP, pbmc68k_reduced

        a = pbmc68k_reduced()
        full = ad.AnnData(X=a.raw.X.copy(), obs=a.obs.copy(), var=pd.DataFrame(index=a.raw.var_names))
        return full, full.obs, pd.Index(full.var_names), PBMC68K_LABEL_MAP
    a = read_h5ad(entry.path, backed=True)
    _, genes, _ = select_matrix(a, layer=entry.layer, use_raw=entry.use_raw)     # backed: X stays on disk
    return a, a.obs, genes, {}


def _write_kept(adata: Any, entry: CorpusEntry, keep: np.ndarray, obs: pd.DataFrame, path: Path,
                block_cells: int) -> None:
    """The kept cells, with ``obs``, as one model-ready ``.h5ad``: read ``block_cells`` rows at a time
    from a backed file and joined on disk (``anndata.experimental.concat_on_disk``), so a dataset
    larger than memory passes through."""
    import anndata as ad
    from anndata.experimental import concat_on_disk

    from .io import select_matrix

    tmp = path.with_suffix(".tmp.h5ad")
    pieces: list[Path] = []
    try:
        for start in range(0, adata.n_obs, block_cells):
            stop = min(start + block_cells, adata.n_obs)
            rows = np.flatnonzero(keep[start:stop])
            if not len(rows):
                continue
            block = adata[start:stop]
            block = block.to_memory() if getattr(block, "isbacked", False) else block
            X, var_names, _ = select_matrix(block, layer=entry.layer, use_raw=entry.use_raw)
            var = (block.raw.var if entry.use_raw else block.var).copy().set_index(pd.Index(var_names))
            piece = ad.AnnData(X=X[rows], obs=obs.iloc[start + rows], var=var)
            part = path.with_name(f".{path.stem}.part{len(pieces):05d}.h5ad")
            piece.write_h5ad(part)
            pieces.append(part)
        if len(pieces) == 1:
            os.replace(pieces[0], tmp)
        else:
            concat_on_disk([str(x) for x in pieces], str(tmp), merge="same")
        os.replace(tmp, path)
    finally:
        for x in pieces:
            x.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)



def _type_counts(types: pd.Series) -> dict[str, int]:
    """Cells per type, most first; ties by name (``value_counts`` leaves their order to chance, and
    ``corpus.json`` should not change between two builds of the same corpus)."""
    counts = types.astype(str).value_counts()
    return {name: int(n) for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))}

def build_corpus(entries: Sequence[CorpusEntry | str | os.PathLike[str]], out: str | os.PathLike[str], *,
                 organism: str = "homo_sapiens", target_sum: float = 1e4, cells_per_shard: int = 50_000,
                 workers: int = 1, progress: bool = False, block_cells: int = 50_000) -> dict[str, Any]:
    """Harmonise, filter and shard ``entries`` into ``out``; returns the ``corpus.json`` record.

    A dataset whose genes are of another organism is skipped as a whole (recorded with the reason);
    inside a dataset with an ``obs['organism']`` column only the cells of ``organism`` are kept.
    Each ``.h5ad`` is read backed, ``block_cells`` rows at a time, and the shards are written block
    by block too: memory holds one block and the obs tables, never a whole dataset.
    Re-running on the same folder finishes an interrupted run (complete shards are kept).
    """
    from .genes import detect_organism
    from .pipeline import vocab_from_adata
    from .shards import write_shards

    if organism not in _ORGANISMS:
        raise InputDataError(f"organism must be one of {sorted(_ORGANISMS)}, got {organism!r}.")
    items = [e if isinstance(e, CorpusEntry) else CorpusEntry(str(e)) for e in entries]
    if not items:
        raise InputDataError("build_corpus needs at least one dataset.")
    names = [e.dataset_name for e in items]
    if len(set(names)) != len(names):
        raise InputDataError(f"Two datasets share a name ({names}); give each CorpusEntry a distinct name=.")
    out = Path(out)
    (out / "inputs").mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    written: list[Path] = []
    genes: set[str] = set()
    for entry in items:
        name = entry.dataset_name
        adata, obs, gene_names, builtin_map = _open(entry)
        rec: dict[str, Any] = {"name": name, "source": entry.path, "n_cells": int(adata.n_obs)}
        file_organism = detect_organism([str(v) for v in gene_names])
        if file_organism != organism:
            records.append({**rec, "skipped": f"its genes are {file_organism}, not {organism}"})
            continue
        keep = np.ones(adata.n_obs, dtype=bool)
        if "organism" in obs.columns:
            org = obs["organism"].astype(str).str.strip().str.lower()
            keep &= org.isin(_ORGANISMS[organism]).to_numpy()
        rec["left_out_organism"] = int((~keep).sum())
        terms = harmonise_labels(obs, label_key=entry.label_key, id_key=entry.id_key,
                                 label_map={**builtin_map, **entry.label_map})
        for status in ("ambiguous", "unresolved"):
            bad = (terms["status"] == status).to_numpy() & keep
            rec[f"left_out_{status}"] = int(bad.sum())
            if status == "unresolved" and bad.any():
                rec["unresolved_labels"] = sorted({str(v) for v in obs[entry.label_key][bad]})[:20]
            keep &= ~bad
        if not keep.any():
            records.append({**rec, "skipped": "no cell with an unambiguous label of the organism"})
            continue
        kept = obs.copy()
        kept["cell_type_original"] = kept[entry.label_key].astype(str)
        kept["cell_type"] = terms["cl_name"].to_numpy()
        kept["cell_type_ontology_term_id"] = terms["cl_id"].to_numpy()
        kept["dataset"] = name
        kept.index = pd.Index([f"{name}:{o}" for o in kept.index])
        for col in kept.columns:          # h5ad-safe obs: plain strings
            if kept[col].dtype == object or isinstance(kept[col].dtype, pd.CategoricalDtype):
                kept[col] = kept[col].astype(str)
        path = out / "inputs" / f"{name}.h5ad"
        if not path.is_file():
            _write_kept(adata, entry, keep, kept, path, block_cells)
        genes.update(vocab_from_adata(adata, layer=entry.layer, use_raw=entry.use_raw).tokens[len(SPECIAL_TOKENS):])
        if getattr(adata, "isbacked", False):
            adata.file.close()
        written.append(path)
        rec.update({"n_kept": int(keep.sum()), "types": _type_counts(kept["cell_type"][keep]),
                    "input": str(path.relative_to(out))})
        records.append(rec)
    if not written:
        raise InputDataError(f"None of the datasets has cells to keep: {records}.")
    vocab = GeneVocab.from_genes(sorted(genes))
    manifest = write_shards([str(p) for p in written], out, vocab=vocab, label_key="cell_type",
                            target_sum=target_sum, cells_per_shard=cells_per_shard, workers=workers,
                            progress=progress, min_coverage=0.0)
    (out / "measured").mkdir(exist_ok=True)
    by_source: dict[str, list[str]] = {}
    for s in manifest["shards"]:
        by_source.setdefault(s["source"], []).append(s["name"])
    for rec in records:
        if "input" not in rec:
            continue
        shards = by_source.get(str(out / rec["input"]), [])
        mask = np.zeros(len(vocab), dtype=bool)
        for s in shards:
            mask |= np.load(out / s / "measured.npy")
        np.save(out / "measured" / f"{rec['name']}.npy", mask)
        rec.update({"shards": shards, "n_measured_genes": int(mask.sum())})
    info = {"format": "scmmgpt-corpus-1", "organism": organism, "n_genes": len(vocab) - len(SPECIAL_TOKENS),
            "n_cells": manifest["n_cells"], "datasets": records,
            "entries": [{**asdict(e), "label_map": dict(e.label_map)} for e in items]}
    atomic_write_text(out / "corpus.json", json.dumps(info, indent=1))
    return info


def load_corpus_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``corpus.json`` of a corpus folder."""
    f = Path(path) / "corpus.json"
    if not f.is_file():
        raise InputDataError(f"{path} is not a corpus folder (no corpus.json); build it with `scmmgpt corpus`.")
    return json.loads(f.read_text())
