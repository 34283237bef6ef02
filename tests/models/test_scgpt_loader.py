import json

import pytest
import torch

from scmmgpt.errors import CheckpointError
from scmmgpt.models.scgpt import load_scgpt
from tests.modules.test_cell_encoder import ReferenceScGPT, _inputs


def _write_ckpt(tmp_path, flash: bool, drop: str | None = None):
    torch.manual_seed(1)
    ref = ReferenceScGPT(50, 32, 4, 64, 2).eval()
    genes = {f"G{i}": i for i in range(3, 50)}
    vocab = {"<pad>": 0, "<cls>": 1, "<eoc>": 2, **genes}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "args.json").write_text(json.dumps({"embsize": 32, "nheads": 4, "d_hid": 64, "nlayers": 2,
                                                    "pad_token": "<pad>", "pad_value": -2, "n_bins": 51,
                                                    "input_emb_style": "continuous", "dropout": 0.0}))
    state = ref.scgpt_state_dict(flash=flash)
    if drop:
        state.pop(drop)
    torch.save(state, tmp_path / "best_model.pt")
    return ref


@pytest.mark.parametrize("flash", [True, False])
def test_load_both_layouts_parity(tmp_path, flash):
    ref = _write_ckpt(tmp_path, flash)
    with pytest.warns(UserWarning, match="Ignored non-encoder"):
        enc, vocab = load_scgpt(tmp_path)
    enc.eval()
    assert vocab.pad_id == 0 and enc.config.pad_value == -2
    g, v, pad = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(enc(g, v, pad)[~pad], ref(g, v, pad)[~pad], rtol=1e-4, atol=1e-5)


def test_missing_encoder_weight_fails_loudly(tmp_path):
    _write_ckpt(tmp_path, True, drop="transformer_encoder.layers.1.norm2.weight")
    with pytest.raises(CheckpointError, match="missing.*layers.1.norm2.weight"):
        load_scgpt(tmp_path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="missing"):
        load_scgpt(tmp_path)


def test_pickled_objects_refused(tmp_path):
    _write_ckpt(tmp_path, True)
    torch.save({"x": object()}, tmp_path / "best_model.pt")  # needs full unpickling
    with pytest.raises(CheckpointError, match="weights-only"):
        load_scgpt(tmp_path)
