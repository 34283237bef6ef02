import pytest
import torch

from scmmgpt.modules.text_to_cell import CellDecoder, TextToCellProjector


def test_projector_shapes_and_dummy_tokens():
    p = TextToCellProjector(48, 32, n_dummy=5, n_cell_queries=6, n_layers=1, n_heads=4)
    assert p.n_dummy == 5 and p.dummy_embeds.shape == (5, 48)
    out = p(torch.randn(3, 5, 48))
    assert out.shape == (3, 6, 32)


@pytest.mark.parametrize("pooled_dim", [0, 8])
def test_decoder_chunking_is_exact_and_gene_conditioned(pooled_dim):
    torch.manual_seed(0)
    dec = CellDecoder(32, 100, dim=16, gene_chunk=1000, n_cell_queries=6, pooled_dim=pooled_dim)
    if pooled_dim:
        torch.nn.init.normal_(dec.gene_pooled)   # starts at zero; make the pooled term count here
    feats, genes = torch.randn(2, 6, 32), torch.randn(100, 32)
    full = dec(feats, genes)
    dec.gene_chunk = 7
    torch.testing.assert_close(dec(feats, genes), full)
    assert full.shape == (2, 100)
    # a subset of genes gives the same values as the full decode
    ids = torch.tensor([3, 50, 99])
    torch.testing.assert_close(dec(feats, genes[ids], ids), full[:, ids])
    # values depend on the cell features
    assert not torch.allclose(dec(torch.randn(2, 6, 32), genes), full)
    if pooled_dim:
        # the pooled term is part of the value: switching it off changes the output
        dec.gene_pooled.data.zero_()
        assert not torch.allclose(dec(feats, genes), full)


def test_decoder_pooled_readout_needs_query_count():
    with pytest.raises(ValueError, match="n_cell_queries"):
        CellDecoder(32, 10, pooled_dim=4)


def test_projector_and_decoder_learn_a_target():
    torch.manual_seed(0)
    p = TextToCellProjector(16, 32, n_dummy=4, n_cell_queries=4, n_layers=1, n_heads=4, dropout=0.0)
    dec = CellDecoder(32, 50, dim=16)
    genes = torch.randn(50, 32)
    states = torch.randn(2, 4, 16)
    target = torch.rand(2, 50) * 3
    opt = torch.optim.Adam(list(p.parameters()) + list(dec.parameters()), lr=1e-2)
    first = None
    for _ in range(60):
        loss = ((dec(p(states), genes) - target) ** 2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first


def test_projector_masks_padding_and_generation_separates_conditions():
    """Padded key positions do not change the features; three texts with shared structure learn
    three distinct expression profiles (not their average), as text-to-cell generation needs."""
    torch.manual_seed(0)
    p = TextToCellProjector(24, 16, n_dummy=2, n_cell_queries=4, n_layers=1, n_heads=4, dropout=0.0)
    x = torch.randn(1, 5, 24)
    padded = torch.cat([x, torch.randn(1, 3, 24) * 100], dim=1)
    mask = torch.tensor([[False] * 5 + [True] * 3])
    torch.testing.assert_close(p(padded, key_padding_mask=mask), p(x))

    dec = CellDecoder(16, 40, dim=16)
    genes = torch.randn(40, 16)
    shared = torch.randn(1, 6, 24) * 5                       # a large component common to all texts
    states = shared + 0.3 * torch.randn(3, 6, 24)            # small text-specific differences
    target = torch.zeros(3, 40)
    for k in range(3):
        target[k, k * 10:(k + 1) * 10] = 3.0                 # each condition expresses its own genes
    opt = torch.optim.Adam(list(p.parameters()) + list(dec.parameters()), lr=3e-3)
    for _ in range(300):
        loss = ((dec(p(states), genes) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = dec(p(states), genes)
    # each generated profile is closest to its own target
    dist = torch.cdist(out, target)
    assert (dist.argmin(1) == torch.arange(3)).all(), dist
