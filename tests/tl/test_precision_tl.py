"""bf16 and fp32 give the same answers on a trained model (issue: precision is a first-class
setting): embeddings per cell, annotation labels, and the stored choice."""

import numpy as np
import pytest

from scmmgpt import tl


@pytest.fixture(scope="module")
def both(trained):
    cells = trained.test.copy()
    out = {}
    for p in ("fp32", "bf16"):
        a = cells.copy()
        tl.embed(a, trained.model, precision=p)
        tl.annotate(a, trained.model, labels_key="cell_type", precision=p)
        out[p] = a
    return out


def test_bf16_embeddings_match_fp32(both):
    for key in ("X_scmmgpt", "X_scmmgpt_aligned"):
        a, b = both["fp32"].obsm[key], both["bf16"].obsm[key]
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cos.min() >= 0.999, (key, cos.min())
    assert both["bf16"].uns["scmmgpt"]["embed"]["precision"] == "bf16"
    assert both["fp32"].uns["scmmgpt"]["embed"]["precision"] == "fp32"


def test_bf16_annotation_matches_fp32(both):
    a = both["fp32"].obs["scmmgpt_label"].astype(str).to_numpy()
    b = both["bf16"].obs["scmmgpt_label"].astype(str).to_numpy()
    assert (a == b).mean() >= 0.99
    s32, s16 = both["fp32"].obs["scmmgpt_label_score"], both["bf16"].obs["scmmgpt_label_score"]
    assert np.abs(s32 - s16).max() < 0.01
    assert both["bf16"].uns["scmmgpt_label"]["params"]["precision"] == "bf16"


def test_auto_is_recorded_as_what_ran(trained, test_cells):
    tl.embed(test_cells, trained.model)
    assert test_cells.uns["scmmgpt"]["embed"]["precision"] == trained.model.precision("auto").name
