"""``train.losses``: a stage computes only the losses it is told to, and the weights that serve only a
left-out loss stay as they were."""

import dataclasses

import numpy as np
import pytest
import torch

from scmmgpt.errors import ConfigError
from scmmgpt.models.stages import STAGES, stage_spec
from scmmgpt.train.config import TrainConfig
from scmmgpt.train.loop import fit
from tests.train.test_loop import _model, _subset, data  # noqa: F401  (data is a fixture)


def test_one_losses_list_serves_every_stage():
    """The list filters each stage's own losses: one run configuration trains stage 1 without CTM
    and stage 2 as it is; a list that leaves a stage nothing, or names an unknown loss, is refused."""
    every = ["ctc", "cdgen", "pcgen"]
    assert stage_spec("stage1", every).losses == ("ctc",)
    assert stage_spec("annotate", ["ctm", "ctc"]) is STAGES["annotate"]          # the stage's own order
    assert stage_spec("stage2", every) is STAGES["stage2"]
    assert stage_spec("generate", every).losses == ("pcgen",)
    assert stage_spec("annotate", None) is STAGES["annotate"]
    with pytest.raises(ConfigError, match="nothing to compute"):
        TrainConfig(stage="stage2", losses=["ctc"])
    for bad in ([], "ctc", ["ctc", "typo"]):
        with pytest.raises(ConfigError, match="train.losses"):
            TrainConfig(stage="annotate", losses=bad)
    assert TrainConfig(stage="stage1", losses=every).losses == every


def test_ctc_only_fine_tuning_leaves_the_matching_head(data, tmp_path):  # noqa: F811
    """An annotate run with ``losses=[ctc]``: CTM is reported as 0 at every step, its head keeps its
    weights (frozen, so DDP sees no weight without a gradient), and the contrastive side learns."""
    vocab, cells, texts, types = data
    order = np.random.default_rng(0).permutation(len(texts))
    train = _subset(cells, texts, order[:300], vocab)
    model = _model(vocab)
    head = {k: v.detach().clone() for k, v in model.net.ctm_head.state_dict().items()}
    proj = model.net.cell_proj.weight.detach().clone()
    out = fit(model, train, TrainConfig(stage="annotate", losses=["ctc"], max_steps=6, batch_size=16, lr=1e-3,
                                        warmup_steps=1, log_every=1, progress=False, deterministic=True))
    assert len(out["history"]) == 6
    assert all(r["ctm"] == 0.0 and r["ctc"] > 0 for r in out["history"])
    assert all(torch.equal(model.net.ctm_head.state_dict()[k], v) for k, v in head.items())
    assert not torch.allclose(model.net.cell_proj.weight, proj)
    assert not any(p.requires_grad for p in model.net.ctm_head.parameters())
    # the model knows its matching head never trained, and says so instead of re-ranking with it
    assert model.config.trained_losses == ["ctc"]
    test = _subset(cells, texts, order[300:340], vocab)
    labels = sorted(set(types))
    assert model.score_labels(test, labels).scores.shape == (40, len(labels))
    with pytest.raises(ConfigError, match="never trained"):
        model.score_labels(test, labels, alpha=0.5)
    # the same run with both losses does train the head
    both = _model(vocab)
    fit(both, train, TrainConfig(stage="annotate", max_steps=6, batch_size=16, lr=1e-3, warmup_steps=1,
                                 progress=False, deterministic=True))
    assert not torch.allclose(both.net.ctm_head.weight, head["weight"])
    assert both.config.trained_losses == ["ctc", "ctm"]
    assert both.score_labels(test, labels, alpha=0.5).scores.shape == (40, len(labels))
    # a model saved before the record existed (None) holds a trained head: a CTC-only fine-tuning of
    # it must not lose that, and re-ranking stays allowed
    both.net.config = dataclasses.replace(both.config, trained_losses=None)
    both.save_pretrained(tmp_path / "old")
    old = type(both).from_pretrained(tmp_path / "old", with_lm=False)
    fit(old, train, TrainConfig(stage="annotate", losses=["ctc"], max_steps=2, batch_size=16, lr=1e-3,
                                warmup_steps=1, progress=False, deterministic=True))
    assert old.config.trained_losses == ["ctc", "ctm"]
    assert old.score_labels(test, labels, alpha=0.5).scores.shape == (40, len(labels))
