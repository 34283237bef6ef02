import torch
import torch.nn.functional as F

from scmmgpt.modules.losses import cdgen_loss, ctc_loss, ctm_loss, pcgen_loss, sample_hard_negatives, similarity


def test_ctc_symmetric_and_minimised_by_alignment():
    torch.manual_seed(0)
    t = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    aligned = t[:, None, :].expand(6, 4, 16)
    shuffled = t[torch.randperm(6)][:, None, :].expand(6, 4, 16)
    good = ctc_loss(similarity(aligned, t), 0.07)
    bad = ctc_loss(similarity(shuffled, t), 0.07)
    assert good < 0.1 < bad
    # eq. 2 written out: the mean of the cell->text and text->cell cross-entropies, so swapping the
    # roles of cells and texts (transposing an asymmetric sim) leaves it unchanged
    sim = torch.randn(5, 5)
    assert not torch.allclose(sim, sim.t())
    target = torch.arange(5)
    by_hand = 0.5 * (F.cross_entropy(sim / 0.1, target) + F.cross_entropy(sim.t() / 0.1, target))
    torch.testing.assert_close(ctc_loss(sim, 0.1), by_hand)
    torch.testing.assert_close(ctc_loss(sim.t(), 0.1), by_hand)
    one_way = F.cross_entropy(sim / 0.1, target)
    assert not torch.isclose(ctc_loss(sim, 0.1), one_way)                # both directions count


def test_ctc_same_description_not_negative():
    sim = torch.tensor([[0.5, 1.0, -1.0], [1.0, 0.5, -1.0], [-1.0, -1.0, 1.0]])
    same = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    plain = ctc_loss(sim, 0.1)
    multi = ctc_loss(sim, 0.1, same)
    assert multi < 0.6 * plain  # identical texts are treated as positives, not penalised


def test_hard_negatives_exclude_same_text():
    sim = torch.randn(6, 6)
    same = torch.zeros(6, 6, dtype=torch.bool)
    same[:3, :3] = True
    same[3:, 3:] = True
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        nt, nc = sample_hard_negatives(sim, same, g)
        assert not same[torch.arange(6), nt].any()
        assert not same[nc, torch.arange(6)].any()
    nt, nc = sample_hard_negatives(sim, torch.ones(6, 6, dtype=torch.bool))
    assert (nt == -1).all() and (nc == -1).all()


def test_ctm_and_cdgen_and_pcgen():
    logits = torch.tensor([[0.0, 5.0], [5.0, 0.0]])
    assert ctm_loss(logits, torch.tensor([1, 0])) < 0.01
    # cdgen: only labelled positions count, shifted by one
    V = 10
    lg = torch.full((1, 4, V), -10.0)
    lg[0, 1, 7] = 10.0  # position 1 predicts token at position 2
    labels = torch.tensor([[-100, -100, 7, -100]])
    assert cdgen_loss(lg, labels) < 1e-3
    pred = torch.tensor([[1.0, 2.0, 3.0]])
    target = torch.tensor([[1.0, 0.0, 3.0]])
    assert pcgen_loss(pred, target) == torch.tensor(4.0 / 3)
    assert pcgen_loss(pred, target, torch.tensor([True, False, True])) == 0.0


def test_cdgen_shifted_equals_unshifted():
    """Logits already aligned with their labels (the prefix positions never computed) give the same
    loss as the full sequence's logits shifted by one."""
    g = torch.Generator().manual_seed(0)
    B, P, T, V = 3, 4, 5, 11
    full = torch.randn(B, P + T, V, generator=g)
    text = torch.randint(0, V, (B, T), generator=g)
    text[1, 3:] = -100                                  # padding
    labels = torch.cat([torch.full((B, P), -100), text], 1)
    torch.testing.assert_close(cdgen_loss(full[:, P - 1:P + T - 1], text, shifted=True), cdgen_loss(full, labels))
    # and it is the mean negative log-likelihood of the labelled tokens
    logp = full[:, P - 1:P + T - 1].log_softmax(-1)
    keep = text != -100
    torch.testing.assert_close(cdgen_loss(full, labels), -logp[keep].gather(1, text[keep][:, None]).mean())
