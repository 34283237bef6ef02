"""The Q-Former's text path equals the Hugging Face BERT it was initialised from."""

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer

from scmmgpt import assets
from scmmgpt.modules.qformer import QFormer


@pytest.fixture(scope="module")
def bert():
    path = assets.minilm_dir()
    return AutoConfig.from_pretrained(path), AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_text_path_matches_hf_bert(bert):
    cfg, model, tok = bert
    q = QFormer(cfg, cell_dim=32, n_query=4).eval()
    q.load_bert(model.state_dict())
    enc = tok(["A B cell is a lymphocyte.", "NK cell"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).last_hidden_state
        ours = q.forward_text(enc["input_ids"], enc["attention_mask"])
    m = enc["attention_mask"].bool()
    torch.testing.assert_close(ours[m], ref[m], rtol=1e-4, atol=1e-4)


def test_query_and_match_paths(bert):
    cfg, model, tok = bert
    q = QFormer(cfg, cell_dim=32, n_query=4, cross_attention_freq=2).eval()
    assert [layer.crossattention is not None for layer in q.layers] == [True, False] * 3
    cell = torch.randn(2, 9, 32)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 4:] = True
    out = q.forward_query(cell, pad)
    assert out.shape == (2, 4, cfg.hidden_size)
    # queries depend on the cell, and not on padded positions
    cell2 = cell.clone()
    cell2[1, 4:] = 100.0
    torch.testing.assert_close(q.forward_query(cell2, pad)[1], out[1])
    assert not torch.allclose(q.forward_query(torch.randn(2, 9, 32), pad), out)
    enc = tok(["B cell", "T cell"], padding=True, return_tensors="pt")
    match = q.forward_match(cell, pad, enc["input_ids"], enc["attention_mask"])
    assert match.shape == (2, 4, cfg.hidden_size)
