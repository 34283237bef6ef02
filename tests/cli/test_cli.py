import json
import subprocess
import sys
from pathlib import Path

import pytest

from scmmgpt.cli.main import main
from tests.conftest import PBMC3K, data_path


@pytest.mark.shared_data
def test_check_runs_pipeline(capsys):
    rc = main(["check", str(data_path("soupx_pbmc4k.h5ad"))])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["value_kind"] == "counts" and out["ambiguous_labels"] == 20
    assert sum(out["split"].values()) == 2150


def test_user_error_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scmmgpt.cli.main", "check", str(tmp_path / "x.h5ad")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_label_key_missing(capsys):
    rc = main(["check", str(PBMC3K), "--label-key", "celltype"])
    assert rc == 2
    assert "no column 'celltype'" in capsys.readouterr().err


def test_demo_fast_end_to_end(tmp_path, capsys):
    """The demo's headline figures come from the user-facing verbs; the CLI's default model changes
    only with --set-default (without it, the record in the cache is left as it was)."""
    from scmmgpt import assets

    pointer = assets.cache_dir() / "default_model.txt"
    before = pointer.read_text() if pointer.exists() else None
    out = tmp_path / "rep"
    rc = main(["demo", "--fast", "--out", str(out)])
    assert rc == 0
    assert (pointer.read_text() if pointer.exists() else None) == before
    printed = capsys.readouterr().out
    assert "zero-shot annotation  Acc@1" in printed and str(out / "report.html") in printed
    m = json.loads((out / "metrics.json").read_text())
    assert m["cells"] == 700 and m["annotation"]["n_labels"] == 10
    # honest evaluation: the test cells were never trained on
    split = json.loads((out / "split.json").read_text())
    assert split["test"] and not set(split["test"]) & (set(split["train"]) | set(split["val"]))
    assert m["split"]["test"] == len(split["test"])
    for v in (m["annotation"]["acc1"], m["annotation"]["acc3"], m["description"]["bleu2"],
              m["generation"]["knn_accuracy"]):
        assert 0.0 <= v <= 1.0
    assert m["annotation"]["acc3"] >= m["annotation"]["acc1"]
    # the supervised reference is fitted on the same training cells and printed beside the figure
    assert m["reference"]["logistic_regression"]["acc1"] > 0.6 and "reference: logistic regression" in printed
    # ... and so are the description and pseudo-cell references: the classifier's type named in
    # about as many cells as it classifies right (4 sampled cells), the type means well above chance
    assert m["reference"]["logistic_regression_description"]["type_named"] >= 0.5
    assert m["reference"]["type_mean_generation"]["knn_accuracy"] >= 0.3
    assert "its type's description" in printed and "mean training profile" in printed
    assert m["training"]["stage1"]["steps"] == 8 and m["training"]["stage2"]["steps"] == 4
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3
    assert "confusion matrix" in html and "Generated descriptions" in html
    from scmmgpt.models.scmmgpt import ScMMGPT

    model = ScMMGPT.from_pretrained(out / "model", with_lm=False)
    assert len(model.vocab) > 700


def test_pretrain_and_finetune_cli(tmp_path, capsys):
    s1, s2, ft = tmp_path / "s1", tmp_path / "s2", tmp_path / "ft"
    common = ["--config", "cpu-small", "--set", "train.progress=false", "--set", "train.val_every=null"]
    assert main(["pretrain", "--stage", "1", "--out", str(s1), *common, "--set", "train.max_steps=3",
                 "--set", "train.batch_size=8"]) == 0
    r1 = json.loads(capsys.readouterr().out)
    assert r1["steps"] == 3 and "val_acc1" in r1["validation"]
    import yaml

    resolved = yaml.safe_load((s1 / "run_config.yaml").read_text())
    assert resolved["train"]["lr_new"] == 3e-3 and resolved["model"]["qformer"]["n_layers"] == 2
    # the precision that ran ("auto" resolved for this machine), in the run config and the summary
    from scmmgpt.utils.precision import resolve_precision

    assert resolved["train"]["precision"] == r1["precision"] == resolve_precision("auto", "cpu").name
    assert (s1 / "checkpoint-3" / "train_config.json").is_file()
    assert main(["pretrain", "--stage", "2", "--model", str(s1 / "model"), "--out", str(s2), *common,
                 "--set", "train.max_steps=2", "--set", "train.batch_size=4"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    # run_config.yaml records the model that trained, and the saved model adds what training recorded
    # (the losses of both stages; run_training used to save the configuration it started with)
    ran = yaml.safe_load((s2 / "run_config.yaml").read_text())["model"]
    saved = json.loads((s2 / "model" / "config.json").read_text())
    records = ("trained_losses", "trained_types", "input_genes", "novelty_gate")
    assert {k: v for k, v in ran.items() if k not in records} == {k: v for k, v in saved.items() if k not in records}
    assert saved["trained_losses"] == ["cdgen", "ctc", "ctm", "pcgen"]
    # model keys that disagree with the model are refused by name
    assert main(["pretrain", "--stage", "2", "--model", str(s1 / "model"), "--out", str(tmp_path / "no"), *common,
                 "--set", "model.max_genes=16", "--set", "model.qformer.n_query=2"]) == 2
    err = capsys.readouterr().err
    assert "model.max_genes=16 (the model has 256)" in err and "model.qformer.n_query=2 (the model has 8)" in err
    assert not (tmp_path / "no" / "run_config.yaml").exists()
    assert main(["finetune", "--task", "annotate", "--model", str(s2 / "model"), "--out", str(ft), *common,
                 "--set", "train.max_steps=2", "--set", "train.batch_size=4", "--set", "data.types_fraction=0.5"]) == 0
    r3 = json.loads(capsys.readouterr().out)
    assert len(r3["train_types"]) == 5
    split = json.loads((ft / "split.json").read_text())
    assert split["train_types"] == r3["train_types"]
    # resuming a finished run does no more steps and keeps the model
    assert main(["finetune", "--task", "annotate", "--model", str(s2 / "model"), "--out", str(ft), *common,
                 "--set", "train.max_steps=2", "--set", "train.batch_size=4", "--set", "data.types_fraction=0.5",
                 "--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2


def test_training_cli_errors(tmp_path, capsys):
    assert main(["pretrain", "--stage", "2", "--out", str(tmp_path)]) == 2
    assert "pass --model DIR" in capsys.readouterr().err
    assert main(["pretrain", "--stage", "1", "--out", str(tmp_path), "--set", "train.learning_rate=1"]) == 2
    assert "Unknown training config keys" in capsys.readouterr().err
    assert main(["pretrain", "--stage", "1", "--out", str(tmp_path), "--set", "train.lr"]) == 2
    assert "section.key=value" in capsys.readouterr().err
    assert main(["pretrain", "--stage", "1", "--out", str(tmp_path), "--config", "nope"]) == 2
    assert "packaged config" in capsys.readouterr().err


def test_pretrain_from_a_scgpt_checkpoint(tmp_path, capsys):
    """--cell-checkpoint starts stage 1 from a scGPT-format checkpoint: its encoder, vocabulary, pad
    value and binning train and are what the run records and saves."""
    import warnings

    import yaml

    from scmmgpt.datasets import pbmc68k_reduced
    from scmmgpt.models.scmmgpt import ScMMGPT
    from tests.models.test_model import _scgpt_checkpoint

    ckpt = _scgpt_checkpoint(tmp_path / "scgpt", list(pbmc68k_reduced().raw.var_names))
    out = tmp_path / "s1"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # the checkpoint's decoder head is ignored, with a warning
        assert main(["pretrain", "--stage", "1", "--cell-checkpoint", str(ckpt), "--out", str(out), "--config",
                     "cpu-small", "--set", "train.progress=false", "--set", "train.val_every=null",
                     "--set", "train.max_steps=2", "--set", "train.batch_size=8"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    cell = yaml.safe_load((out / "run_config.yaml").read_text())["model"]["cell"]
    assert (cell["d_model"], cell["n_layers"], cell["pad_value"], cell["n_bins"]) == (32, 2, -2.0, 51)
    model = ScMMGPT.from_pretrained(out / "model")
    assert model.config.cell.pad_value == -2.0 and model.value_bins == 51
    # cpu-small's expression token is a fresh encoder's read-out: a scGPT encoder keeps none
    assert not model.config.cell.expression_token and model.net.cell_encoder.expression is None
    assert main(["pretrain", "--stage", "1", "--cell-checkpoint", str(ckpt), "--out", str(tmp_path / "y"),
                 "--set", "model.cell.d_model=64"]) == 2
    assert "model.cell.d_model=64 (the model has 32)" in capsys.readouterr().err
    assert main(["pretrain", "--stage", "1", "--cell-checkpoint", str(ckpt), "--model", str(out / "model"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "cannot be combined with --model" in capsys.readouterr().err


def test_pretrain_in_the_census_vocabulary(tmp_path, capsys):
    """model.vocab=census: a new model in scGPT's whole-human gene vocabulary (the paper's 60,697
    tokens, scGPT's indices), so real scGPT weights and any human dataset map into it."""
    import importlib.util

    from scmmgpt.models.scmmgpt import ScMMGPT

    out = tmp_path / "s1"
    assert main(["pretrain", "--stage", "1", "--out", str(out), "--config", "cpu-small", "--set", "model.vocab=census",
                 "--set", "train.progress=false", "--set", "train.val_every=null", "--set", "train.max_steps=2",
                 "--set", "train.batch_size=8"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    model = ScMMGPT.from_pretrained(out / "model")
    vocab = model.vocab
    assert len(vocab) == 60697 and (vocab.pad_id, vocab.cls_id, vocab.eoc_id) == (60694, 60695, 60696)
    scgpt = json.loads((Path(importlib.util.find_spec("scgpt").submodule_search_locations[0])
                        / "tokenizer" / "default_census_vocab.json").read_text())
    assert all(vocab.tokens[i] == g for g, i in scgpt.items())
    assert model.net.cell_encoder.encoder.embedding.num_embeddings == 60697
    # a saved model keeps its vocabulary: a run from it that asks for another one is refused
    assert main(["pretrain", "--stage", "1", "--model", str(out / "model"), "--out", str(tmp_path / "x"),
                 "--set", "model.vocab=genes.json"]) == 2
    assert "model.vocab='genes.json' (the model has 'census')" in capsys.readouterr().err
    assert main(["pretrain", "--stage", "1", "--out", str(tmp_path / "y"), "--set", "model.vocab=censsus"]) == 2
    assert "Unknown gene vocabulary 'censsus'" in capsys.readouterr().err
