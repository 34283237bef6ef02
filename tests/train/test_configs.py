"""Every packaged run configuration loads, builds the model it describes, and that model takes a
training step of its stage on real cells."""

from importlib import resources
from pathlib import Path

import pytest
import torch

from scmmgpt.data.labelled import DataConfig, load_labelled
from scmmgpt.models.scmmgpt import ScMMGPT
from scmmgpt.models.stages import STAGES
from scmmgpt.train.run import load_run_config

PACKAGED = sorted(p.stem for p in Path(str(resources.files("scmmgpt") / "configs")).glob("*.yaml"))


def test_the_packaged_configs_are_the_documented_ones():
    assert PACKAGED == ["cpu-small", "finetune", "stage1", "stage2"]


@pytest.fixture(scope="module")
def lab():
    return load_labelled(DataConfig(path=None, split=(0.9, 0.05, 0.05)))


@pytest.mark.parametrize("name", PACKAGED)
def test_packaged_config_builds_and_steps(name, lab):
    rc = load_run_config(name, ["model.max_genes=32"])
    spec = STAGES[rc.train.stage]
    expected = {"stage1": ("stage1", 12, 512), "stage2": ("stage2", None, None), "finetune": ("annotate", None, None),
                "cpu-small": ("stage1", 2, 32)}[name]
    assert rc.train.stage == expected[0]
    if expected[1] is not None:                        # configs that size a new model
        assert (rc.model.cell.n_layers, rc.model.cell.d_model) == expected[1:]
    # the paper's optimiser (Table 7) where the config is the paper's
    if name != "cpu-small":
        assert rc.train.lr == 1e-5 and rc.train.weight_decay == 0.001
    torch.manual_seed(0)
    model = ScMMGPT.build(rc.model, lab.vocab, with_lm=spec.needs_lm)
    assert model.config.cell.n_layers == rc.model.cell.n_layers
    ds = lab.dataset("val", max_genes=32, with_targets=spec.needs_lm, n_bins=model.value_bins)
    batch = model.collator()([ds[i] for i in range(4)])
    net = model.net
    net.set_trainable(spec.name)
    net.train()
    out = net(batch, spec, torch.from_numpy(lab.cells.measured), torch.Generator().manual_seed(0))
    out.loss.backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert torch.isfinite(out.loss) and grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_numbers_without_a_dot_in_overrides_and_files_are_floats(tmp_path):
    """YAML 1.1 reads ``1e-3`` as a string; the run configuration reads it as the number it spells."""
    f = tmp_path / "run.yaml"
    f.write_text("train:\n  lr: 2e-5\n  lr_new: 3E-3\n  max_steps: 10\n")
    rc = load_run_config(f, ["train.weight_decay=1e-2"])
    assert (rc.train.lr, rc.train.lr_new, rc.train.weight_decay, rc.train.max_steps) == (2e-5, 3e-3, 1e-2, 10)
    assert isinstance(rc.train.lr, float)


def test_a_preset_is_compared_with_a_saved_model_by_its_shapes_only():
    """``--model OLD --config cpu-small``: a model saved before the tiny preset set attn_dropout=0
    (it has None) is the preset's size and trains on; a model of another size is refused by name."""
    import dataclasses

    from scmmgpt.errors import ConfigError
    from scmmgpt.models.config import ModelConfig
    from scmmgpt.train.run import _check_init_keys

    rc = load_run_config("cpu-small")
    rc.init = "old-model"
    old = ModelConfig.from_preset("tiny", max_genes=256)
    old.cell = dataclasses.replace(old.cell, attn_dropout=None)
    old.qformer = dataclasses.replace(old.qformer, **rc.model.to_dict()["qformer"])
    old.lm = dataclasses.replace(old.lm, max_text_len=rc.model.lm.max_text_len)
    # nor does it have an input panel or an expression token: both are read by new models only
    assert old.n_input_genes is None and rc.model.n_input_genes == 2000
    assert not old.cell.expression_token and rc.model.cell.expression_token
    _check_init_keys(rc, old)
    bigger = dataclasses.replace(old, cell=dataclasses.replace(old.cell, d_model=64))
    with pytest.raises(ConfigError, match=r"model.cell.d_model=32 \(the model has 64\)"):
        _check_init_keys(rc, bigger)
