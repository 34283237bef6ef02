"""Training under bf16 tracks fp32; each distinct text is encoded once without changing the
losses; CTC features gathered over processes give the loss and gradients of the whole batch."""

import json

import numpy as np
import pytest
import torch

from scmmgpt.data import CellTextDataset, DescriptionBuilder, DescriptionConfig, GeneVocab, prepare_cells
from scmmgpt.datasets import PBMC68K_LABEL_MAP, pbmc68k_reduced
from scmmgpt.errors import ConfigError
from scmmgpt.models.config import ModelConfig
from scmmgpt.models.scmmgpt import ScMMGPT
from scmmgpt.modules.losses import ctc_loss, similarity
from scmmgpt.train.config import TrainConfig
from scmmgpt.train.loop import fit


def _data(n=None):
    a = pbmc68k_reduced()
    if n:
        a = a[:n].copy()
    vocab = GeneVocab.from_genes(a.raw.var_names)
    cells = prepare_cells(a, vocab, use_raw=True, target_sum=1e4)
    texts = list(DescriptionBuilder(DescriptionConfig(label_map=PBMC68K_LABEL_MAP)).build(
        a.obs.iloc[cells.cell_index])["description"])
    return vocab, cells, texts


def _model(vocab, *, with_lm=False, cell_dropout=0.0, lm_dtype="auto"):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", max_genes=64, cell_kwargs={"dropout": cell_dropout})
    cfg.lm.dtype = lm_dtype
    cfg.qformer.n_layers, cfg.qformer.n_query, cfg.qformer.cross_attention_freq = 2, 4, 1
    cfg.qformer.max_text_len, cfg.qformer.dropout, cfg.lm.max_text_len = 48, 0.0, 32
    return ScMMGPT.build(cfg, vocab, with_lm=with_lm)


@pytest.fixture(scope="module")
def data():
    return _data()


@pytest.mark.slow  # two 30-step training runs (~2-3 min on 2 cores); bf16 inference parity stays in the default run
def test_bf16_training_tracks_fp32(data):
    vocab, cells, texts = data
    ds = CellTextDataset(cells.subset(np.arange(400)), texts[:400], cls_id=vocab.cls_id, max_genes=64)
    curves, moved = {}, {}
    init = _model(vocab).net.cell_proj.weight.detach().clone()
    for p in ("fp32", "bf16"):
        cfg = TrainConfig(stage="stage1", max_steps=30, batch_size=16, lr=1e-4, lr_new=3e-3, warmup_steps=3,
                          log_every=5, progress=False, precision=p)
        model = _model(vocab)
        out = fit(model, ds, cfg)
        assert out["precision"] == p
        curves[p] = np.array([r["loss"] for r in out["history"]])
        moved[p] = (model.net.cell_proj.weight.detach() - init).flatten()
    # same batches, same negatives: bf16's loss curve stays within 1% of fp32's (bf16 rounds to ~0.4%
    # per operation; the fp32 similarities and losses keep that from compounding) ...
    rel = np.abs(curves["bf16"] - curves["fp32"]) / curves["fp32"]
    assert rel.max() < 0.01, (curves, rel)
    # ... and the weights move the same way
    assert moved["fp32"].norm() > 0
    # (0.97 on an AVX512-BF16 CPU, 0.943 on an AMX one, whose bf16 kernels round differently)
    assert torch.nn.functional.cosine_similarity(moved["bf16"], moved["fp32"], dim=0) > 0.9


def test_old_mixed_precision_key_names_the_new_one():
    with pytest.raises(ConfigError, match=r"train.precision.*precision='fp32'"):
        TrainConfig.from_dict({"mixed_precision": "no"})


def test_distinct_texts_encoded_once_same_losses(data, monkeypatch):
    vocab, cells, texts = data
    model = _model(vocab)
    net = model.net
    ds = CellTextDataset(cells.subset(np.arange(24)), texts[:24], cls_id=vocab.cls_id, max_genes=64)
    batch = model.collator()([ds[i] for i in range(24)])
    assert len(set(batch.texts)) < 24
    seen = []
    orig = net.encode_text
    monkeypatch.setattr(net, "encode_text", lambda ids, mask, *rest: seen.append(len(ids)) or orig(ids, mask, *rest))
    net.train()
    out = net.forward_align(batch, torch.Generator().manual_seed(0), losses=("ctc",))
    assert seen == [len(set(batch.texts))]
    # reference: every row through the text tower
    cell = net.encode_cells(batch.gene_ids, batch.values, batch.padding_mask)
    text = orig(batch.text_input_ids, batch.text_attention_mask)
    same = torch.tensor([[a == b for b in batch.texts] for a in batch.texts])
    ref = ctc_loss(similarity(cell.features, text), net.temperature, same)
    torch.testing.assert_close(out.loss_ctc, ref, rtol=1e-5, atol=1e-6)
    g = torch.autograd.grad(out.loss_ctc, net.text_proj.weight)[0]
    g_ref = torch.autograd.grad(ref, net.text_proj.weight)[0]
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_pcgen_reads_each_description_once(data, monkeypatch):
    vocab, cells, texts = data
    # an fp32 LM: the dedupe is exact, but in bf16 a batch of 12 texts and a batch of the distinct
    # ones run different AMX kernels, whose roundings differ by up to ~0.07 (measured on an AMX CPU)
    model = _model(vocab, with_lm=True, lm_dtype="float32")
    net = model.net
    ds = model.dataset(cells.subset(np.arange(12)), texts[:12], with_targets=True)
    batch = model.collator()([ds[i] for i in range(12)])
    calls = []
    orig = net.text_to_cell_features
    monkeypatch.setattr(net, "text_to_cell_features", lambda ids, mask: calls.append(len(ids)) or orig(ids, mask))
    net.eval()
    with torch.no_grad():
        loss, pred = net.forward_pcgen(batch)
        ref = net.decode_cells(orig(batch.lm_input_ids, batch.lm_attention_mask))
    assert calls == [len(set(batch.texts))]
    torch.testing.assert_close(pred, ref, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------- gathered CTC
def ctc_step(start: int, n: int):
    """CTC loss of cells ``start .. start + n`` of 64 PBMCs, and its gradients on three heads."""
    vocab, cells, texts = _data(64)
    model = _model(vocab)
    net = model.net
    net.set_trainable("stage1")
    net.train()
    ds = CellTextDataset(cells, texts, cls_id=vocab.cls_id, max_genes=64)
    batch = model.collator()([ds[i] for i in range(start, start + n)])
    loss = net.forward_align(batch, losses=("ctc",)).loss_ctc
    names = ("cell_proj.weight", "text_proj.weight", "log_temp")
    params = dict(net.named_parameters())
    grads = dict(zip(names, torch.autograd.grad(loss, [params[k] for k in names])))
    return float(loss.detach()), grads


def test_gathered_ctc_equals_one_process_on_the_whole_batch(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "rank0.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "tests.train.gather_worker", out]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = json.loads(Path(out).read_text())["losses"]
    grads = torch.load(out + ".grads")
    full_loss, full_grads = ctc_step(0, 16)
    # each process scores its 8 cells against all 16 texts (and its texts against all cells): the
    # mean of the two losses is the loss of the 16-cell batch, and DDP's averaged gradients its gradients
    assert np.mean(losses) == pytest.approx(full_loss, rel=1e-4)
    assert losses[0] != pytest.approx(losses[1], rel=1e-3)
    for k, g in full_grads.items():
        torch.testing.assert_close(grads[k], g, rtol=1e-3, atol=1e-6)


def test_repeated_texts_are_encoded_and_generated_once(data, monkeypatch):
    vocab, _, _ = data
    model = _model(vocab, with_lm=True)
    texts = ["a B cell", "a natural killer cell", "a B cell", "a B cell"]
    feats = model.encode_texts(texts, precision="fp32")
    torch.testing.assert_close(feats, model.encode_texts(["a B cell", "a natural killer cell"],
                                                         precision="fp32")[[0, 1, 0, 0]])
    rows = []
    orig = model.net.generate_cells
    monkeypatch.setattr(model.net, "generate_cells", lambda ids, mask: rows.append(len(ids)) or orig(ids, mask))
    cells = model.generate_cells(texts, precision="fp32")
    assert rows == [2] and cells.shape[0] == 4
    np.testing.assert_array_equal(cells[0], cells[2])
    assert not np.array_equal(cells[0], cells[1])
