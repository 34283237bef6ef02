"""Labelled cells for training and evaluation: which cells, their descriptions and a split.

:class:`DataConfig` is the ``data`` section of a run configuration; :func:`load_labelled` reads an
``.h5ad`` (or the bundled PBMCs, or a shard folder), maps it into a vocabulary, builds every cell's
description from its metadata and the ontologies, and splits it (stratified by type).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ConfigError, InputDataError
from .dataset import CellTextDataset, stratified_split
from .descriptions import DescriptionBuilder, DescriptionConfig
from .io import read_h5ad
from .pipeline import vocab_from_adata
from .prepare import prepare_cells
from .source import CellSource
from .vocab import GeneVocab

__all__ = ["DataConfig", "LabelledCells", "load_labelled", "BUNDLED"]

#: ``data.path`` value (or ``None``) meaning the bundled scanpy pbmc68k_reduced.
BUNDLED = "pbmc68k_reduced"


@dataclass
class DataConfig:
    """Which cells, which labels, which split."""

    path: str | None = None
    """An ``.h5ad`` file; ``None`` or ``"pbmc68k_reduced"``: the bundled 700 PBMCs."""
    label_key: str = "cell_type"
    """obs column with cell type labels (names or CL ids)."""
    text_key: str | None = None
    """obs column of free-text descriptions that replace the ontology template."""
    layer: str | None = None
    """Matrix to read (``None``: ``X``)."""
    use_raw: bool = False
    """Read ``adata.raw.X``."""
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Train / validation / test fractions, stratified by label."""
    seed: int = 0
    """Seed of the split and of the type subset."""
    types_fraction: float | None = None
    """Train on a seeded random fraction of the cell types only (paper Table 3 protocol); the other
    types' cells are never trained on and are reported as held-out types."""

    def __post_init__(self) -> None:
        a, b, c = (float(x) for x in self.split)
        self.split = (a, b, c)
        if self.types_fraction is not None and not 0 < self.types_fraction <= 1:
            raise ConfigError(f"data.types_fraction must be in (0, 1], got {self.types_fraction}.")

    @property
    def bundled(self) -> bool:
        return self.path in (None, BUNDLED)


@dataclass
class LabelledCells:
    """Cells in a vocabulary, their descriptions and a split."""

    cells: CellSource
    """The cells in the vocabulary (:class:`CellData` in memory or :class:`ShardedCells` on disk)."""
    descriptions: pd.DataFrame
    """Per cell: ``description``, ``cell_type``, ``cell_type_id``, ``ambiguous``."""
    split: dict[str, np.ndarray]
    """``train``/``val``/``test`` positions (ambiguous cells in none)."""
    vocab: GeneVocab
    source: str
    train_types: list[str] | None = None
    """With ``types_fraction``: the types trained on; the others are held out entirely."""

    def types(self, part: str | None = None) -> np.ndarray:
        """Cell type name of every cell (or of the cells of split ``part``)."""
        names = self.descriptions["cell_type"].astype(str).to_numpy()
        return names if part is None else names[self.split[part]]

    def label_set(self) -> dict[str, str]:
        """The distinct unambiguous cell types, sorted by name, each with its Cell Ontology id (or
        its name where it has none): the candidate labels of zero-shot evaluations, as a user passes
        them to ``tl.annotate(labels=...)`` / ``ScMMGPT.score_labels``."""
        d = self.descriptions[~self.descriptions["ambiguous"].to_numpy()]
        ids = d["cell_type_id"].astype(str) if "cell_type_id" in d else d["cell_type"].astype(str)
        pairs = dict(zip(d["cell_type"].astype(str), ids))
        return {name: (pairs[name] if pairs[name] not in ("", "nan", "None") else name) for name in sorted(pairs)}

    def dataset(self, part: str, *, max_genes: int, with_targets: bool = False, n_bins: int | None = None,
                input_genes: np.ndarray | None = None, target_sum: float | None = None) -> CellTextDataset:
        """The cells of split ``part`` with their training descriptions, read as a model reads cells
        (pass :attr:`ScMMGPT.reading <scmmgpt.models.scmmgpt.ScMMGPT.reading>` as ``**model.reading``)."""
        idx = self.split[part]
        return CellTextDataset(self.cells.subset(idx), list(self.descriptions["description"].iloc[idx]),
                               cls_id=self.vocab.cls_id, max_genes=max_genes, with_targets=with_targets,
                               n_bins=n_bins, input_genes=input_genes, target_sum=target_sum)


def load_labelled(data: DataConfig, *, vocab: GeneVocab | None = None, target_sum: float = 1e4) -> LabelledCells:
    """Read the data, map genes into ``vocab`` (default: the data's own genes), build descriptions
    and a stratified split."""
    from .shards import ShardedCells, is_shard_dir, load_shard_descriptions

    if data.path is not None and is_shard_dir(data.path):
        shards = ShardedCells(data.path)
        manifest = shards.manifest
        shard_vocab = GeneVocab.from_json(Path(data.path) / "vocab.json")
        if vocab is not None and vocab.tokens != shard_vocab.tokens:
            raise InputDataError(f"The shards in {data.path} were written for another gene vocabulary than the "
                                 "model's; write them again with the model (scmmgpt shard --model DIR).")
        if abs(manifest["target_sum"] - target_sum) > 1e-9 * target_sum:
            raise InputDataError(f"The shards in {data.path} hold values for target_sum={manifest['target_sum']}, "
                                 f"the model uses {target_sum}; write them again with the model's setting.")
        if manifest["label_key"] != data.label_key:
            raise InputDataError(f"The shards in {data.path} were labelled from {manifest['label_key']!r}, not "
                                 f"{data.label_key!r}; write them again with --label-key {data.label_key}.")
        desc = load_shard_descriptions(data.path)
        return _labelled(shards, desc, data, shard_vocab, f"shards {data.path}")
    label_map: dict[str, str] = {}
    layer, use_raw = data.layer, data.use_raw
    if data.path is None or data.bundled:
        from ..datasets import PBMC68K_LABEL_MAP, pbmc68k_reduced

        adata, use_raw, label_map, source = pbmc68k_reduced(), True, PBMC68K_LABEL_MAP, "scanpy pbmc68k_reduced"
        layer = None
    else:
        adata, source = read_h5ad(data.path), str(data.path)
    if vocab is None:
        vocab = vocab_from_adata(adata, layer=layer, use_raw=use_raw)
    cells = prepare_cells(adata, vocab, layer=layer, use_raw=use_raw, target_sum=target_sum,
                          coverage_fixes="Train from a model whose vocabulary covers these genes, or a new model "
                                         "(without --model: its vocabulary is the data's genes).")
    desc = DescriptionBuilder(DescriptionConfig(cell_type_key=data.label_key, text_key=data.text_key,
                                                label_map=label_map)).build(adata.obs.iloc[cells.cell_index])
    return _labelled(cells, desc.reset_index(drop=True), data, vocab, source)


def _labelled(cells: CellSource, desc: pd.DataFrame, data: DataConfig, vocab: GeneVocab, source: str) -> LabelledCells:
    """Split (stratified by type; ``types_fraction`` keeps a seeded subset of types for training)."""
    types = desc["cell_type"].to_numpy()
    amb = desc["ambiguous"].to_numpy()
    split = stratified_split(types, data.split, seed=data.seed, exclude=amb)
    train_types = None
    if data.types_fraction is not None:
        all_types = sorted({str(t) for t, a in zip(types, amb) if not a})
        k = max(1, math.ceil(data.types_fraction * len(all_types)))
        rng = np.random.default_rng(data.seed)
        train_types = sorted(rng.choice(all_types, size=k, replace=False).tolist())
        keep = np.isin(types.astype(str), train_types)
        split["train"] = split["train"][keep[split["train"]]]
        split["val"] = split["val"][keep[split["val"]]]
    if len(split["train"]) == 0:
        raise InputDataError(f"No labelled training cells in {source} (column {data.label_key!r}).")
    return LabelledCells(cells, desc, split, vocab, source, train_types)
