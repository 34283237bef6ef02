"""The shipped pre-trained model (issue 18, item 3): it loads by name with no training and no
network, knows every gene of its corpus, and annotates real held-out PBMCs with the accuracy its
model card states."""

import json

import numpy as np
import pytest

import scmmgpt
from scmmgpt.models.hub import shipped_model_dir
from tests.conftest import PBMC3K


@pytest.fixture(scope="module")
def shipped():
    return scmmgpt.load_model("pbmc-small", with_lm=False)


def _held_out_pbmc3k():
    import anndata as ad

    held = set(json.loads((shipped_model_dir("pbmc-small") / "held_out.json").read_text()))
    a = ad.read_h5ad(PBMC3K)
    return a, np.array([f"pbmc3k_clustifyr:{n}" in held for n in a.obs_names])


def test_shipped_model_is_small_broad_and_carded(shipped):
    folder = shipped_model_dir("pbmc-small")
    size = sum(f.stat().st_size for f in folder.iterdir())
    assert size <= 50 * 2**20, size
    assert len(shipped.vocab) > 30_000                        # every gene of the corpus, not 765
    card = (folder / "README.md").read_text()
    for part in ("## Data", "## Training", "python benchmarks/pbmc_small.py", "## Figures", "## Limits"):
        assert part in card, part
    figures = json.loads((folder / "figures.json").read_text())
    assert f"Acc@1 {100 * figures['asset_pbmc3k']['acc1']:.1f}%" in card


def test_shipped_model_annotates_held_out_cells_as_its_card_states(shipped):
    a, held = _held_out_pbmc3k()
    figures = json.loads((shipped_model_dir("pbmc-small") / "figures.json").read_text())
    stated = figures["asset_pbmc3k"]
    assert held.sum() == stated["n_cells"] > 200            # none of these cells was trained on
    sub = a[held].copy()
    pairs = dict(zip(sub.obs["cell_type"].astype(str), sub.obs["cell_type_ontology_term_id"].astype(str)))
    scmmgpt.tl.annotate(sub, shipped, labels={k: pairs[k] for k in sorted(pairs)}, precision="fp32",
                        min_coverage=0.0)
    acc = float((sub.obs["scmmgpt_label"].astype(str) == sub.obs["cell_type"].astype(str)).mean())
    assert acc == pytest.approx(stated["acc1"], abs=0.02), (acc, stated)
    # well above chance (1 / 9 types) whatever the card says
    assert acc > 0.5


def test_cli_model_pbmc_small(shipped, tmp_path, monkeypatch):
    """``--model pbmc-small`` picks the shipped model, whatever the CLI's default model is."""
    import anndata as ad

    from scmmgpt.cli.main import main

    monkeypatch.setenv("SCMMGPT_MODEL", str(tmp_path / "no-such-default"))
    a, held = _held_out_pbmc3k()
    cells = a[np.flatnonzero(held)[:40]].copy()
    f = tmp_path / "cells.h5ad"
    cells.write_h5ad(f)
    labels = ["B cell", "natural killer cell", "CD14-positive monocyte"]
    assert main(["annotate", str(f), "--model", "pbmc-small", "--labels", *labels, "--precision", "fp32",
                 "--output", str(tmp_path / "out.h5ad")]) == 0
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    scmmgpt.tl.annotate(cells, shipped, labels=labels, precision="fp32")
    assert list(out.uns["scmmgpt_label"]["labels"]) == labels
    assert out.obs["scmmgpt_label"].astype(str).tolist() == cells.obs["scmmgpt_label"].astype(str).tolist()
    np.testing.assert_allclose(out.obs["scmmgpt_label_score"], cells.obs["scmmgpt_label_score"], atol=1e-5)
