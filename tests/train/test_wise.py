"""WiSE-FT: a task fine-tuning that ends on the line between the weights it started from and the
weights plain fine-tuning reaches (Wortsman et al., CVPR 2022)."""

import json

import numpy as np
import pytest
import torch

from scmmgpt.errors import ConfigError
from scmmgpt.train.config import TrainConfig
from scmmgpt.train.loop import fit
from scmmgpt.train.wise import interpolate, trained_snapshot
from tests.train.test_loop import _model, _subset, data  # noqa: F401  (data is a fixture)


def test_interpolate_moves_named_parameters_only():
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    start = {"0.weight": torch.zeros(2, 3)}
    before_w0 = net[0].weight.detach().clone()
    before_rest = {k: v.detach().clone() for k, v in net.state_dict().items() if k != "0.weight"}
    interpolate(net, start, 0.25)
    assert torch.allclose(net[0].weight, 0.25 * before_w0)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before_rest.items())
    interpolate(net, start, 0.0)
    assert torch.equal(net[0].weight, torch.zeros(2, 3))
    with pytest.raises(ConfigError, match="lacks"):
        interpolate(net, {"2.weight": torch.zeros(1)}, 0.5)
    with pytest.raises(ConfigError, match="shape"):
        interpolate(net, {"0.weight": torch.zeros(3, 2)}, 0.5)


def test_wise_alpha_is_checked():
    with pytest.raises(ConfigError, match="wise_alpha"):
        TrainConfig(stage="annotate", wise_alpha=0.0)
    with pytest.raises(ConfigError, match="trains new weights from initialisation"):
        TrainConfig(stage="stage1", wise_alpha=0.5)
    assert TrainConfig(stage="annotate", wise_alpha=0.5).wise_alpha == 0.5


def test_fine_tuning_with_wise_alpha_ends_between_start_and_tuned(data, tmp_path):  # noqa: F811
    """The same seeded annotate fine-tuning twice, deterministic: with wise_alpha=0.5 the trained
    parameters end exactly halfway between the start and the plain run's; the log records the interpolation and a validation of the interpolated model."""
    vocab, cells, texts, types = data
    order = np.random.default_rng(1).permutation(len(texts))
    train, val = _subset(cells, texts, order[:300], vocab), _subset(cells, texts, order[300:400], vocab)
    base = _model(vocab)
    fit(base, train, TrainConfig(stage="stage1", max_steps=10, batch_size=16, lr=1e-4, lr_new=3e-3, warmup_steps=2,
                                 progress=False, deterministic=True))
    base.save_pretrained(tmp_path / "start")
    start = trained_snapshot(base.net, "annotate")
    assert len(start) > 10

    def tune(alpha, out_dir=None):
        model = type(base).from_pretrained(tmp_path / "start", with_lm=False)
        cfg = TrainConfig(stage="annotate", max_steps=6, batch_size=16, lr=1e-3, lr_new=1e-2, warmup_steps=1,
                          progress=False, deterministic=True, wise_alpha=alpha, out_dir=out_dir, log_every=3)
        out = fit(model, train, cfg, val=val, val_labels=types[order[300:400]])
        return model, out

    plain, _ = tune(1.0)
    wise, out = tune(0.5, str(tmp_path / "wise"))
    params = dict(wise.net.named_parameters())
    tuned = dict(plain.net.named_parameters())
    moved = 0
    for name, s in start.items():
        assert torch.allclose(params[name], 0.5 * (s + tuned[name]), atol=1e-6), name
        moved += not torch.allclose(tuned[name], s)
    assert moved > len(start) // 2                     # fine-tuning moved most of what it trains
    last = out["history"][-1]
    assert last["wise_alpha"] == 0.5 and "val_acc1" in last and out["validation"] is not None
    logged = [json.loads(line) for line in (tmp_path / "wise" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["wise_alpha"] == 0.5
