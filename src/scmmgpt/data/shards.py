"""On-disk shards of model-ready cells, for datasets larger than memory.

``write_shards`` reads one or many ``.h5ad`` files in backed mode, ``cells_per_shard`` rows at a
time, and writes each block as a shard: the cells in vocabulary space as three CSR arrays
(``indptr.npy`` int64, ``indices.npy`` int32 gene ids, ``data.npy`` float32 eq.-1 values) and a
``meta.parquet`` table (obs name, source file and row, cell type, its id, ambiguous flag and the
training description, dictionary-encoded). A shard folder is written under a temporary name and
renamed into place, so it is complete or absent; ``manifest.json`` (written last) lists them.

``ShardedCells`` opens the arrays memory-mapped: a cell is read from disk when the dataset asks
for it, so what stays in memory per cell is its row offset, its length and two small integer
codes — a few bytes, whatever the number of genes. It can stand wherever :class:`CellData` is used
(``CellTextDataset``, the length-bucketed sampler, the training loop); DDP ranks and DataLoader
workers each map the same files.

Blocks are processed in parallel by ``workers`` processes (``concurrent.futures``), and across
nodes by ``rank`` / ``world_size`` (each rank takes every ``world_size``-th block; the last rank to
finish writes the manifest). The environment variables ``RANK`` and ``WORLD_SIZE`` set by
``torchrun`` / ``accelerate launch`` are used when they are not given.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, cast

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputDataError
from ..utils.io import atomic_write_text
from .descriptions import DescriptionBuilder, DescriptionConfig
from .genes import detect_organism
from .io import read_h5ad, select_matrix
from .prepare import GeneMatch, prepare_cells
from .values import ValueKindArg, detect_value_kind
from .vocab import GeneVocab

if TYPE_CHECKING:
    from .census import SomaSource
    from .source import MeasuredGenes

__all__ = ["ShardTask", "write_shards", "ShardedCells", "is_shard_dir", "load_shard_descriptions"]

FORMAT = "scmmgpt-shards-1"


@dataclass(frozen=True)
class ShardTask:
    """One block of rows of one source file, written as shard ``index``."""

    index: int
    source: str
    start: int
    stop: int
    value_kind: str
    """What the source's values are (detected once per source, ``detect_value_kind``)."""
    organism: str
    soma: SomaSource | None = None
    """A :class:`~scmmgpt.data.census.SomaSource`: rows ``start:stop`` of its saved join ids."""
    joinids: str | None = None


@dataclass(frozen=True)
class _Options:
    out: str
    vocab_path: str
    label_key: str
    text_key: str | None
    layer: str | None
    use_raw: bool
    target_sum: float
    min_coverage: float


def is_shard_dir(path: str | os.PathLike[str] | None) -> bool:
    return path is not None and Path(path).is_dir() and (Path(path) / "manifest.json").is_file()


def _plan(sources: Sequence[Any], cells_per_shard: int, layer: str | None, use_raw: bool, out: Path) -> list[ShardTask]:
    from .census import SomaSource, read_soma_block, soma_joinids

    tasks: list[ShardTask] = []
    for k, src in enumerate(sources):
        if isinstance(src, SomaSource):
            ids = soma_joinids(src, allow_empty=False)
            ids_path = out / f"soma-{k}-joinids.npy"
            if not ids_path.is_file():
                np.save(ids_path, ids)
            elif not np.array_equal(np.load(ids_path), ids):
                raise InputDataError(f"{out} holds shards of another selection of {src.uri}; use an empty folder.")
            head = read_soma_block(src, ids[:500])
            X = sp.csr_matrix(head.X)
            kind, organism = detect_value_kind(X), detect_organism([str(v) for v in head.var_names])
            for start in range(0, len(ids), cells_per_shard):
                tasks.append(ShardTask(len(tasks), src.uri, start, min(len(ids), start + cells_per_shard), kind,
                                       organism, soma=src, joinids=str(ids_path)))
            continue
        adata = read_h5ad(src, backed=True)
        X, var_names, where = select_matrix(adata, layer=layer, use_raw=use_raw)
        n = adata.n_obs
        if n == 0:
            raise InputDataError(f"{src} has no cells.")
        head = X[: min(n, 2000)]
        head = sp.csr_matrix(head) if not sp.issparse(head) else head.tocsr()
        kind = detect_value_kind(head)      # once per file, so every block is read the same way
        organism = detect_organism([str(v) for v in var_names])
        for start in range(0, n, cells_per_shard):
            tasks.append(ShardTask(len(tasks), str(src), start, min(n, start + cells_per_shard), kind, organism))
        if adata.isbacked:
            adata.file.close()
    return tasks


def _write_one(task: ShardTask, opt: _Options) -> dict[str, Any]:
    """Prepare one block and write it as ``shard-{index:05d}``; returns its summary."""
    import warnings

    out = Path(opt.out)
    name = f"shard-{task.index:05d}"
    final = out / name
    if (final / "shard.json").is_file():          # done by an earlier, interrupted run
        return json.loads((final / "shard.json").read_text())
    vocab = GeneVocab.from_json(opt.vocab_path)
    if task.soma is not None:
        from .census import read_soma_block

        assert task.joinids is not None          # set with soma by _plan
        rows = np.load(task.joinids)[task.start:task.stop]
        block = read_soma_block(task.soma, rows)
    else:
        rows = np.arange(task.start, task.stop)
        backed = read_h5ad(task.source, backed=True)
        block = backed[task.start:task.stop].to_memory()
        backed.file.close()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cells = prepare_cells(block, vocab, layer=opt.layer, use_raw=opt.use_raw, value_kind=cast(ValueKindArg, task.value_kind),
                              target_sum=opt.target_sum, organism=task.organism, min_coverage=opt.min_coverage,
                              coverage_fixes="Lower min_coverage= (CLI: scmmgpt shard --min-coverage) to proceed, "
                                             "or write the shards with a vocabulary that covers these genes "
                                             "(vocab=, CLI: --model).")
    desc = DescriptionBuilder(DescriptionConfig(cell_type_key=opt.label_key, text_key=opt.text_key)).build(
        block.obs.iloc[cells.cell_index])
    tmp = out / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    expr = cells.expr
    np.save(tmp / "indptr.npy", expr.indptr.astype(np.int64))
    np.save(tmp / "indices.npy", expr.indices.astype(np.int32))
    np.save(tmp / "data.npy", expr.data.astype(np.float32))
    np.save(tmp / "measured.npy", cells.measured)
    meta = pd.DataFrame({
        "obs_name": np.asarray(cells.obs_names).astype(str),
        "source_row": rows[cells.cell_index].astype(np.int64),     # h5ad row, or SOMA soma_joinid
        "cell_type": desc["cell_type"].astype(str).to_numpy(),
        "cell_type_id": desc["cell_type_id"].astype(str).to_numpy(),
        "ambiguous": desc["ambiguous"].to_numpy(bool),
        "description": desc["description"].astype(str).to_numpy(),
    })
    for col in ("cell_type", "cell_type_id", "description"):
        meta[col] = meta[col].astype("category")
    meta.to_parquet(tmp / "meta.parquet", index=False)
    m = cells.gene_match
    summary = {"name": name, "source": task.source, "rows": [task.start, task.stop], "n_cells": len(cells),
               "nnz": int(expr.nnz), "dropped_empty": int(cells.n_dropped_empty), "value_kind": cells.value_kind,
               "gene_match": {"n_genes": m.n_genes, "n_mapped": m.n_mapped, "coverage": m.coverage,
                              "organism": m.organism, "id_type": m.id_type},
               "warnings": sorted({str(w.message) for w in caught})[:5]}
    atomic_write_text(tmp / "shard.json", json.dumps(summary))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return summary


def write_shards(sources: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *,
                 vocab: GeneVocab | None = None, label_key: str = "cell_type", text_key: str | None = None,
                 layer: str | None = None, use_raw: bool = False, target_sum: float = 1e4,
                 cells_per_shard: int = 50_000, workers: int = 1, rank: int | None = None,
                 world_size: int | None = None, min_coverage: float = 0.5, progress: bool = False) -> dict[str, Any]:
    """Preprocess ``.h5ad`` file(s) into shards under ``out``; returns the manifest (``None``
    entries for blocks other ranks still write).

    Parameters
    ----------
    sources
        One or many ``.h5ad`` files (read in backed mode, one block at a time) and / or
        :class:`~scmmgpt.data.census.SomaSource` (a TileDB-SOMA / Census experiment and a filter).
    vocab
        The model's gene vocabulary; default: the genes of the first file (Ensembl ids as symbols).
    cells_per_shard
        Rows per block: each worker holds one block in memory at a time.
    workers
        Processes on this machine.
    rank, world_size
        This node's share of the blocks (default: ``$RANK`` / ``$WORLD_SIZE``, else 0 / 1).

    Re-running after an interruption skips the shards already complete.
    """
    from tqdm.auto import tqdm

    from .census import SomaSource, read_soma_block, soma_joinids
    from .pipeline import vocab_from_adata

    if isinstance(sources, (str, os.PathLike, SomaSource)):
        sources = [sources]
    sources = [s if isinstance(s, SomaSource) else str(s) for s in sources]
    if not sources:
        raise InputDataError("write_shards needs at least one .h5ad file.")
    if cells_per_shard < 1 or workers < 1:
        raise InputDataError("cells_per_shard and workers must be >= 1.")
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise InputDataError(f"rank {rank} is outside world_size {world_size}.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab_path = out / "vocab.json"
    if vocab is None and not vocab_path.is_file():
        if isinstance(sources[0], SomaSource):
            vocab = vocab_from_adata(read_soma_block(sources[0], soma_joinids(sources[0], allow_empty=False)[:1]))
        else:
            vocab = vocab_from_adata(read_h5ad(sources[0], backed=True), layer=layer, use_raw=use_raw)
    if vocab is not None:
        if vocab_path.is_file() and GeneVocab.from_json(vocab_path).tokens != vocab.tokens:
            raise InputDataError(f"{out} holds shards of another vocabulary; write to an empty folder.")
        if not vocab_path.is_file():
            vocab.save(vocab_path)
    tasks = _plan(sources, cells_per_shard, layer, use_raw, out)
    mine = tasks[rank::world_size]
    opt = _Options(str(out), str(vocab_path), label_key, text_key, layer, use_raw, target_sum, min_coverage)
    bar = tqdm(total=len(mine), desc="shards", disable=not progress)
    if workers == 1:
        for t in mine:
            _write_one(t, opt)
            bar.update(1)
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            for _ in pool.map(_write_one, mine, [opt] * len(mine)):
                bar.update(1)
    bar.close()
    return _finalize(out, tasks, opt)


def _finalize(out: Path, tasks: list[ShardTask], opt: _Options) -> dict[str, Any]:
    """Write ``manifest.json`` once every shard of the plan is complete (any rank may do it)."""
    shards = []
    for t in tasks:
        f = out / f"shard-{t.index:05d}" / "shard.json"
        shards.append(json.loads(f.read_text()) if f.is_file() else None)
    manifest = {"format": FORMAT, "sources": sorted({t.source for t in tasks}), "label_key": opt.label_key,
                "text_key": opt.text_key, "target_sum": opt.target_sum, "shards": shards,
                "n_cells": sum(s["n_cells"] for s in shards if s)}
    if all(s is not None for s in shards):
        measured = np.zeros(len(GeneVocab.from_json(opt.vocab_path)), dtype=bool)
        for s in shards:
            assert s is not None
            measured |= np.load(out / s["name"] / "measured.npy")
        np.save(out / "measured.npy", measured)
        atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


class ShardedCells:
    """Cells of a shard folder, read from memory-mapped arrays: a
    :class:`~scmmgpt.data.source.CellSource`, like :class:`CellData`, for datasets and training.
    ``rows`` selects a subset (positions over all shards)."""

    def __init__(self, path: str | os.PathLike[str], rows: np.ndarray | None = None, *,
                 _shared: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        if _shared is None:
            if not is_shard_dir(self.path):
                raise InputDataError(f"{self.path} is not a complete shard folder (no manifest.json); run "
                                     "`scmmgpt shard` (again) to finish it.")
            manifest = json.loads((self.path / "manifest.json").read_text())
            if manifest.get("format") != FORMAT:
                raise InputDataError(f"{self.path}: unknown shard format {manifest.get('format')!r}.")
            names = [s["name"] for s in manifest["shards"]]
            sizes = np.array([s["n_cells"] for s in manifest["shards"]], dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum(sizes)])
            lengths = np.concatenate([np.diff(np.load(self.path / n / "indptr.npy")).astype(np.int32) for n in names])
            _shared = {"manifest": manifest, "names": names, "offsets": offsets, "lengths": lengths,
                       "measured": np.load(self.path / "measured.npy"), "maps": {}}
        self._shared = _shared
        n = int(_shared["offsets"][-1])
        self.rows = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        self.measured = _shared["measured"]
        self.value_kind = _shared["manifest"]["shards"][0]["value_kind"] if n else "counts"
        gm = _shared["manifest"]["shards"][0]["gene_match"] if n else None
        self.gene_match = GeneMatch(**gm) if gm else None
        self.n_dropped_empty = sum(s["dropped_empty"] for s in _shared["manifest"]["shards"])

    # -- the CellSource interface -----------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers (spawn) re-open their own maps
        state = self.__dict__.copy()
        state["_shared"] = {**self._shared, "maps": {}}
        return state

    def n_expressed(self) -> np.ndarray:
        return self._shared["lengths"][self.rows]

    def subset(self, rows: np.ndarray) -> "ShardedCells":
        return ShardedCells(self.path, self.rows[np.asarray(rows)], _shared=self._shared)

    def _arrays(self, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        maps = self._shared["maps"]
        if s not in maps:
            d = self.path / self._shared["names"][s]
            maps[s] = tuple(np.load(d / f, mmap_mode="r") for f in ("indptr.npy", "indices.npy", "data.npy"))
        return maps[s]

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Gene ids and eq.-1 values of the ``i``-th cell (of this subset)."""
        g = int(self.rows[i])
        s = int(np.searchsorted(self._shared["offsets"], g, side="right") - 1)
        indptr, indices, data = self._arrays(s)
        r = g - int(self._shared["offsets"][s])
        lo, hi = int(indptr[r]), int(indptr[r + 1])
        return np.asarray(indices[lo:hi]), np.asarray(data[lo:hi])

    def rows_csr(self, idx: Any, n_genes: int | None = None) -> sp.csr_matrix:
        """The given cells as a CSR matrix over the vocabulary."""
        n_genes = n_genes or len(self.measured)
        parts = [self.row(int(i)) for i in np.asarray(idx)]
        indptr = np.concatenate([[0], np.cumsum([len(p[0]) for p in parts])])
        indices = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int32)
        data = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.float32)
        return sp.csr_matrix((data, indices, indptr), shape=(len(parts), n_genes))

    def measured_genes(self) -> "MeasuredGenes":
        """Each cell's source file (one group per distinct ``source`` of the manifest, named by its
        stem) and the genes that source measured: the union of its shards' ``measured.npy``."""
        from .source import MeasuredGenes

        if "by_source" not in self._shared:
            shards = self._shared["manifest"]["shards"]
            sources = sorted({s["source"] for s in shards})
            masks = np.zeros((max(len(sources), 1), len(self.measured)), dtype=bool)
            shard_group = np.array([sources.index(s["source"]) for s in shards], dtype=np.int64)
            for s, g in zip(shards, shard_group):
                masks[g] |= np.load(self.path / s["name"] / "measured.npy")
            all_rows = np.arange(int(self._shared["offsets"][-1]))
            shard_of = np.searchsorted(self._shared["offsets"], all_rows, side="right") - 1
            self._shared["by_source"] = (masks, shard_group[shard_of] if len(shards) else all_rows,
                                         tuple(Path(s).stem for s in sources) or ("data",))
        masks, group, names = self._shared["by_source"]
        return MeasuredGenes(masks, group[self.rows], names)

    @property
    def manifest(self) -> dict[str, Any]:
        return self._shared["manifest"]

    @property
    def obs_names(self) -> np.ndarray:
        """Name of each cell of this subset (read from the shards' tables once, then shared)."""
        if "obs_names" not in self._shared:
            self._shared["obs_names"] = load_shard_descriptions(self.path, ("obs_name",))["obs_name"].to_numpy()
        return np.asarray(self._shared["obs_names"][self.rows], dtype=object)


def load_shard_descriptions(path: str | os.PathLike[str], columns: Sequence[str] = ("cell_type", "cell_type_id",
                                                                               "ambiguous", "description")) -> pd.DataFrame:
    """The per-cell metadata of every shard, in order (categorical text columns: a few bytes per
    cell)."""
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    parts = [pd.read_parquet(Path(path) / s["name"] / "meta.parquet", columns=list(columns))
             for s in manifest["shards"]]
    if not parts:
        return pd.DataFrame(columns=list(columns))
    df = pd.concat(parts, ignore_index=True)
    for col in columns:
        if col != "ambiguous" and not isinstance(df[col].dtype, pd.CategoricalDtype):
            df[col] = df[col].astype("category")
    return df
