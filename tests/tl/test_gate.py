"""The novelty gate: fine-tuning for annotation records it, and ``tl.annotate(zero_shot_model=...)``
routes each cell to the fine-tuned or the zero-shot model (``scmmgpt.models.gate``)."""

import json
import warnings

import numpy as np
import pytest
import torch

import scmmgpt
from scmmgpt.cli.main import main
from scmmgpt.errors import ConfigError, InputDataError
from scmmgpt.models.gate import ROUTE_OFFSET, NoveltyGate, calibrate_gate, route_scores
from scmmgpt.models.scmmgpt import ScMMGPT


def test_route_scores_ranks_the_routed_group_first_in_its_own_order():
    tuned = torch.tensor([[0.9, 0.1, 0.8, 0.0], [0.9, 0.1, 0.8, 0.0]])
    zero = torch.tensor([[0.0, 0.5, 0.7, 0.6], [0.0, 0.5, 0.7, 0.6]])
    seen = np.array([True, False, True, False])
    out = route_scores(tuned, zero, seen, np.array([True, False]))
    # known cell: the fine-tuning types by the tuned scores, then the others by the zero-shot scores
    assert out[0].argsort(descending=True).tolist() == [0, 2, 3, 1]
    assert torch.allclose(out[0], torch.tensor([0.9, 0.5 - ROUTE_OFFSET, 0.8, 0.6 - ROUTE_OFFSET]))
    # novel cell: the other labels by the zero-shot scores first
    assert out[1].argsort(descending=True).tolist() == [3, 1, 0, 2]
    # nothing outside (or nothing inside) the fine-tuning types: the fine-tuned scores as they are
    assert route_scores(tuned, zero, np.ones(4, bool), np.array([False, False])) is tuned
    assert route_scores(tuned, zero, np.zeros(4, bool), np.array([True, True])) is tuned


def test_gate_scores_labels_and_round_trip():
    c = np.eye(3, dtype=np.float32)[:2]
    gate = NoveltyGate(types=["B cell", "T cell"], ids=["CL:0000236", ""], centroids=c, threshold=0.5, quantile=0.05,
                       calibrated_on="validation")
    emb = np.array([[1, 0, 0], [0.6, 0.8, 0], [0, 0, 1], [np.nan, 0, 0]], dtype=np.float32)
    assert gate.known(emb).tolist() == [True, True, False, False]          # a NaN cell is never known
    # a candidate is a fine-tuning type by name, or by CL id under another name
    assert gate.seen_labels(["B cell", "B lymphocyte", "NK cell", "T cell"],
                            ["", "CL:0000236", "CL:0000623", ""]).tolist() == [True, True, False, True]
    back = NoveltyGate.from_dict(json.loads(json.dumps(gate.to_dict())))
    assert back.types == gate.types and back.ids == gate.ids and back.threshold == 0.5
    np.testing.assert_allclose(back.centroids, c)


def _finetuned(trained, tmp_path, capsys):
    """pbmc-small fine-tuned for annotation on a third of the held-out pbmc3k cells' types."""
    data = tmp_path / "cells.h5ad"
    trained.test.write_h5ad(data)
    out = tmp_path / "ft"
    assert main(["finetune", "--task", "annotate", "--model", str(trained.path), "--data", str(data), "--out", str(out),
                 "--config", "finetune", "--set", "data.types_fraction=0.33", "--set", "train.max_steps=6",
                 "--set", "train.batch_size=16", "--set", "train.warmup_steps=1", "--set", "train.lr=1e-4",
                 "--set", "train.val_every=null", "--set", "train.save_every=null", "--set", "train.progress=false",
                 "--set", "train.deterministic=true"]) == 0
    summary = json.loads(capsys.readouterr().out)
    return ScMMGPT.from_pretrained(out / "model", with_lm=False), summary, data, out / "model"


def test_finetuning_records_a_gate_and_annotate_routes_through_it(trained, tmp_path, capsys):
    ft, summary, data, ft_dir = _finetuned(trained, tmp_path, capsys)
    zero = trained.model
    gate = ft.gate
    assert gate is not None and gate.types == sorted(summary["train_types"]) and len(gate.types) == 3
    assert gate.quantile == 0.05 and gate.calibrated_on in ("validation", "training")
    # what fit records survives the save (it did not before: run_training restored the config it started with)
    assert set(ft.config.trained_losses) == {"ctc", "ctm"}
    assert set(zero.config.trained_types) <= set(ft.config.trained_types)

    cells = trained.test.copy()
    pairs = dict(zip(cells.obs["cell_type"].astype(str), cells.obs["cell_type_ontology_term_id"].astype(str)))
    labels = {k: pairs[k] for k in sorted(pairs)}
    kw = dict(labels=labels, precision="fp32", min_coverage=0.0, store_scores=True)
    with pytest.warns(UserWarning, match="zero_shot_model"):
        plain = scmmgpt.tl.annotate(cells, ft, copy=True, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                           # no "forgets the others" warning with the gate
        gated = scmmgpt.tl.annotate(cells, ft, zero_shot_model=zero, copy=True, **kw)
    alone = scmmgpt.tl.annotate(cells, zero, copy=True, **kw)
    scmmgpt.tl.embed(cells, zero, precision="fp32", min_coverage=0.0)

    # the same routing by hand from the two models' own scores and the zero-shot embedding
    names = np.array(list(labels))
    seen = np.isin(names, gate.types)
    known = gate.known(cells.obsm["X_scmmgpt_aligned"])
    s_ft, s_zero = plain.obsm["scmmgpt_label_scores"], alone.obsm["scmmgpt_label_scores"]
    expect = np.where(known, names[np.where(seen, s_ft, -np.inf).argmax(1)],
                      names[np.where(seen, -np.inf, s_zero).argmax(1)])
    got = gated.obs["scmmgpt_label"].astype(str).to_numpy()
    assert (got == expect).mean() >= 0.99                     # ties and float noise aside
    rec = gated.uns["scmmgpt_label"]["gate"]
    assert rec["fine_tuning_types"] == gate.types and rec["n_zero_shot"] == int((~np.isin(got, gate.types)).sum())
    # the command line gives the same labels
    import anndata as ad

    cli_out = tmp_path / "annotated.h5ad"
    assert main(["annotate", str(data), "--model", str(ft_dir), "--zero-shot-model", str(trained.path),
                 "--labels", *[labels[k] for k in labels], "--precision", "fp32", "--min-coverage", "0",
                 "-o", str(cli_out)]) == 0
    by_cli = ad.read_h5ad(cli_out)
    assert by_cli.uns["scmmgpt_label"]["gate"]["zero_shot_model"] == str(trained.path)
    cli_names = dict(zip(labels.values(), labels))            # CL ids were passed: map back to the names
    assert (np.array([cli_names.get(x, x) for x in by_cli.obs["scmmgpt_label"].astype(str)]) == got).mean() >= 0.99

    # the gate tells the two groups apart: cells of the fine-tuning types are mostly known, the others less often
    truth = cells.obs["cell_type"].astype(str).to_numpy()
    is_seen = np.isin(truth, gate.types)
    assert known[is_seen].mean() >= 0.8
    assert known[~is_seen].mean() < known[is_seen].mean() - 0.2


def test_zero_shot_model_needs_a_gate_and_the_cells(trained, tmp_path, capsys):
    cells = trained.test[:40].copy()
    with pytest.raises(ConfigError, match="no novelty gate|has none"):
        scmmgpt.tl.annotate(cells, trained.model, labels=["B cell", "T cell"], zero_shot_model=trained.model,
                            min_coverage=0.0)
    scmmgpt.tl.embed(cells, trained.model, queries=True, min_coverage=0.0)
    with pytest.raises(InputDataError, match="leave use_rep unset"):
        scmmgpt.tl.annotate(cells, trained.model, labels=["B cell", "T cell"], zero_shot_model=trained.model,
                            use_rep="X_scmmgpt_queries")


def test_calibrate_gate_threshold_is_the_quantile_of_held_out_cells(trained):
    from scmmgpt.data.labelled import DataConfig, load_labelled

    m = trained.model
    lab = load_labelled(DataConfig(path=str(trained.h5ad), split=(0.2, 0.2, 0.6), seed=0, types_fraction=0.5),
                        vocab=m.vocab, target_sum=m.config.target_sum)
    train, val = lab.dataset("train", **m.reading), lab.dataset("val", **m.reading)
    gate = calibrate_gate(m, train, lab.types("train"), val=val, quantile=0.1)
    assert gate.calibrated_on == "validation" and gate.types == sorted(lab.train_types)
    emb = m.encode(val).embedding()
    held = gate.scores(emb)
    assert gate.threshold == pytest.approx(np.quantile(held, 0.1))
    assert 0.88 <= gate.known(emb).mean() <= 0.92 + 1 / len(held)
    with pytest.raises(ConfigError, match="quantile"):
        calibrate_gate(m, train, lab.types("train"), quantile=1.0)
