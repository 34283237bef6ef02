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


def test_match_path_with_cell_rows_equals_repeated_cells(bert):
    """Pairing texts with cells by index (keys/values projected once per cell) is the same
    computation as repeating each cell's states for every text it is paired with."""
    cfg, model, tok = bert
    q = QFormer(cfg, cell_dim=32, n_query=4, cross_attention_freq=1, n_layers=2).eval()
    cell = torch.randn(3, 7, 32)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[2, 3:] = True
    enc = tok(["B cell", "NK cell", "monocyte", "T cell", "B cell"], padding=True, return_tensors="pt")
    rows = torch.tensor([0, 2, 1, 2, 0])
    with torch.no_grad():
        by_index = q.forward_match(cell, pad, enc["input_ids"], enc["attention_mask"], rows)
        repeated = q.forward_match(cell[rows], pad[rows], enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(by_index, repeated, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_layers,freq", [(1, 1), (2, 2), (2, 1), (3, 2), (4, 1)])
def test_match_path_equals_per_pair_computation(bert, n_layers, freq):
    """The matching path (first layer once per distinct text, last layer's query rows only) gives
    BLIP-2's per-pair result, with texts and cells shared between pairs; and gradients agree."""
    cfg, model, tok = bert
    torch.manual_seed(0)
    q = QFormer(cfg, cell_dim=32, n_query=4, cross_attention_freq=freq, n_layers=n_layers).eval()
    cell = torch.randn(3, 7, 32, requires_grad=True)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[2, 3:] = True
    enc = tok(["B cell", "a natural killer cell of the blood", "monocyte"], padding=True, return_tensors="pt")
    cell_rows = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    text_rows = torch.tensor([0, 0, 1, 2, 2, 1, 0])
    fast = q.forward_match(cell, pad, enc["input_ids"], enc["attention_mask"], cell_rows, text_rows)
    ref = q.forward_match_per_pair(cell, pad, enc["input_ids"], enc["attention_mask"], cell_rows, text_rows)
    assert fast.shape == (7, 4, cfg.hidden_size)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    # not a constant: pairs of one text with different cells differ
    assert not torch.allclose(fast[0], fast[1])
    wrt = [cell, q.layers[0].attention.query.weight, q.word_embeddings.weight]
    probe = torch.randn_like(ref)        # (a sum of squares of LayerNorm outputs has ~no gradient)
    g_fast = torch.autograd.grad((fast * probe).sum(), wrt)
    g_ref = torch.autograd.grad((ref * probe).sum(), wrt)
    for a, b in zip(g_fast, g_ref):      # summed in another order: compared as a whole
        assert float((a - b).norm() / b.norm()) < 1e-5


@pytest.mark.parametrize("paired", [False, True])
def test_folded_cross_attention_equals_projected_keys_and_values(paired):
    """Cross-attention over cell states no wider than a head runs folded (every head on the raw
    states, no projected keys or values): the same outputs and gradients as projecting them, in
    float64, with padded keys and, for the matching path, queries paired with cells by index."""
    from scmmgpt.modules.qformer import Attention

    torch.manual_seed(0)
    att = Attention(64, 4, 0.0, 1e-12, kv_dim=16).double().train()
    kv = torch.randn(3, 11, 16, dtype=torch.double, requires_grad=True)
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1, 5:] = False
    rows = torch.tensor([2, 0, 2, 1, 2]) if paired else None
    x = torch.randn(5 if paired else 3, 6, 64, dtype=torch.double, requires_grad=True)
    probe = torch.randn_like(x)
    wrt = [x, kv, att.query.weight, att.key.weight, att.key.bias, att.value.weight, att.value.bias]
    assert att.folds(kv)
    folded = att(x, kv, mask, rows)
    g_folded = torch.autograd.grad((folded * probe).sum(), wrt)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Attention, "folds", lambda self, kv: False)
        projected = att(x, kv, mask, rows)
        g_projected = torch.autograd.grad((projected * probe).sum(), wrt)
    torch.testing.assert_close(folded, projected, rtol=1e-10, atol=1e-10)
    for a, b in zip(g_folded, g_projected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    # states wider than a head, or dropout on the weights in training: keys and values are projected
    assert not Attention(64, 4, 0.0, 1e-12, kv_dim=17).folds(torch.randn(1, 2, 17))
    assert not Attention(64, 4, 0.1, 1e-12, kv_dim=16).train().folds(kv)
    assert Attention(64, 4, 0.1, 1e-12, kv_dim=16).eval().folds(kv)
