"""The cell-sentence (C2S-style) baseline: sentences, the rank -> expression map, and real LoRA
fine-tuning of the bundled SmolLM2 on both directions."""

import numpy as np
import pytest
import scipy.sparse as sp

from scmmgpt.baselines import CellSentenceConfig, CellSentenceLM, RankToExpression, cell_sentences
from scmmgpt.models.config import LMConfig

GENES = ["CD3E", "CD14", "LYZ", "MS4A1", "NKG7", "GNLY"]


def test_sentences_rank_genes_by_value_with_ties_by_column():
    x = sp.csr_matrix(np.array([[0, 2.0, 5.0, 0, 2.0, 1.0], [3.0, 0, 0, 0, 0, 0]], dtype=np.float32))
    assert cell_sentences(x, GENES, 3) == ["LYZ CD14 NKG7", "CD3E"]
    assert cell_sentences(x, GENES, 10)[0] == "LYZ CD14 NKG7 GNLY"


def test_rank_to_expression_recovers_a_log_rank_law_and_parses_generated_sentences():
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(50):                    # values 4 - 1.5 log10(rank) on random genes
        v = np.zeros(6, np.float32)
        v[rng.permutation(6)] = 4 - 1.5 * np.log10(np.arange(1, 7))
        rows.append(v)
    r2e = RankToExpression.fit(sp.csr_matrix(np.array(rows)), 6)
    assert r2e.slope == pytest.approx(-1.5, abs=1e-4) and r2e.intercept == pytest.approx(4, abs=1e-4)
    prof, valid = r2e.profiles(["lyz CD14, LYZ notagene NKG7.", ""], GENES)
    # LYZ rank 1, CD14 rank 2, the repeat and the unknown word are skipped, NKG7 rank 3
    np.testing.assert_allclose(prof[0], [0, 4 - 1.5 * np.log10(2), 4, 0, 4 - 1.5 * np.log10(3), 0], rtol=1e-5)
    assert valid == pytest.approx(3 / 5) and not prof[1].any()


def test_lora_fine_tuning_learns_both_directions():
    sents = ["LYZ CD14 S100A8", "CD3E IL7R CCR7"]
    descs = ["a classical monocyte", "a naive T cell"]
    m = CellSentenceLM(LMConfig(max_text_len=16), CellSentenceConfig(n_genes=3, steps=8, batch_size=2, lr=1e-2,
                                                                     warmup_steps=1, seed=0))
    before = [p.detach().clone() for p in m.lm.parameters() if p.requires_grad]
    losses = m.fit(sents, descs)
    assert len(losses) == 8 and losses[-1] < 0.5 * losses[0]
    after = [p for p in m.lm.parameters() if p.requires_grad]
    assert any(not np.allclose(a.detach().numpy(), b.numpy()) for a, b in zip(after, before))
    # memorised: each description is closer (word overlap) to its own training text than to the other
    from scmmgpt.eval.text import tokenize_words

    said = [set(tokenize_words(d)) for d in m.describe(sents, max_new_tokens=8)]
    truth = [set(tokenize_words(d)) for d in descs]
    for i, words in enumerate(said):
        assert len(words & truth[i]) > len(words & truth[1 - i]), (said, truth)
    s1 = m.generate_sentences(descs, seed=1, max_new_tokens=12)
    assert s1 == m.generate_sentences(descs, seed=1, max_new_tokens=12)            # seeded sampling
    assert "LYZ" in s1[0] and "CD3E" in s1[1]
    with pytest.raises(ValueError, match="one description per cell sentence"):
        m.fit(sents, descs[:1])
