"""A training run from one configuration: data -> descriptions -> split -> model -> fit -> saved
model. Behind ``scmmgpt pretrain`` and ``scmmgpt finetune``.

A run configuration is YAML with three sections, each a typed dataclass::

    data:  {path: my.h5ad, label_key: cell_type, split: [0.8, 0.1, 0.1], ...}   # DataConfig
    model: {cell: {d_model: 256}, qformer: {n_query: 32}, ...}                    # ModelConfig
    train: {stage: stage1, max_steps: 1000, lr: 1.0e-5, ...}                      # TrainConfig

plus ``init`` (a saved model folder to start from) and ``cell_preset``. Any key can be overridden
with ``section.key=value`` strings (values parsed as YAML), e.g. ``train.lr=1e-4``.
The resolved configuration is written to ``{out_dir}/run_config.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from ..data import CellTextDataset, DescriptionBuilder, DescriptionConfig, prepare_cells, read_h5ad, stratified_split
from ..data.pipeline import vocab_from_adata
from ..data.prepare import CellData
from ..data.vocab import GeneVocab
from ..errors import ConfigError, InputDataError
from ..models.config import ModelConfig
from ..utils.io import atomic_write_text
from .config import TrainConfig

__all__ = ["DataConfig", "RunConfig", "LabelledCells", "load_run_config", "load_labelled", "run_training",
           "BUNDLED"]

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
        self.split = tuple(float(x) for x in self.split)
        if self.types_fraction is not None and not 0 < self.types_fraction <= 1:
            raise ConfigError(f"data.types_fraction must be in (0, 1], got {self.types_fraction}.")

    @property
    def bundled(self) -> bool:
        return self.path in (None, BUNDLED)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    init: str | None = None
    """A model folder (``save_pretrained``) to start from; ``None``: a new model from ``model``."""
    cell_preset: str | None = None
    """Named cell encoder size applied before ``model.cell`` keys (``tiny``, ``small``, ...)."""

    def to_dict(self) -> dict:
        return {"data": dataclasses.asdict(self.data), "model": self.model.to_dict(), "train": self.train.to_dict(),
                "init": self.init, "cell_preset": self.cell_preset}


def _packaged_config(name: str) -> Path | None:
    f = resources.files("scmmgpt") / "configs" / f"{name}.yaml"
    return Path(str(f)) if f.is_file() else None


def _set(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"Override {dotted!r}: {k!r} is not a section.")
    node[keys[-1]] = value


def load_run_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                    **defaults) -> RunConfig:
    """Read a YAML run configuration (a path, or the name of a packaged one such as ``stage1``),
    apply ``section.key=value`` overrides and build the typed configuration.

    ``defaults`` (``{"train.stage": "stage2"}`` style keys) are applied before the file.
    """
    import yaml

    tree: dict = {}
    for k, v in defaults.items():
        _set(tree, k, v)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            packaged = _packaged_config(str(path))
            if packaged is None:
                raise ConfigError(f"Config {path!r} is neither a file nor a packaged config "
                                  f"({sorted(f.stem for f in Path(str(resources.files('scmmgpt') / 'configs')).glob('*.yaml'))}).")
            p = packaged
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p} must hold a mapping with data/model/train sections.")
        for section, body in loaded.items():
            if isinstance(body, dict) and isinstance(tree.get(section), dict):
                tree[section].update(body)
            else:
                tree[section] = body
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} must look like section.key=value (e.g. train.lr=1e-4).")
        key, raw = item.split("=", 1)
        _set(tree, key.strip(), yaml.safe_load(raw))
    unknown = set(tree) - {"data", "model", "train", "init", "cell_preset"}
    if unknown:
        raise ConfigError(f"Unknown config sections {sorted(unknown)}; use data, model, train, init, cell_preset.")
    try:
        data = DataConfig(**tree.get("data", {}))
    except TypeError as exc:
        raise ConfigError(f"data section: {exc}") from None
    model_tree = tree.get("model", {}) or {}
    preset = tree.get("cell_preset")
    if preset:
        base = ModelConfig.from_preset(preset).to_dict()
        for k, v in model_tree.items():
            if isinstance(v, dict) and isinstance(base.get(k), dict):
                base[k].update(v)
            else:
                base[k] = v
        model_tree = base
    try:
        model = ModelConfig.from_dict(model_tree)
        train = TrainConfig.from_dict(tree.get("train", {}) or {})
    except TypeError as exc:
        raise ConfigError(f"model/train section: {exc}") from None
    return RunConfig(data=data, model=model, train=train, init=tree.get("init"), cell_preset=preset)


@dataclass
class LabelledCells:
    """Cells in a vocabulary, their descriptions and a split."""

    cells: CellData
    descriptions: pd.DataFrame
    """Per cell: ``description``, ``cell_type``, ``cell_type_id``, ``ambiguous``."""
    split: dict[str, np.ndarray]
    """``train``/``val``/``test`` positions (ambiguous cells in none)."""
    vocab: GeneVocab
    source: str
    train_types: list[str] | None = None
    """With ``types_fraction``: the types trained on; the others are held out entirely."""

    def label_texts(self, labels: list[str]) -> list[str]:
        """The training description of each cell type in ``labels`` (its first unambiguous cell's)."""
        d = self.descriptions
        names = d["cell_type"].astype(str)
        return [str(d["description"][(names == t) & ~d["ambiguous"]].iloc[0]) for t in labels]

    def dataset(self, part: str, *, max_genes: int, with_targets: bool = False, n_bins: int | None = None
                ) -> CellTextDataset:
        idx = self.split[part]
        return CellTextDataset(self.cells.subset(idx), list(self.descriptions["description"].iloc[idx]),
                               cls_id=self.vocab.cls_id, max_genes=max_genes, with_targets=with_targets,
                               n_bins=n_bins)


def load_labelled(data: DataConfig, *, vocab: GeneVocab | None = None, target_sum: float = 1e4) -> LabelledCells:
    """Read the data, map genes into ``vocab`` (default: the data's own genes), build descriptions
    and a stratified split."""
    from ..data.shards import ShardedCells, is_shard_dir, load_shard_descriptions

    if is_shard_dir(data.path):
        cells = ShardedCells(data.path)
        manifest = cells.manifest
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
        return _labelled(cells, desc, data, shard_vocab, f"shards {data.path}")
    label_map: dict = {}
    layer, use_raw = data.layer, data.use_raw
    if data.bundled:
        from ..datasets import PBMC68K_LABEL_MAP, pbmc68k_reduced

        adata, use_raw, label_map, source = pbmc68k_reduced(), True, PBMC68K_LABEL_MAP, "scanpy pbmc68k_reduced"
        layer = None
    else:
        adata, source = read_h5ad(data.path), str(data.path)
    if vocab is None:
        vocab = vocab_from_adata(adata, layer=layer, use_raw=use_raw)
    cells = prepare_cells(adata, vocab, layer=layer, use_raw=use_raw, target_sum=target_sum)
    desc = DescriptionBuilder(DescriptionConfig(cell_type_key=data.label_key, text_key=data.text_key,
                                                label_map=label_map)).build(adata.obs.iloc[cells.cell_index])
    return _labelled(cells, desc.reset_index(drop=True), data, vocab, source)


def _labelled(cells, desc: pd.DataFrame, data: DataConfig, vocab: GeneVocab, source: str) -> LabelledCells:
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


def run_training(rc: RunConfig, *, resume: bool = False) -> dict:
    """Run one training stage or fine-tuning task; save the model to ``{out_dir}/model``.

    Returns a summary: ``model`` (path), ``steps``, ``validation``, ``cells_per_s``, ``split`` sizes.
    """
    from ..models.scmmgpt import ScMMGPT
    from .loop import fit

    cfg = rc.train
    if not cfg.out_dir:
        raise ConfigError("train.out_dir is required (where checkpoints and the model go); pass --out.")
    needs_lm = cfg.stage in ("stage2", "describe", "generate")
    import torch

    # the same seed gives the same initial weights (new model, or the fresh LM side of stage 2)
    torch.manual_seed(cfg.seed)
    if rc.init:
        model = ScMMGPT.from_pretrained(rc.init, with_lm=needs_lm)
    elif cfg.stage != "stage1":
        raise ConfigError(f"{cfg.stage!r} starts from a trained model (stage 2 from the stage-1 model, "
                          "fine-tuning from a pre-trained one): pass --model DIR.")
    else:
        model = None
    vocab = model.vocab if model is not None else None
    target_sum = model.config.target_sum if model is not None else rc.model.target_sum
    lab = load_labelled(rc.data, vocab=vocab, target_sum=target_sum)
    if model is None:
        torch.manual_seed(cfg.seed)
        model = ScMMGPT.build(rc.model, lab.vocab, with_lm=needs_lm)
    mc = model.config
    n_bins = mc.cell.n_bins if mc.cell.input_style == "category" else None
    train = lab.dataset("train", max_genes=mc.max_genes, with_targets=needs_lm, n_bins=n_bins)
    val = lab.dataset("val", max_genes=mc.max_genes, with_targets=needs_lm, n_bins=n_bins) if len(lab.split["val"]) else None
    import yaml
    from accelerate import PartialState

    main = PartialState(cpu=not torch.cuda.is_available()).is_main_process
    out = Path(cfg.out_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "run_config.yaml", yaml.safe_dump(json.loads(json.dumps(rc.to_dict())), sort_keys=False))
        atomic_write_text(out / "split.json", json.dumps({
            "source": lab.source, "train_types": lab.train_types,
            **({k: lab.cells.obs_names[v].tolist() for k, v in lab.split.items()} if hasattr(lab.cells, "obs_names")
               else {"positions": {k: v.tolist() for k, v in lab.split.items()}})}))
    result = fit(model, train, cfg, val=val, measured=lab.cells.measured, resume=resume)
    if main:
        model.save_pretrained(out / "model")
    PartialState().wait_for_everyone()
    return {"model": str(out / "model"), "steps": result["steps"], "validation": result["validation"],
            "cells_per_s": round(result["cells_per_s"], 2), "split": {k: int(len(v)) for k, v in lab.split.items()},
            "train_types": lab.train_types}
