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


def test_pipeline_demo_on_bundled_data(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path / "rep"), "--cell-preset", "tiny"])
    assert rc == 0
    report = json.loads((tmp_path / "rep" / "pipeline.json").read_text())
    assert report["value_kind"] == "lognorm" and report["cells"] == 700 and report["cell_types"] == 10
    assert report["split"]["test"] >= 10
    losses = report["untrained_losses_on_test_cells"]
    assert all(v > 0 and v == v for v in losses.values())  # finite, positive
    assert "lymphocyte" in report["example_description"] or "cell" in report["example_description"]
