import json
import subprocess
import sys

from scmmgpt.cli.main import main
from tests.conftest import data_path


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
    rc = main(["check", str(data_path("symphony_pbmcs_small.h5ad")), "--label-key", "celltype"])
    assert rc == 2
    assert "no column 'celltype'" in capsys.readouterr().err


def test_demo_fast_end_to_end(tmp_path, capsys):
    out = tmp_path / "rep"
    rc = main(["demo", "--fast", "--out", str(out)])
    assert rc == 0
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
    assert (s1 / "checkpoint-3" / "train_config.json").is_file()
    assert main(["pretrain", "--stage", "2", "--model", str(s1 / "model"), "--out", str(s2), *common,
                 "--set", "train.max_steps=2", "--set", "train.batch_size=4"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2
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
