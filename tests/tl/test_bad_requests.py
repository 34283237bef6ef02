"""Bad requests at the model boundary (issue 8): label sets, prompts and queries, non-UTF-8 text,
a full disk while writing, and the memory guard. Each is a specific error (exit code 2 and one line
on the CLI), and nothing is left half-written."""

import errno

import anndata as ad
import numpy as np
import pytest

from scmmgpt import tl
from scmmgpt.cli.main import main
from scmmgpt.errors import InputDataError, ResourceError

LONG = "a T cell " * 1200 + "x"  # 10,801 characters


@pytest.mark.parametrize("labels, match", [
    ([], "No candidate labels left"),
    (["unknown", "?", ""], "No candidate labels left"),
    ([f"cell type {i}" for i in range(100_000)], "100000 candidate labels .* more than max_labels=20000"),
    (["B cell", LONG], "10801 characters; keep it under 2000"),
    (["B cell", "T cell\udcff"], "not valid UTF-8"),
    (["B cell", b"T cell"], "must be text, got bytes"),
])
def test_annotate_refuses_bad_label_sets(trained, test_cells, labels, match):
    with pytest.raises(InputDataError, match=match):
        tl.annotate(test_cells, trained.model, labels=labels)
    assert "scmmgpt_label" not in test_cells.obs   # nothing written


def test_many_labels_pass_when_allowed(trained, test_cells):
    labels = ["B cell", "T cell", *[f"made-up type {i}" for i in range(300)]]
    tl.annotate(test_cells, trained.model, labels=labels, max_labels=400)
    assert test_cells.obsm["scmmgpt_label_scores"].shape == (test_cells.n_obs, 302)


@pytest.mark.parametrize("prompt, match", [
    ("", "is empty"), ("   ", "is empty"), (LONG, "10801 characters"), ("B cell\udcff", "not valid UTF-8"),
])
def test_generate_and_search_refuse_bad_prompts(trained, test_cells, prompt, match):
    with pytest.raises(InputDataError, match=match):
        tl.generate(trained.model, ["B cell", prompt])
    with pytest.raises(InputDataError, match=match):
        tl.search(test_cells, trained.model, prompt)


def test_labels_file_not_utf8(trained, tmp_path, capsys):
    cells = tmp_path / "cells.h5ad"
    trained.test[:20].copy().write_h5ad(cells)
    labels = tmp_path / "labels.txt"
    labels.write_bytes("B cell\nT cell\nnatürliche Killerzelle\n".encode("latin-1"))
    out = tmp_path / "out.h5ad"
    assert main(["annotate", str(cells), "--model", str(trained.path), "--labels-file", str(labels),
                 "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Cannot read the labels file" in err and "utf-8" in err and "Traceback" not in err
    assert not out.exists()


def test_disk_full_while_writing_leaves_nothing(trained, tmp_path, monkeypatch, capsys):
    cells = tmp_path / "cells.h5ad"
    trained.test[:20].copy().write_h5ad(cells)
    before = cells.read_bytes()
    out = tmp_path / "out" / "emb.h5ad"
    out.parent.mkdir()
    out.write_bytes(b"previous result")

    def full_disk(self, path, *args, **kwargs):
        with open(path, "wb") as fh:      # part of the file lands, then the disk is full
            fh.write(b"\x89HDF\r\n" + bytes(4096))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", full_disk)
    assert main(["embed", str(cells), "--model", str(trained.path), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Could not write" in err and "No space left on device" in err and "free disk space" in err
    assert out.read_bytes() == b"previous result"            # the old file is intact
    assert sorted(p.name for p in out.parent.iterdir()) == ["emb.h5ad"]   # no temporary file left
    assert cells.read_bytes() == before


def test_disk_full_while_saving_a_model(trained, tmp_path, monkeypatch):
    from scmmgpt.errors import OutputError
    from scmmgpt.models import persistence

    def full_disk(state, path, metadata=None):
        with open(path, "wb") as fh:
            fh.write(bytes(1024))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(persistence, "save_file", full_disk)
    with pytest.raises(OutputError, match="No space left on device"):
        trained.model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m" / "manifest.json").exists()        # never loadable half-written
    assert not list((tmp_path / "m").glob(".model.safetensors*"))


def test_memory_guard_fails_with_advice(trained, test_cells, monkeypatch):
    monkeypatch.setenv("SCMMGPT_MEMORY_LIMIT", "1M")
    with pytest.raises(ResourceError, match="A batch of 64 cells .* more than the 1.0 MiB .* Lower batch_size"):
        tl.embed(test_cells, trained.model)
    monkeypatch.setenv("SCMMGPT_MEMORY_LIMIT", "200M")
    tl.embed(test_cells, trained.model, batch_size=8)          # a smaller batch fits
    assert test_cells.obsm["X_scmmgpt"].shape[0] == test_cells.n_obs
    with pytest.raises(ResourceError, match=r"generated matrices \(100000 cells x \d+ genes.*Lower n_per_text"):
        tl.generate(trained.model, "B cell", n_per_text=100_000, library_size=5000)
    monkeypatch.setenv("SCMMGPT_MEMORY_LIMIT", "20M")
    with pytest.raises(ResourceError, match="score matrix .* store_scores=False"):
        tl.annotate(test_cells, trained.model, labels=[f"made-up type {i}" for i in range(19_000)],
                    store_scores=True, batch_size=8)
    monkeypatch.setenv("SCMMGPT_MEMORY_LIMIT", "lots")
    with pytest.raises(ResourceError, match="not a size"):
        tl.embed(test_cells, trained.model)


def test_memory_guard_estimate_grows_with_batch_and_genes(trained):
    from scmmgpt.utils.memory import check_batch_memory

    m = trained.model
    small = check_batch_memory(m, 8, training=False)
    assert check_batch_memory(m, 16, training=False) == pytest.approx(2 * small)
    assert check_batch_memory(m, 8, training=True) > small
    assert np.isfinite(small) and small > 0


def _mostly_unknown_genes(cells: ad.AnnData) -> ad.AnnData:
    """``cells`` with the genes holding ~80% of the reads renamed to ids no vocabulary has."""
    tot = np.asarray(cells.X.sum(0)).ravel()
    order = np.argsort(-tot)
    top = order[: int(np.searchsorted(np.cumsum(tot[order]) / tot.sum(), 0.8)) + 1]
    names = cells.var_names.to_numpy().copy()
    names[top] = [f"NOVEL{i}" for i in range(len(top))]
    out = cells.copy()
    out.var_names = names
    return out


def test_low_gene_coverage_names_fixes_that_exist(trained, test_cells, tmp_path, capsys):
    # a file whose genes the model mostly does not know (a 10x file against a narrow vocabulary):
    # refused, and the fix the error names is accepted by the verb and by the CLI
    cells = _mostly_unknown_genes(test_cells[:30].copy())
    with pytest.raises(InputDataError, match=r"below min_coverage=50%.*lower min_coverage=.*--min-coverage") as err:
        tl.annotate(cells, trained.model, labels=["B cell", "T cell"])
    assert "organism=" not in str(err.value)          # tl verbs take no organism=
    with pytest.warns(tl.GeneCoverageWarning):
        tl.annotate(cells, trained.model, labels=["B cell", "T cell"], min_coverage=0.05)
    rep = cells.uns["scmmgpt_label"]
    assert rep["gene_coverage"] < 0.5 and rep["min_coverage"] == 0.05
    assert (cells.obs["scmmgpt_label"].astype(str) != "").all()
    f = tmp_path / "cells.h5ad"
    _mostly_unknown_genes(test_cells[:30].copy()).write_h5ad(f)
    out = tmp_path / "out.h5ad"
    assert main(["embed", str(f), "--model", str(trained.path), "-o", str(out)]) == 2
    assert "--min-coverage" in capsys.readouterr().err and not out.exists()
    assert main(["embed", str(f), "--model", str(trained.path), "-o", str(out), "--min-coverage", "0.05"]) == 0
    assert ad.read_h5ad(out).obsm["X_scmmgpt"].shape[0] == 30
