"""The annotation protocol end to end on real data (tiny schedules): pre-train on one PBMC
dataset, zero-shot and fine-tuned on another, baselines beside, results.json + results.md."""

import json

import numpy as np

from scmmgpt.cli.main import main
from tests.conftest import data_path


def test_annotation_benchmark_fast(tmp_path, capsys):
    data, pre = data_path("pbmc3k_clustifyr.h5ad"), data_path("soupx_pbmc4k.h5ad")
    out = tmp_path / "bench"
    assert main(["benchmark", "annotation", "--data", str(data), "--pretrain-data", str(pre), "--fast",
                 "--out", str(out), "--fractions", "0.3"]) == 0
    rec = json.loads((out / "results.json").read_text())
    assert rec["n_types"] == 9 and rec["command"].startswith("scmmgpt benchmark annotation")
    assert rec["machine"]["cpu_count"] >= 1 and rec["seconds"]["total"] > 0
    zs, ft = rec["results"]["zero_shot"], rec["results"]["fine_tuned"]["0.3"]
    assert set(zs) == {"scmmgpt", "logreg", "knn", "random"}
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
    md = (out / "results.md").read_text()
    assert "| scmmgpt |" in md and "unseen Acc@1" in md and "pbmc3k_clustifyr.h5ad" in md
    assert "results.json" in capsys.readouterr().out
    (out / "results.json").unlink()
    assert main(["benchmark", "annotation", "--data", str(tmp_path / "nope.h5ad"), "--pretrain-data", str(pre),
                 "--out", str(out)]) == 2


def test_baselines_with_a_single_training_type():
    """10% of 9 types = 1 type: the supervised references call every cell that type."""
    from scmmgpt.tasks.benchmark import _baselines
    from scmmgpt.train.run import DataConfig, load_labelled

    lab = load_labelled(DataConfig(path=str(data_path("pbmc3k_clustifyr.h5ad")), split=(0.7, 0.1, 0.2),
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
