"""The paper suite end to end on real data (tiny schedules): every protocol with its baselines,
results.json + results.md per part and one README."""

import json

import numpy as np
import pytest

from scmmgpt.cli.main import main
from tests.conftest import PBMC3K, data_path


@pytest.mark.slow       # minutes (every protocol trains); the smoke test below stays in the default suite
@pytest.mark.shared_data
def test_paper_suite_fast(tmp_path, capsys):
    """`scmmgpt benchmark --suite paper --fast`: every protocol on the shared datasets, one README."""
    data_dir = data_path("pbmc3k_clustifyr.h5ad").parent
    out = tmp_path / "suite"
    assert main(["benchmark", "--suite", "paper", "--fast", "--data-dir", str(data_dir), "--out", str(out)]) == 0
    suite = json.loads((out / "suite.json").read_text())
    assert suite["parts"] == ["annotation", "generative", "representation", "batch", "clustering", "mapping", "ood"]
    assert suite["fast"]
    readme = (out / "README.md").read_text()
    assert all(f"## {p}" in readme for p in suite["parts"]) and "--suite paper --fast" in readme

    # annotation (Table 3)
    rec = json.loads((out / "annotation" / "results.json").read_text())
    assert rec["n_types"] == 9 and rec["command"].startswith("scmmgpt benchmark --suite paper")
    assert rec["machine"]["cpu_count"] >= 1 and rec["seconds"]["total"] > 0
    zs, ft = rec["results"]["zero_shot"], rec["results"]["fine_tuned"]["0.3"]
    # logreg_corpus: the logistic regression trained on the pre-training cells (the cross-dataset reference)
    assert set(zs) == {"scmmgpt", "logreg", "logreg_corpus", "knn", "random"}
    # the supervised reference is far above chance on seen types and cannot name unseen ones
    assert zs["logreg"]["all"]["acc@1"] > 0.8
    assert ft["logreg"]["seen"]["acc@1"] > 0.8 and ft["logreg"]["unseen"]["acc@1"] == 0.0
    assert len(ft["train_types"]) == 3                        # ceil(0.3 * 9)
    for method in ("scmmgpt", "random"):
        for part in ("seen", "unseen"):
            m = ft[method][part]
            assert 0 <= m["acc@1"] <= m["acc@5"] <= m["acc@10"] == 1.0   # Acc@10 capped at 9 types
    n_seen = ft["scmmgpt"]["seen"]["n_cells"] + ft["scmmgpt"]["unseen"]["n_cells"]
    assert n_seen == rec["n_test_cells"] == np.sum(zs["scmmgpt"]["all"]["confusion"])
    assert 0 <= zs["scmmgpt"]["all"]["ontology_accuracy"] <= 1
    assert "| scmmgpt |" in readme and "unseen Acc@1" in readme

    # description (Tables 1 + 4), generation (Table 2), genes per cell (Fig. 6)
    gen = json.loads((out / "generative" / "results.json").read_text())
    d = gen["results"]["description"]["methods"]
    assert set(d) == {"scmmgpt", "cell_sentence_lm", "logreg_template", "random"}
    for m in d.values():
        assert {"bleu2", "rouge2", "mmd", "emd", "t_pvalue", "ks_pvalue"} <= set(m) and m["mmd"] >= 0
    g = gen["results"]["generation"]
    assert set(g["methods"]) == {"scmmgpt", "cell_sentence_lm", "type_mean", "type_log_mean", "random_cells"}
    for m in g["methods"].values():
        assert list(m) == ["3", "5", "10", "25"] and all(len(m[k]["runs"]) == 3 for k in m)
    assert g["methods"]["type_mean"]["3"]["mean"] > 2 / 9          # the supervised reference beats chance
    assert [r["genes"] for r in gen["results"]["gene_sweep"]["rows"]] == [32, 64]
    assert (out / "generative" / "gene_sweep.png").stat().st_size > 1000
    assert gen["training"]["c2s_steps"] == gen["training"]["stage2_steps"] == 2    # same budget

    # representation (Fig. 2) and batch view (Fig. 5)
    rep = json.loads((out / "representation" / "results.json").read_text())["results"]
    # the paper's point (Fig. 2): keeping only the top genes' names and order loses information
    assert rep["expression"]["accuracy"]["mean"] > 0.8
    assert rep["expression"]["accuracy"]["mean"] > rep["cell_sentence_32"]["accuracy"]["mean"] > 1 / 9
    batch = json.loads((out / "batch" / "results.json").read_text())["results"]
    assert set(batch) == {"symphony_pbmcs_small", "muscat_kang_se"}
    assert batch["symphony_pbmcs_small"]["n_batches"] == 3 and batch["muscat_kang_se"]["n_batches"] == 8
    for r in batch.values():
        pca = r["scores"]["PCA of log-normalised expression"]
        assert pca["type_asw"] > 0.5 and 0 < pca["batch_asw"] <= 1
        assert (out / "batch" / r["umap"]).stat().st_size > 1000
    capsys.readouterr()

    # user errors: clear message, exit 2
    assert main(["benchmark", "--suite", "paper", "--data-dir", str(tmp_path), "--out", str(out)]) == 2
    assert "lacks" in capsys.readouterr().err
    assert main(["benchmark", "annotation", "--data", str(tmp_path / "nope.h5ad"), "--pretrain-data",
                 str(data_dir / "soupx_pbmc4k.h5ad"), "--out", str(out)]) == 2
    assert main(["benchmark", "--out", str(out)]) == 2


def test_baselines_with_a_single_training_type():
    """10% of 9 types = 1 type: the supervised references call every cell that type."""
    from scmmgpt.data.labelled import DataConfig, load_labelled
    from scmmgpt.tasks.benchmark import _baselines

    lab = load_labelled(DataConfig(path=str(PBMC3K), split=(0.7, 0.1, 0.2),
                                   types_fraction=0.1))
    desc = lab.descriptions
    labels = sorted(set(desc["cell_type"].astype(str)))
    truth = desc["cell_type"].astype(str).to_numpy()[lab.split["test"]]
    ids = np.array([""] * len(truth))
    out = _baselines(lab, labels, truth, [""] * len(labels), ids, (1,), 0, lab.split["train"],
                     set(lab.train_types))
    (only,) = lab.train_types
    assert out["logreg"]["seen"]["acc@1"] == 1.0 and out["logreg"]["unseen"]["acc@1"] == 0.0
    assert out["knn"]["all"]["acc@1"] == np.mean(truth == only)


def test_annotation_benchmark_smoke(tmp_path, capsys):
    """The annotation protocol (Table 3) through the CLI on the repository's PBMCs, tiny schedules:
    its table and record, scMMGPT beside its baselines in one run. Pre-trained on a corpus that
    holds the evaluation dataset too: that dataset is left out of pre-training."""
    from scmmgpt.data.corpus import build_corpus

    build_corpus(["pbmc68k_reduced", str(PBMC3K)], tmp_path / "corpus", cells_per_shard=1000)
    # pre-training on the evaluation file itself is refused: the zero-shot figure would not be zero-shot
    assert main(["benchmark", "annotation", "--fast", "--data", str(PBMC3K), "--pretrain-data", str(PBMC3K),
                 "--out", str(tmp_path / "x")]) == 2
    assert "--pretrain-data is the evaluation data" in capsys.readouterr().err
    out = tmp_path / "ann"
    assert main(["benchmark", "annotation", "--fast", "--data", str(PBMC3K), "--pretrain-data",
                 str(tmp_path / "corpus"), "--fractions", "0.3", "--out", str(out)]) == 0
    rec = json.loads((out / "results.json").read_text())
    assert rec["pretrain_left_out"] == [PBMC3K.stem]
    assert set(rec["pretrain_types"]) <= set(json.loads((tmp_path / "corpus" / "corpus.json").read_text())
                                             ["datasets"][0]["types"])      # pbmc68k's types only
    assert f"with {PBMC3K.stem} left out" in (out / "results.md").read_text()
    zs = rec["results"]["zero_shot"]
    assert set(zs) == {"scmmgpt", "logreg_corpus", "logreg", "knn", "random"} and rec["n_types"] == 9
    assert zs["logreg"]["all"]["acc@1"] > 0.8                          # the supervised reference, same run
    # the cross-dataset reference, trained on pbmc68k's cells only, still beats chance by far
    assert zs["logreg_corpus"]["all"]["acc@1"] > zs["random"]["all"]["acc@1"] + 0.2
    assert 0 <= zs["scmmgpt"]["all"]["acc@1"] <= zs["scmmgpt"]["all"]["acc@5"] <= 1
    # beside the fine-tuned model, on the same seen / unseen cells: its WiSE-FT interpolation with the
    # pre-trained weights, and the pre-trained (zero-shot) model itself
    ft = rec["results"]["fine_tuned"]["0.3"]
    assert rec["settings"]["wise_alpha"] == 0.5
    for part in ("seen", "unseen"):
        assert ft["scmmgpt_wise"][part]["n_cells"] == ft["scmmgpt_zero_shot"][part]["n_cells"] == \
            ft["scmmgpt"][part]["n_cells"] == ft["scmmgpt_gated"][part]["n_cells"] > 0
    # the zero-shot row of the fine-tuned columns is the zero-shot scores, split by this fraction's types
    zs_cells = ft["scmmgpt_zero_shot"]["seen"]["n_cells"] + ft["scmmgpt_zero_shot"]["unseen"]["n_cells"]
    zs_right = sum(ft["scmmgpt_zero_shot"][part]["acc@1"] * ft["scmmgpt_zero_shot"][part]["n_cells"]
                   for part in ("seen", "unseen"))
    assert zs_right / zs_cells == pytest.approx(zs["scmmgpt"]["all"]["acc@1"])
    md = (out / "results.md").read_text()
    assert "| scmmgpt |" in md and "| scmmgpt_wise | – |" in md and "WiSE-FT, alpha 0.5" in md
    assert "| scmmgpt_gated | – |" in md and "novelty gate" in md
    # a re-run from the saved pre-trained model skips pre-training and scores the same zero-shot figures
    again = tmp_path / "again"
    assert main(["benchmark", "annotation", "--fast", "--data", str(PBMC3K), "--pretrain-data",
                 str(tmp_path / "corpus"), "--fractions", "0.3", "--pretrained", str(out / "pretrained"),
                 "--out", str(again)]) == 0
    rec2 = json.loads((again / "results.json").read_text())
    assert rec2["results"]["zero_shot"]["scmmgpt"] == zs["scmmgpt"]
    assert rec2["seconds"]["pretrain"] < rec["seconds"]["pretrain"]
    capsys.readouterr()
