"""The default model (SmolLM2 + MiniLM, small cell encoder) on real cells: every objective runs,
one optimiser step lowers each loss on a fixed batch, generation works, save/load round-trips."""

import numpy as np
import pytest
import torch

from scmmgpt.data import CellTextDataset, DescriptionBuilder, GeneVocab, prepare_cells, stratified_split
from scmmgpt.errors import CheckpointError
from scmmgpt.models.config import ModelConfig
from scmmgpt.models.scmmgpt import ScMMGPT


@pytest.fixture(scope="module")
def setup(pbmc3k):
    torch.manual_seed(0)
    a = pbmc3k
    split = stratified_split(a.obs["cell_type"].astype(str).to_numpy(), (0.96, 0.02, 0.02), seed=0)
    sub = a[np.concatenate([split["val"], split["test"]])]
    vocab = GeneVocab.from_genes(a.var_names)
    cfg = ModelConfig.from_preset("tiny", max_genes=64)
    cfg.qformer.n_layers = 2
    cfg.qformer.n_query = 8
    cfg.text_to_cell.gene_chunk = 4096
    model = ScMMGPT.build(cfg, vocab)
    cells = prepare_cells(sub, vocab, target_sum=cfg.target_sum)
    desc = DescriptionBuilder().build(sub.obs.iloc[cells.cell_index])
    ds = CellTextDataset(cells, list(desc["description"]), cls_id=vocab.cls_id, max_genes=64, with_targets=True)
    batch = model.collator()([ds[i] for i in range(0, len(ds), max(1, len(ds) // 8))][:8])
    return model, batch, torch.from_numpy(cells.measured)


def _step_lowers(model, fn, stage, lr):
    model.set_trainable(stage)
    model.train()
    for mod in model.modules():  # deterministic comparison: no dropout (modules and attention/F.dropout rates)
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
        elif isinstance(getattr(mod, "dropout", None), float):
            mod.dropout = 0.0
    params = [p for p in model.parameters() if p.requires_grad]
    assert params
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    before = fn().detach()
    for _ in range(3):
        opt.zero_grad()
        fn().backward()
        opt.step()
    after = fn().detach()
    assert after < before, (before, after)


def test_each_loss_decreases(setup):
    model, batch, measured = setup
    _step_lowers(model, lambda: model.forward_align(batch, torch.Generator().manual_seed(0)).loss_ctc, "stage1", 1e-3)
    _step_lowers(model, lambda: model.forward_align(batch, torch.Generator().manual_seed(0)).loss_ctm, "stage1", 1e-4)
    _step_lowers(model, lambda: model.forward_cdgen(batch), "describe", 1e-3)
    _step_lowers(model, lambda: model.forward_pcgen(batch, measured)[0], "generate", 1e-3)


def test_trainable_policy(setup):
    model, _, _ = setup
    model.set_trainable("stage2")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in names) and any(n.startswith("text_to_cell") for n in names)
    assert not any(n.startswith(("cell_encoder", "qformer")) for n in names)
    assert not any(n.startswith("lm.") and "lora_" not in n for n in names)
    model.set_trainable("stage1")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("cell_encoder") for n in names) and not any(n.startswith("lm.") for n in names)


def test_generation_paths(setup):
    model, batch, _ = setup
    model.eval()
    texts = model.generate_text(batch, max_new_tokens=6)
    assert len(texts) == len(batch) and all(isinstance(t, str) for t in texts)
    cells = model.generate_cells(batch.lm_input_ids, batch.lm_attention_mask)
    assert cells.shape == (len(batch), len(model.vocab)) and (cells >= 0).all()


def test_save_load_roundtrip_and_tamper(setup, tmp_path):
    model, batch, measured = setup
    model.eval()
    model.save_pretrained(tmp_path / "m")
    assert not any("lm.base_model" in k and "lora" not in k for k in
                   __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(tmp_path / "m/model.safetensors")))
    full = model.trained_state_dict(full=True)
    assert any(k.startswith("lm.") and "lora_" not in k for k in full)  # the option that stores everything
    loaded = ScMMGPT.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        a = model.encode_cells(batch.gene_ids, batch.values, batch.padding_mask).features
        b = loaded.encode_cells(batch.gene_ids, batch.values, batch.padding_mask).features
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(model.generate_cells(batch.lm_input_ids, batch.lm_attention_mask),
                                   loaded.generate_cells(batch.lm_input_ids, batch.lm_attention_mask))
    with open(tmp_path / "m/model.safetensors", "r+b") as fh:
        fh.seek(-10, 2)
        fh.write(b"0123456789")
    with pytest.raises(CheckpointError, match="sha256"):
        ScMMGPT.from_pretrained(tmp_path / "m")
