"""The pipeline demo behind ``make demo``: data -> descriptions -> model -> every objective."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..data import CellTextDataset, DescriptionBuilder, DescriptionConfig, prepare_cells, read_h5ad, stratified_split
from ..data.pipeline import vocab_from_adata
from ..models.config import ModelConfig
from ..models.scmmgpt import ScMMGPT
from ..utils.io import atomic_write_text

__all__ = ["run_pipeline_demo"]


def run_pipeline_demo(*, data: str | None = None, label_key: str = "cell_type", layer: str | None = None,
                      use_raw: bool = False, out: str = "demo_report", cell_preset: str = "small",
                      seed: int = 0) -> dict:
    """Run the data pipeline and one pass of CTC, CTM, CDGen and PCGen on held-out cells.

    Writes ``{out}/pipeline.json`` and returns the same report.
    """
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    if data is None:
        from ..datasets import PBMC68K_LABEL_MAP, pbmc68k_reduced

        adata, use_raw, label_map, source = pbmc68k_reduced(), True, PBMC68K_LABEL_MAP, "scanpy pbmc68k_reduced"
    else:
        adata, label_map, source = read_h5ad(data), {}, str(data)
    vocab = vocab_from_adata(adata, layer=layer, use_raw=use_raw)
    config = ModelConfig.from_preset(cell_preset, max_genes=2048)
    cells = prepare_cells(adata, vocab, layer=layer, use_raw=use_raw, target_sum=config.target_sum)
    desc = DescriptionBuilder(DescriptionConfig(cell_type_key=label_key, label_map=label_map)).build(
        adata.obs.iloc[cells.cell_index])
    split = stratified_split(desc["cell_type"].to_numpy(), (0.8, 0.1, 0.1), seed=seed,
                             exclude=desc["ambiguous"].to_numpy())
    t_data = time.perf_counter() - t0
    model = ScMMGPT.build(config, vocab)
    model.eval()
    test = split["test"]
    ds = CellTextDataset(cells, list(desc["description"]), cls_id=vocab.cls_id, max_genes=config.max_genes,
                         with_targets=True)
    batch = model.collator()([ds[int(i)] for i in test[:12]])
    with torch.no_grad():
        align = model.forward_align(batch, torch.Generator().manual_seed(seed))
        gen = model.forward_gen(batch, torch.from_numpy(cells.measured))
    report = {
        "data": source,
        "cells": int(adata.n_obs),
        "value_kind": cells.value_kind,
        "gene_match": cells.gene_match.summary(),
        "cell_types": int(desc.loc[~desc["ambiguous"], "cell_type"].nunique()),
        "split": {k: int(len(v)) for k, v in split.items()},
        "example_description": str(desc["description"].iloc[int(test[0])]),
        "model": {"cell_encoder": cell_preset, "lm": config.lm.name, "bert": config.qformer.bert,
                  "parameters": int(sum(p.numel() for p in model.parameters()))},
        "untrained_losses_on_test_cells": {"ctc": float(align.loss_ctc), "ctm": float(align.loss_ctm),
                                            "cdgen": float(gen.loss_cdgen), "pcgen": float(gen.loss_pcgen)},
        "seconds": {"data": round(t_data, 1), "total": round(time.perf_counter() - t0, 1)},
    }
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path / "pipeline.json", json.dumps(report, indent=2))
    report["report"] = str(path / "pipeline.json")
    return report
