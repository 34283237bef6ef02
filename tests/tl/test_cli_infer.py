"""The inference CLI over the tl functions, on a real .h5ad, with the session's trained model."""

import anndata as ad
import numpy as np
import pytest

from scmmgpt.cli.main import main


@pytest.fixture
def h5ad(trained, tmp_path):
    path = tmp_path / "cells.h5ad"
    trained.test[:40].copy().write_h5ad(path)
    return path


def test_embed_annotate_describe_search(trained, h5ad, tmp_path, capsys):
    m = str(trained.path)
    out = tmp_path / "emb.h5ad"
    assert main(["embed", str(h5ad), "--model", m, "-o", str(out), "--batch-size", "16"]) == 0
    a = ad.read_h5ad(out)
    assert a.obsm["X_scmmgpt"].shape[0] == 40 and "X_scmmgpt" not in ad.read_h5ad(h5ad).obsm   # input untouched
    labels = tmp_path / "labels.txt"
    labels.write_text("B cell\nCD14-positive monocyte\nnatural killer cell\n")
    assert main(["annotate", str(out), "--model", m, "--labels-file", str(labels), "--inplace",
                 "--min-margin", "0.0", "--precision", "fp32"]) == 0
    a = ad.read_h5ad(out)
    assert a.uns["scmmgpt_label"]["params"]["precision"] == "fp32"      # --precision reaches tl and is recorded
    assert set(a.obs["scmmgpt_label"].astype(str)) <= {"B cell", "CD14-positive monocyte", "natural killer cell"}
    assert a.obsm["scmmgpt_label_topk"].shape == (40, 3) and "X_scmmgpt" in a.obsm   # earlier results kept
    assert bool(a.uns["scmmgpt_label"]["params"]["backoff"]) is True
    assert main(["annotate", str(out), "--model", m, "--labels", "naive B cell", "natural killer cell",
                 "--no-backoff", "-o", str(tmp_path / "plain.h5ad")]) == 0
    plain = ad.read_h5ad(tmp_path / "plain.h5ad").uns["scmmgpt_label"]
    assert bool(plain["params"]["backoff"]) is False and len(plain.get("backoff_terms", {})) == 0
    assert main(["describe", str(h5ad), "--model", m, "--max-new-tokens", "6"]) == 0
    default_out = h5ad.with_name("cells_scmmgpt.h5ad")
    assert ad.read_h5ad(default_out).obs["scmmgpt_description"].str.len().gt(0).all()
    capsys.readouterr()
    csv = tmp_path / "hits.csv"
    assert main(["search", str(h5ad), "B cell", "--model", m, "--top-k", "5", "--csv", str(csv)]) == 0
    printed = capsys.readouterr().out
    assert "obs_name" in printed and csv.read_text().count("\n") == 6


def test_generate_with_default_model(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("SCMMGPT_MODEL", str(trained.path))
    out = tmp_path / "gen.h5ad"
    assert main(["generate", "a CD8-positive cytotoxic T cell from lung", "-n", "50", "-o", str(out)]) == 0
    g = ad.read_h5ad(out)
    assert g.n_obs == 50 and (g.obs["prompt"] == "a CD8-positive cytotoxic T cell from lung").all()
    np.testing.assert_array_equal(g.layers["counts"].sum(1), 5000)   # -n > 1 samples 5000 reads per cell


def test_cli_refuses_unsafe_or_bad_requests(trained, h5ad, tmp_path, monkeypatch, capsys):
    m = str(trained.path)
    before = h5ad.read_bytes()
    assert main(["embed", str(h5ad), "--model", m, "-o", str(h5ad)]) == 2
    assert "--inplace" in capsys.readouterr().err and h5ad.read_bytes() == before
    assert main(["annotate", str(h5ad), "--model", m, "--labels-key", "nope", "-o", str(tmp_path / "x.h5ad")]) == 2
    assert "no column 'nope'" in capsys.readouterr().err and not (tmp_path / "x.h5ad").exists()
    monkeypatch.delenv("SCMMGPT_MODEL", raising=False)
    monkeypatch.setenv("SCMMGPT_CACHE", str(tmp_path / "empty-cache"))
    assert main(["generate", "B cell", "-o", str(tmp_path / "g.h5ad")]) == 2
    assert "No model given" in capsys.readouterr().err
    assert main(["search", str(tmp_path / "missing.h5ad"), "B cell", "--model", m]) == 2


def test_transfer_cli(trained, h5ad, tmp_path, capsys):
    """`scmmgpt transfer DATA --reference REF`: the reference's labels into DATA, as tl.transfer_labels writes them."""
    from scmmgpt import tl

    ref = tmp_path / "ref.h5ad"
    trained.test[40:].copy().write_h5ad(ref)
    out = tmp_path / "mapped.h5ad"
    assert main(["transfer", str(h5ad), "--model", str(trained.path), "--reference", str(ref), "-k", "5",
                 "--min-confidence", "0", "--precision", "fp32", "-o", str(out)]) == 0
    a = ad.read_h5ad(out)
    direct = tl.transfer_labels(ad.read_h5ad(h5ad), ad.read_h5ad(ref), trained.model, k=5, min_confidence=0.0,
                                precision="fp32", copy=True)
    np.testing.assert_array_equal(a.obs["scmmgpt_transfer"].astype(str), direct.obs["scmmgpt_transfer"].astype(str))
    assert a.uns["scmmgpt"]["transfer_labels"]["k"] == 5
    assert set(a.obs["scmmgpt_transfer"].astype(str)) <= set(trained.test.obs["cell_type"].astype(str))
    assert main(["transfer", str(h5ad), "--model", str(trained.path), "--reference", str(tmp_path / "no.h5ad"),
                 "-o", str(tmp_path / "x.h5ad")]) == 2
    assert "No such reference file" in capsys.readouterr().err
