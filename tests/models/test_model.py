"""The default model (SmolLM2 + MiniLM, tiny cell encoder) on the bundled PBMCs: every objective
runs, one optimiser step lowers each loss on a fixed batch, the stage table sets what trains,
generation works, save/load round-trips, and a scGPT-format checkpoint is a first-class start."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from scmmgpt.data.labelled import DataConfig, load_labelled
from scmmgpt.errors import CheckpointError, ConfigError
from scmmgpt.models.config import ModelConfig
from scmmgpt.models.network import AlignOutput, GenOutput
from scmmgpt.models.scmmgpt import ScMMGPT
from scmmgpt.models.stages import STAGES, stage_spec


@pytest.fixture(scope="module")
def lab():
    return load_labelled(DataConfig(path=None, split=(0.9, 0.05, 0.05), seed=0))


@pytest.fixture(scope="module")
def setup(lab):
    # with the expression token, as cpu-small builds new models
    cfg = ModelConfig.from_preset("tiny", max_genes=64, cell_kwargs={"expression_token": True})
    cfg = dataclasses.replace(cfg, qformer=dataclasses.replace(cfg.qformer, n_layers=2, n_query=8, max_text_len=48),
                              lm=dataclasses.replace(cfg.lm, max_text_len=32),
                              text_to_cell=dataclasses.replace(cfg.text_to_cell, gene_chunk=4096))
    torch.manual_seed(0)
    model = ScMMGPT.build(cfg, lab.vocab)
    ds = lab.dataset("val", max_genes=64, with_targets=True)
    batch = model.collator()([ds[i] for i in range(0, len(ds), max(1, len(ds) // 8))][:8])
    return model, batch, torch.from_numpy(lab.cells.measured)


def _no_dropout(net):
    for mod in net.modules():  # deterministic comparison: no dropout (modules and attention/F.dropout rates)
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
        elif isinstance(getattr(mod, "dropout", None), float):
            mod.dropout = 0.0


def _step_lowers(model, fn, stage, lr):
    net = model.net
    net.set_trainable(stage)
    net.train()
    _no_dropout(net)
    params = [p for p in net.parameters() if p.requires_grad]
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
    net = model.net
    # 1e-4: Adam's first steps move every weight by about lr, and at 3e-4 the pretrained BERT layers
    # overshoot on this fixed batch for some initialisations (with and without the expression token)
    _step_lowers(model, lambda: net.forward_align(batch, torch.Generator().manual_seed(0)).loss_ctc, "stage1", 1e-4)
    _step_lowers(model, lambda: net.forward_align(batch, torch.Generator().manual_seed(0)).loss_ctm, "stage1", 1e-4)
    _step_lowers(model, lambda: net.forward_cdgen(batch), "describe", 1e-3)
    _step_lowers(model, lambda: net.forward_pcgen(batch, measured)[0], "generate", 1e-3)


def test_alignment_learns_nothing_from_a_batch_of_one_description(setup, lab):
    """A batch whose cells all share one description has nothing to contrast: CTC and CTM are exactly
    0, and so is every gradient (CTC's rounding noise alone, scaled up by Adam, walked a one-type
    fine-tuning's weights away); one other description in the batch brings both losses back."""
    model, _, _ = setup
    net = model.net
    net.set_trainable("annotate")
    net.train()
    net.zero_grad(set_to_none=True)
    ds = lab.dataset("val", max_genes=64)
    items = [ds[i] for i in range(6)]
    one = [{**it, "text": items[0]["text"]} for it in items]
    out = net.forward_align(model.collator()(one), torch.Generator().manual_seed(0))
    assert float(out.loss_ctm.detach()) == 0.0 and float(out.loss_ctc.detach()) == 0.0
    out.loss.backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert any(g is not None for g in grads) and all(g is None or not g.any() for g in grads)
    net.zero_grad(set_to_none=True)
    two = one[:-1] + [{**items[-1], "text": "A different description."}]
    out = net.forward_align(model.collator()(two), torch.Generator().manual_seed(0))
    assert float(out.loss_ctm.detach()) > 0.0 and float(out.loss_ctc.detach()) > 0.0


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_table_decides_what_trains_and_which_losses_run(setup, stage):
    """set_trainable unfreezes exactly the stage's groups; forward returns exactly its losses."""
    model, batch, measured = setup
    net = model.net
    spec = net.set_trainable(stage)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    for group in ("cell_encoder", "qformer", "lm_proj", "text_to_cell", "cell_decoder"):
        names = {n for n, _ in getattr(net, group).named_parameters(prefix=group)}
        assert (names <= trainable) == (group in spec.trains) and (names & trainable) == (
            names if group in spec.trains else set()), group
    assert not any(n.startswith("lm.") and "lora_" not in n for n in trainable)      # the base LM never trains
    assert any("lora_" in n for n in trainable) == ("lora" in spec.trains)
    assert ("log_temp" in trainable) == ("align_heads" in spec.trains)
    net.eval()
    with torch.no_grad():
        out = net(batch, stage, measured, torch.Generator().manual_seed(0))
    assert isinstance(out, AlignOutput if spec.align else GenOutput)
    assert set(out.parts()) == set(spec.losses)
    torch.testing.assert_close(out.loss, sum(out.parts().values()))
    assert spec.needs_lm == (not spec.align) and spec.random_batches == spec.align


def test_unknown_stage_and_missing_lm(lab):
    with pytest.raises(ConfigError, match="Unknown stage 'stage3'"):
        stage_spec("stage3")
    torch.manual_seed(0)
    aligned = ScMMGPT.build(ModelConfig.from_preset("tiny", max_genes=16), lab.vocab, with_lm=False)
    with pytest.raises(ConfigError, match="needs the text LM"):
        aligned.net.set_trainable("stage2")


def test_build_derives_its_config_and_leaves_the_callers(lab):
    cfg = ModelConfig.from_preset("tiny", max_genes=16)
    before = cfg.to_dict()
    model = ScMMGPT.build(cfg, lab.vocab, with_lm=False)
    assert cfg.to_dict() == before                                  # not mutated
    assert model.config.cell.vocab_size == len(lab.vocab) and model.config.cell.pad_id == lab.vocab.pad_id
    assert model.config.cell is model.net.cell_encoder.config       # the encoder it holds


def test_score_labels_reads_labels_as_tl_annotate_does(setup, lab):
    """Names with their CL terms are described by the term's definition under the data's own name;
    plain CL names by their definition; the scores rank cells x labels."""
    model, _, _ = setup
    ds = lab.dataset("test", max_genes=64)
    mapped = model.score_labels(ds, {"CD19+ B": "CL:0000236", "CD56+ NK": "CL:0000623"})
    assert mapped.names == ["CD19+ B", "CD56+ NK"] and mapped.scores.shape == (len(ds), 2)
    assert mapped.candidates.texts[0].startswith("CD19+ B: A lymphocyte of B lineage")
    plain = model.score_labels(ds, ["B cell"])
    assert plain.candidates.texts[0].startswith("B cell: A lymphocyte of B lineage")
    np.testing.assert_allclose(mapped.scores[:, 0], model.score_labels(ds, {"CD19+ B": "CL:0000236"}).scores[:, 0],
                               rtol=1e-5)


def test_generation_paths(setup):
    model, batch, _ = setup
    model.net.eval()
    texts = model.describe(batch, max_new_tokens=6)
    assert len(texts) == len(batch) and all(isinstance(t, str) for t in texts)
    cells = model.generate_cells(batch.texts)
    assert cells.shape == (len(batch), len(model.vocab)) and (cells >= 0).all()


def test_save_load_roundtrip_and_tamper(setup, tmp_path):
    model, batch, measured = setup
    model.net.eval()
    model.save_pretrained(tmp_path / "m")
    from safetensors.torch import load_file

    assert not any("lm.base_model" in k and "lora" not in k for k in load_file(str(tmp_path / "m/model.safetensors")))
    full = model.net.trained_state_dict(full=True)
    assert any(k.startswith("lm.") and "lora_" not in k for k in full)  # the option that stores everything
    loaded = ScMMGPT.from_pretrained(tmp_path / "m")
    assert loaded.net.cell_encoder.expression is not None
    # trained and reloaded, nothing is at initialisation any more, but each weight keeps the learning
    # rate group of its origin: the new cell encoder and cross-attention lr_new, BERT's layers lr
    assert not loaded.fresh_parameters and loaded.scratch_parameters == model.scratch_parameters
    loaded.net.set_trainable("annotate")
    old, new = loaded.param_groups(1e-4, 3e-3)
    assert (old["lr"], new["lr"]) == (1e-4, 3e-3)
    new_ids = {id(p) for p in new["params"]}
    names = {n for n, p in loaded.net.named_parameters() if id(p) in new_ids}
    assert any(n.startswith("cell_encoder.") for n in names) and any("crossattention" in n for n in names)
    assert not any(n.startswith("qformer.") and "crossattention" not in n and "query_tokens" not in n for n in names)
    torch.testing.assert_close(loaded.net.cell_encoder.expression.embedding.weight,
                               model.net.cell_encoder.expression.embedding.weight)
    with torch.no_grad():
        a = model.net.encode_cells(batch.gene_ids, batch.values, batch.padding_mask).features
        b = loaded.net.encode_cells(batch.gene_ids, batch.values, batch.padding_mask).features
        torch.testing.assert_close(a, b)
    np.testing.assert_allclose(model.generate_cells(batch.texts), loaded.generate_cells(batch.texts), atol=1e-5)
    with open(tmp_path / "m/model.safetensors", "r+b") as fh:
        fh.seek(-10, 2)
        fh.write(b"0123456789")
    with pytest.raises(CheckpointError, match="sha256"):
        ScMMGPT.from_pretrained(tmp_path / "m")


# ------------------------------------------------------------------------------- scGPT start
def _scgpt_checkpoint(path, genes, *, d=32, layers=2, input_style="binned", emb_style="continuous"):
    """A scGPT-format checkpoint directory (args.json, vocab.json, best_model.pt in the flash
    layout, with a decoder head to ignore) over ``genes``."""
    from tests.modules.test_cell_encoder import ReferenceScGPT

    path.mkdir()
    vocab = {"<pad>": 0, "<cls>": 1, "<eoc>": 2, **{g: i + 3 for i, g in enumerate(genes)}}
    torch.manual_seed(3)
    ref = ReferenceScGPT(len(vocab), d, 4, 2 * d, layers).eval()
    state = ref.scgpt_state_dict(flash=True)
    if emb_style == "category":
        state = {k: v for k, v in state.items() if not k.startswith("value_encoder.")}
        state["value_encoder.embedding.weight"] = torch.randn(52, d)
        state["value_encoder.enc_norm.weight"] = torch.ones(d)
        state["value_encoder.enc_norm.bias"] = torch.zeros(d)
    state["decoder.fc.0.weight"] = torch.randn(4, d)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "args.json").write_text(json.dumps({"embsize": d, "nheads": 4, "d_hid": 2 * d, "nlayers": layers,
                                                "pad_token": "<pad>", "pad_value": -2, "n_bins": 51,
                                                "input_style": input_style, "input_emb_style": emb_style,
                                                "dropout": 0.0}))
    torch.save(state, path / "best_model.pt")
    return path


@pytest.mark.parametrize("emb_style", ["continuous", "category"])
def test_scgpt_checkpoint_start_round_trips(lab, tmp_path, emb_style):
    """Build from a scGPT checkpoint (config.cell_checkpoint), save, reload: same embeddings; the
    pad value (-2), binning (51 bins) and gene vocabulary come from the checkpoint."""
    genes = [t for t in lab.vocab.tokens if not t.startswith("<")]
    ckpt = _scgpt_checkpoint(tmp_path / "scgpt", genes, emb_style=emb_style)
    cfg = dataclasses.replace(ModelConfig.from_preset("tiny", max_genes=32), cell_checkpoint=str(ckpt))
    cfg = dataclasses.replace(cfg, qformer=dataclasses.replace(cfg.qformer, n_layers=1, n_query=4))
    with pytest.warns(UserWarning, match="Ignored non-encoder"):
        model = ScMMGPT.build(cfg, None, with_lm=False)
    c = model.config.cell
    assert (c.d_model, c.n_layers, c.pad_value, c.n_bins) == (32, 2, -2.0, 51)
    assert c.input_style == emb_style and model.value_bins == 51
    assert model.vocab.tokens[3:] == genes
    assert not any(n.startswith("cell_encoder.") for n in model.fresh_parameters)   # pretrained, lr not lr_new
    cells = lab.cells.subset(np.arange(40))
    ds = model.dataset(cells)
    item = ds[0]
    assert item["values"][1:].max() <= 50 and np.allclose(item["values"][1:], np.round(item["values"][1:]))  # bins
    batch = model.collator(with_text=False)([ds[i] for i in range(0, 40, 9)])
    assert (batch.values[batch.padding_mask] == -2).all()                          # the checkpoint's pad value
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["cell"]["n_layers"] == 2 and saved["cell_checkpoint"] == str(ckpt)
    loaded = ScMMGPT.from_pretrained(tmp_path / "saved")
    np.testing.assert_array_equal(model.encode(ds).features.numpy(), loaded.encode(ds).features.numpy())
    assert loaded.config.cell == model.config.cell
    # reloaded, the scGPT encoder still learns at lr, the Q-Former's new cross-attention at lr_new
    assert loaded.scratch_parameters == model.scratch_parameters and not loaded.fresh_parameters
    assert not any(n.startswith("cell_encoder.") for n in loaded.scratch_parameters)
    assert any("crossattention" in n for n in loaded.scratch_parameters)


def test_scgpt_checkpoint_refuses_another_vocabulary(lab, tmp_path):
    ckpt = _scgpt_checkpoint(tmp_path / "scgpt", ["GENE_A", "GENE_B"])
    cfg = dataclasses.replace(ModelConfig.from_preset("tiny"), cell_checkpoint=str(ckpt))
    with pytest.warns(UserWarning), pytest.raises(ConfigError, match="brings its own gene vocabulary"):
        ScMMGPT.build(cfg, lab.vocab, with_lm=False)


def test_text_pooling_mean_separates_descriptions_from_the_start(setup, lab, tmp_path):
    """With the bundled MiniLM, fresh text features from [CLS] are all but identical across PBMC
    descriptions (CTC's gradient vanishes); mean pooling keeps them apart. A saved model whose config
    predates the key loads with the pooling it was trained with, ``cls``."""
    model, batch, _ = setup
    net = model.net
    assert net.config.qformer.text_pooling == "mean"
    first = [batch.texts.index(t) for t in dict.fromkeys(batch.texts)]
    assert len(first) >= 3
    ids, mask = batch.text_input_ids[first], batch.text_attention_mask[first]

    def mean_offdiag_cos(pooling):
        net.config.qformer.text_pooling = pooling
        with torch.no_grad():
            f = net.encode_text(ids, mask)
        c = f @ f.t()
        return float((c.sum() - c.diag().sum()) / (len(c) ** 2 - len(c)))

    try:
        cls_cos, mean_cos = mean_offdiag_cos("cls"), mean_offdiag_cos("mean")
    finally:
        net.config.qformer.text_pooling = "mean"
    assert cls_cos > 0.999 and mean_cos < 0.99, (cls_cos, mean_cos)
    cfg = net.config.to_dict()
    del cfg["qformer"]["text_pooling"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert ModelConfig.load(tmp_path / "config.json").qformer.text_pooling == "cls"
    with pytest.raises(ConfigError, match="text_pooling"):
        ModelConfig.from_dict({**cfg, "qformer": {**cfg["qformer"], "text_pooling": "max"}})


def test_token_dropout_leaves_genes_out_in_training_only(setup):
    """``cell.token_dropout``: in training a fresh share of each cell's gene tokens (never <cls>)
    becomes padding for the encoder and the Q-Former; in evaluation nothing changes."""
    model, batch, _ = setup
    net = model.net
    cfg = net.cell_encoder.config
    args = (batch.gene_ids, batch.values, batch.padding_mask)
    try:
        net.eval()
        with torch.no_grad():
            plain = net.encode_cells(*args).features
            cfg.token_dropout = 0.5
            torch.testing.assert_close(net.encode_cells(*args).features, plain)
            net.train()
            _no_dropout(net)
            torch.manual_seed(0)
            a = net.encode_cells(*args)
            b = net.encode_cells(*args)
        real = ~batch.padding_mask
        real[:, 0] = False
        left_out = a.padding & real
        assert not a.padding[:, 0].any() and (a.padding >= batch.padding_mask).all()
        assert 0.35 < left_out.sum() / real.sum() < 0.65                  # about half the genes
        assert not torch.equal(a.padding, b.padding)                     # a fresh draw each step
    finally:
        cfg.token_dropout = 0.0
        net.eval()


def test_cdgen_computes_only_the_description_logits(setup, monkeypatch):
    """CDGen applies the LM's vocabulary head to the hidden states that predict a real description
    token alone (a Llama: logits are the head on the last hidden state); the loss and its gradients
    equal those of ``logits_to_keep`` and of the whole sequence's logits, LoRA included."""
    import scmmgpt.models.network as network

    model, batch, _ = setup
    net = model.net
    net.eval()
    assert network._decoder_and_head(net.lm) is not None and network._keeps_logits(net.lm)
    assert net.lm.get_base_model().config._attn_implementation == "eager"      # the LM's CPU kernel
    mask = batch.lm_attention_mask.clone()
    mask[0, -5:] = 0                                                  # a shorter description: padding to leave out
    batch = dataclasses.replace(batch, lm_attention_mask=mask)
    params = [p for p in net.lm_proj.parameters()] + net.submodule_params("lora")
    assert len(params) > 2

    def loss_and_grads():
        loss = net.forward_cdgen(batch)
        return loss.detach(), torch.autograd.grad(loss, params)

    rows, g_rows = loss_and_grads()
    monkeypatch.setattr(network, "_decoder_and_head", lambda lm: None)
    kept, g_kept = loss_and_grads()
    monkeypatch.setattr(network, "_keeps_logits", lambda lm: False)
    full, g_full = loss_and_grads()
    for loss, grads in ((rows, g_rows), (kept, g_kept)):
        torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, g_full):
            assert float((a - b).norm() / b.norm().clamp(min=1e-12)) < 1e-4
    assert 0 < float(full) < 20


def test_text_to_cell_reads_hidden_states_without_the_full_vocabulary_logits(setup, monkeypatch):
    """The text-to-cell projector's states are the same with the LM's head on one position as with
    logits for every position (the path of LMs without ``logits_to_keep``), and so is PCGen's gradient."""
    import scmmgpt.models.network as network

    model, batch, measured = setup
    net = model.net
    net.eval()
    calls = []
    orig = net.lm.forward
    monkeypatch.setattr(net.lm, "forward", lambda *a, **k: calls.append(k.get("logits_to_keep")) or orig(*a, **k))
    params = list(net.text_to_cell.parameters()) + net.submodule_params("lora")

    def states_and_grads():
        states, _ = net.text_to_cell_states(batch.lm_input_ids, batch.lm_attention_mask)
        loss, _ = net.forward_pcgen(batch, measured)
        return states.detach(), torch.autograd.grad(loss, params, allow_unused=True)

    one, g_one = states_and_grads()
    assert calls and calls[-1] == 1
    monkeypatch.setattr(network, "_keeps_logits", lambda lm: False)
    every, g_every = states_and_grads()
    assert calls[-1] is None
    torch.testing.assert_close(one, every)
    for a, b in zip(g_one, g_every):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b)
