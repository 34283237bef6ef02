"""The clustering protocol: Leiden ARI / NMI, and scIB metrics (scib-metrics) of scMMGPT, PCA and scVI."""

import json

import numpy as np
import pytest

from scmmgpt.cli.main import main
from scmmgpt.tasks.clustering import EMBEDDINGS, _scib, leiden_scores
from tests.conftest import data_path


def _blobs(seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(["a", "b", "c", "d"], 60)
    centres = rng.normal(0, 10, (4, 16))
    return centres[np.searchsorted(["a", "b", "c", "d"], labels)] + rng.normal(0, 1, (240, 16)), labels, rng


def test_leiden_finds_separated_types_and_not_noise():
    clear, labels, rng = _blobs()
    s = leiden_scores(clear, labels, resolutions=(0.1, 0.3, 1.0), fixed=1.0)
    assert s["best"]["ari"] > 0.95 and s["best"]["nmi"] > 0.95
    assert s["best"]["nmi"] >= s["fixed"]["nmi"] and set(s["per_resolution"]) == {"0.1", "0.3", "1.0"}
    noise = leiden_scores(rng.normal(0, 1, (240, 16)), labels, resolutions=(0.1, 0.3, 1.0), fixed=1.0)
    assert noise["best"]["ari"] < 0.1


@pytest.mark.slow  # scib-metrics' jax kernels compile for ~1.5 min; the clustering CLI test runs the Benchmarker
def test_scib_with_one_batch_is_bio_conservation_alone():
    clear, labels, rng = _blobs()
    s = _scib({"clear": clear, "noise": rng.normal(0, 1, clear.shape)}, labels, ["b0"] * len(labels),
              rng.normal(0, 1, (len(labels), 10)))
    assert s["clear"]["Bio conservation"] > s["noise"]["Bio conservation"] + 0.3
    for name in ("clear", "noise"):
        assert np.isnan(s[name]["Batch correction"]) and s[name]["Total"] == s[name]["Bio conservation"]


@pytest.mark.shared_data
def test_clustering_benchmark_cli(tmp_path, capsys):
    symphony = data_path("symphony_pbmcs_small.h5ad")
    out = tmp_path / "c"
    assert main(["benchmark", "clustering", "--fast", "--data", str(symphony), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    rec = json.loads((out / "results.json").read_text())
    for name in ("symphony_pbmcs_small",):
        (run,) = rec["results"][name]
        assert set(run["leiden"]) == set(EMBEDDINGS) == set(k for k in run["scib"] if not k.startswith("_"))
        for emb in EMBEDDINGS:
            assert f"| {name} | {emb} |" in table
            s = run["scib"][emb]
            assert 0 <= s["Bio conservation"] <= 1 and 0 <= s["Total"] <= 1
    three = rec["results"]["symphony_pbmcs_small"][0]
    assert three["n_batches"] == 3
    # with three chemistries the total is scIB's 0.6 bio + 0.4 batch
    s = three["scib"]["scVI"]
    assert s["Total"] == pytest.approx(0.6 * s["Bio conservation"] + 0.4 * s["Batch correction"], abs=1e-6)
    # PCA is the unintegrated space: PCR comparison (variance explained by batch, before vs after) is 0
    assert three["scib"]["PCA (50) of log-normalised expression"]["PCR comparison"] == pytest.approx(0, abs=0.05)
