"""One rank of the 2-process ``accelerate launch --cpu`` test (tests/train/test_ddp.py).

Trains a tiny model for a few stage-1 steps under DDP (gloo) and writes, per rank, a digest of the
trainable weights before and after, so the test can check the ranks started and ended in sync.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from scmmgpt.data import CellTextDataset, DescriptionBuilder, DescriptionConfig, GeneVocab, prepare_cells
from scmmgpt.datasets import PBMC68K_LABEL_MAP, pbmc68k_reduced
from scmmgpt.models.config import ModelConfig
from scmmgpt.models.scmmgpt import ScMMGPT
from scmmgpt.train.config import TrainConfig
from scmmgpt.train.loop import fit


def digest(model) -> str:
    h = hashlib.sha256()
    for n, p in sorted(model.net.named_parameters()):
        if p.requires_grad:
            h.update(n.encode())
            h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def main(out: str) -> None:
    state = PartialState(cpu=not torch.cuda.is_available())
    a = pbmc68k_reduced()
    a = a[:64].copy()
    vocab = GeneVocab.from_genes(a.raw.var_names)
    cells = prepare_cells(a, vocab, use_raw=True, target_sum=1e4)
    texts = list(DescriptionBuilder(DescriptionConfig(label_map=PBMC68K_LABEL_MAP)).build(
        a.obs.iloc[cells.cell_index])["description"])
    torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    cfg = ModelConfig.from_preset("tiny", max_genes=32)
    cfg.qformer.n_layers, cfg.qformer.n_query, cfg.qformer.max_text_len, cfg.qformer.dropout = 1, 2, 32, 0.0
    model = ScMMGPT.build(cfg, vocab, with_lm=False)
    model.net.set_trainable("stage1")
    before = digest(model)
    ds = CellTextDataset(cells, texts, cls_id=vocab.cls_id, max_genes=32)
    result = fit(model, ds, TrainConfig(stage="stage1", max_steps=4, batch_size=4, lr=1e-4, lr_new=1e-3,
                                        warmup_steps=1, log_every=1, out_dir=out, progress=False, seed=0))
    Path(out, f"rank{state.process_index}.json").write_text(json.dumps({
        "rank": state.process_index, "world": state.num_processes, "before": before, "after": digest(model),
        "steps": result["steps"], "loss": [r["loss"] for r in result["history"]]}))


if __name__ == "__main__":
    main(sys.argv[1])
