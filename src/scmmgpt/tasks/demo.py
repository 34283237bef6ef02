"""The main job behind ``make demo``: train scMMGPT on the bundled PBMCs (or a user's h5ad) on a
CPU and report every task on held-out cells.

1. descriptions from the ontologies; a stratified train / validation / test split (test cells are
   never trained on);
2. stage 1 (cell encoder + Q-Former, CTC + CTM) and stage 2 (text-to-cell + LoRA LM, CDGen + PCGen),
   short schedules from the packaged ``cpu-small`` configuration;
3. on the test cells: zero-shot annotation over the dataset's label names (Acc@1, Acc@3, macro F1),
   descriptions generated for a sample (BLEU-2, ROUGE-2, and how often the generated text names
   the right cell type), pseudo-cells generated from each label's description (k-NN accuracy
   against the real test cells);
4. ``report.html`` (UMAPs, confusion matrix, example descriptions, real vs generated cells),
   ``metrics.json`` and the trained model (``ScMMGPT.from_pretrained``-loadable).
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..baselines.reference import logistic_regression_reference, type_mean_profiles
from ..data.labelled import DataConfig, load_labelled
from ..eval.annotation import topk_accuracy
from ..eval.cells import expression_pca, knn_accuracy
from ..eval.text import text_metrics, type_named
from ..inference import iter_batches
from ..train.run import load_run_config
from ..utils.io import atomic_write_text
from ..utils.seed import seeded
from ._train import train_two_stages

__all__ = ["DemoSettings", "run_demo"]


@dataclass
class DemoSettings:
    """Schedule sizes. ``fast`` is the CI setting (about a minute); the default fits ~10 min on 2 cores."""

    stage1_steps: int = 600
    """Stage-1 steps of ``cpu-small``'s 32 cells (its 50-step warm-up; benchmarks/results/recipe/)."""
    stage2_steps: int = 60
    stage2_batch: int = 8
    t2c_warmup_steps: int = 600
    """Text-to-cell warm-up steps on cached LM states before the joint stage-2 steps."""
    t2c_final_steps: int = 200
    """Text-to-cell steps again after the joint stage-2 steps, on the final LM states."""
    n_describe: int = 24
    max_new_tokens: int = 32

    @classmethod
    def fast(cls) -> "DemoSettings":
        return cls(stage1_steps=8, stage2_steps=4, stage2_batch=4, t2c_warmup_steps=20, t2c_final_steps=5, n_describe=4,
                   max_new_tokens=16)


def _fig_to_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _html(metrics: dict, figs: dict[str, str], examples: list[dict]) -> str:
    def table(d: dict) -> str:
        return "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in d.items())

    rows = "".join(
        f"<tr><td>{html.escape(e['cell_type'])}</td><td>{html.escape(e['generated'])}</td>"
        f"<td>{html.escape(e['reference'])}</td></tr>" for e in examples)
    a, d, g = metrics["annotation"], metrics["description"], metrics["generation"]
    lr = metrics["reference"]["logistic_regression"]
    ld, tm = metrics["reference"]["logistic_regression_description"], metrics["reference"]["type_mean_generation"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>scMMGPT demo report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}table{{border-collapse:collapse;margin:1em 0}}
th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top;font-size:13px}}img{{max-width:100%}}</style>
</head><body><h1>scMMGPT demo report</h1>
<p>Data: {html.escape(metrics['data'])}. All figures are on <b>{metrics['split']['test']} held-out test cells</b>
never used in training. Chance level for annotation: {metrics['chance_acc1']:.3f}.</p>
<table>{table({'zero-shot Acc@1': f"{a['acc1']:.3f}", 'zero-shot Acc@3': f"{a['acc3']:.3f}",
              'macro F1': f"{a['macro_f1']:.3f}",
              'reference: logistic regression on the same training cells (supervised), Acc@1 / macro F1':
                  f"{lr['acc1']:.3f} / {lr['macro_f1']:.3f}", 'BLEU-2': f"{d['bleu2']:.3f}", 'ROUGE-2': f"{d['rouge2']:.3f}",
              'descriptions naming the right type': f"{d['type_named']:.3f}",
              'reference: logistic regression -> the description of its type, BLEU-2 / type named':
                  f"{ld['bleu2']:.3f} / {ld['type_named']:.3f}",
              'pseudo-cell k-NN accuracy': f"{g['knn_accuracy']:.3f}",
              'reference: the mean training profile of each type, k-NN accuracy': f"{tm['knn_accuracy']:.3f}"})}</table>
<h2>Cell embeddings (UMAP)</h2><img src="{figs['umap']}">
<h2>Zero-shot annotation: confusion matrix</h2><img src="{figs['confusion']}">
<h2>Generated descriptions</h2><table><tr><th>true type</th><th>generated</th><th>reference</th></tr>{rows}</table>
<h2>Text-to-cell generation</h2><img src="{figs['generated']}">
<h2>Run</h2><table>{table({'stage 1': metrics['training']['stage1'], 'stage 2': metrics['training']['stage2'],
                           'seconds': metrics['seconds']})}</table>
</body></html>"""


def run_demo(*, data: str | None = None, label_key: str = "cell_type", layer: str | None = None,
             use_raw: bool = False, out: str = "demo_report", fast: bool = False, seed: int = 0,
             settings: DemoSettings | None = None, progress: bool = True, set_default: bool = False) -> dict:
    """Train on ``data`` (default: bundled pbmc68k_reduced) and report on held-out cells.

    Every figure is measured through the verbs users call: zero-shot annotation through
    :meth:`ScMMGPT.score_labels` over the dataset's cell types (each named as in the data, with its
    Cell Ontology term, as ``tl.annotate(labels={name: CL id})`` reads them), descriptions through
    :meth:`ScMMGPT.describe`, pseudo-cells through :meth:`ScMMGPT.generate_cells` on the same
    label texts. With ``set_default`` the trained model becomes the CLI's default model.

    Returns the metrics (also written to ``{out}/metrics.json``) with ``report`` and ``model`` paths.
    """
    from ..models.scmmgpt import ScMMGPT

    t0 = time.perf_counter()
    s = settings or (DemoSettings.fast() if fast else DemoSettings())
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rc = load_run_config("cpu-small", [f"train.seed={seed}"])
    lab = load_labelled(DataConfig(path=data, label_key=label_key, layer=layer, use_raw=use_raw,
                                   split=(0.7, 0.1, 0.2), seed=seed), target_sum=rc.model.target_sum)
    with seeded(seed):
        model = ScMMGPT.build(rc.model, lab.vocab, with_lm=True)
    t_setup = time.perf_counter() - t0

    # ---- training: stage 1 then stage 2 on the same model object
    r1, r2 = train_two_stages(model, lab, rc, stage1_steps=s.stage1_steps, stage2_steps=s.stage2_steps,
                              stage2_batch=s.stage2_batch, t2c_warmup_steps=s.t2c_warmup_steps, t2c_final_steps=s.t2c_final_steps, progress=progress,
                              out_dir=out_dir)
    model.save_pretrained(out_dir / "model")
    if set_default:
        from ..assets import set_default_model

        set_default_model(out_dir / "model")
    atomic_write_text(out_dir / "split.json", json.dumps({k: np.asarray(lab.cells.obs_names[v]).astype(str).tolist()
                                                          for k, v in lab.split.items()}))
    t_train = time.perf_counter()
    test_ds = lab.dataset("test", **model.reading)
    ls = model.score_labels(test_ds, lab.label_set())
    annotation = _annotation(ls, lab.types("test"))
    reference = {"logistic_regression": logistic_regression_reference(lab, seed=seed)}
    description, examples = _descriptions(model, test_ds, lab.types("test"), list(lab.descriptions["description"]
                                          .iloc[lab.split["test"]]), s, seed)
    reference["logistic_regression_description"] = _logistic_descriptions(model, lab, s, seed)
    real, pseudo, generation = _generation(model, lab, ls)
    reference["type_mean_generation"] = _type_mean_generation(lab, ls.names, real, generation["k"])
    t_eval = time.perf_counter() - t_train

    figs = _report_figures(model, test_ds, lab.types("test"), ls, real, pseudo, seed)
    metrics = {
        "data": lab.source, "cells": int(len(lab.descriptions)), "split": {k: int(len(v)) for k, v in lab.split.items()},
        "chance_acc1": 1.0 / len(ls.names), "annotation": annotation, "reference": reference,
        "description": description,
        "generation": generation,
        "training": {
            "stage1": {"steps": r1["steps"], "cells_per_s": round(r1["cells_per_s"], 2),
                       **{k: round(v, 4) for k, v in r1["validation"].items()}},
            "stage2": {"steps": r2["steps"], "cells_per_s": round(r2["cells_per_s"], 2),
                       "t2c_warmup": r2["t2c_warmup"],
                       "t2c_final": r2["t2c_final"],
                       **{k: round(v, 4) for k, v in r2["history"][-1].items() if k in ("cdgen", "pcgen")}},
        },
        "settings": {"fast": fast, **s.__dict__},
        "seconds": {"setup": round(t_setup, 1), "stage1": round(r1["seconds"], 1), "stage2": round(r2["seconds"], 1),
                    "evaluation": round(t_eval, 1), "total": round(time.perf_counter() - t0, 1)},
    }
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    atomic_write_text(out_dir / "report.html", _html(metrics, figs, examples))
    return {**metrics, "report": str(out_dir / "report.html"), "model": str(out_dir / "model")}


def _annotation(ls, truth_names: np.ndarray) -> dict:
    """Acc@1, Acc@3 and macro F1 of the zero-shot scores against the true types."""
    from sklearn.metrics import f1_score

    truth = np.array([ls.names.index(t) for t in truth_names])
    pred = ls.scores.argmax(1)
    return {"acc1": topk_accuracy(ls.scores, truth, 1), "acc3": topk_accuracy(ls.scores, truth, 3),
            "macro_f1": float(f1_score(truth, pred, average="macro", labels=np.unique(truth))),
            "n_labels": len(ls.names)}


def _descriptions(model, test_ds, truth_names, references: list[str], s: DemoSettings, seed: int
                  ) -> tuple[dict, list[dict]]:
    """Descriptions of a seeded sample of test cells against their references, cut to the same
    number of LM tokens the model may generate."""
    sample = _test_sample(len(test_ds), s, seed)
    generated: list[str] = []
    for batch in iter_batches(model, test_ds, 8, indices=sample):      # describe runs in evaluation mode
        generated += model.describe(batch, max_new_tokens=s.max_new_tokens)
    refs = [model.cut_text(references[i], s.max_new_tokens) for i in sample]
    names = [str(truth_names[i]) for i in sample]
    metrics = {**text_metrics(generated, refs), "type_named": type_named(generated, names), "n": len(sample)}
    return metrics, [{"cell_type": n, "generated": g, "reference": r} for n, g, r in zip(names, generated, refs)]


def _test_sample(n_test: int, s: DemoSettings, seed: int) -> np.ndarray:
    """The test cells (positions in the test split) whose descriptions are generated and scored."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_test, size=min(s.n_describe, n_test), replace=False))


def _logistic_descriptions(model, lab, s: DemoSettings, seed: int) -> dict:
    """The description reference: a logistic regression fitted on the training cells picks each
    sampled test cell's type, and that type's description (the one most of its training cells
    carry) stands as the generated text; scored as scMMGPT's descriptions are."""
    from ..baselines.reference import logistic_scores

    tr, te = lab.split["train"], lab.split["test"]
    meas = np.flatnonzero(lab.cells.measured)
    y = lab.types("train").astype(str)
    names = sorted(set(y))
    sample = _test_sample(len(te), s, seed)
    x_tr, x_te = lab.cells.rows_csr(tr)[:, meas], lab.cells.rows_csr(te[sample])[:, meas]
    pred = np.array(names)[logistic_scores(x_tr, y, x_te, names, seed=seed).argmax(1)]
    desc = lab.descriptions["description"].astype(str).to_numpy()
    text_of = {n: str(_most_common(desc[tr][y == n])) for n in names}
    generated = [model.cut_text(text_of[p], s.max_new_tokens) for p in pred]
    refs = [model.cut_text(desc[te[i]], s.max_new_tokens) for i in sample]
    truth = [str(t) for t in lab.types("test")[sample]]
    return {**text_metrics(generated, refs), "type_named": type_named(generated, truth), "n": len(sample)}


def _most_common(values: np.ndarray):
    uniq, counts = np.unique(values, return_counts=True)
    return uniq[counts.argmax()]


def _type_mean_generation(lab, names: list[str], real: np.ndarray, k: int) -> dict:
    """The pseudo-cell reference: each type's mean profile over its training cells
    (:func:`~scmmgpt.baselines.reference.type_mean_profiles`), scored with the same k-NN as
    scMMGPT's pseudo-cells."""
    y = lab.types("train").astype(str)
    have = [n for n in names if (y == n).any()]
    mean = type_mean_profiles(lab.cells.rows_csr(lab.split["train"]), y, have)[:, lab.cells.measured]
    knn = knn_accuracy(real, lab.types("test"), mean, have, k=k, transform=expression_pca(real, 50))
    return {"knn_accuracy": knn, "n_generated": len(have), "k": k}


def _generation(model, lab, ls) -> tuple[np.ndarray, np.ndarray, dict]:
    """One pseudo-cell from each label's text; k-NN (k=5) accuracy against the real test cells in
    a PCA of their measured genes."""
    pseudo = model.generate_cells(ls.candidates.texts)
    meas = lab.cells.measured
    real = lab.cells.rows_csr(lab.split["test"]).toarray()
    knn = knn_accuracy(real[:, meas], lab.types("test"), pseudo[:, meas], ls.names, k=5,
                       transform=expression_pca(real[:, meas], 50))
    return real[:, meas], pseudo[:, meas], {"knn_accuracy": knn, "n_generated": len(ls.names), "k": 5}


def _report_figures(model, test_ds, truth_names, ls, real, pseudo, seed: int) -> dict[str, str]:
    """The report's figures, drawn by :mod:`scmmgpt.pl` on AnnData views of the results."""
    import anndata as ad
    import pandas as pd

    from .. import pl

    cells = ad.AnnData(obs=pd.DataFrame({"true cell type": truth_names, "zero-shot prediction": ls.predict()},
                                        index=[f"cell{i}" for i in range(len(truth_names))]))
    cells.obsm["X_scmmgpt_aligned"] = model.encode(test_ds).embedding()
    genes = [f"g{i}" for i in range(real.shape[1])]
    real_ad = ad.AnnData(real.astype(np.float32), obs=pd.DataFrame({"cell type": truth_names}, index=cells.obs_names),
                         var=pd.DataFrame(index=genes))
    gen_ad = ad.AnnData(pseudo.astype(np.float32), obs=pd.DataFrame({"prompt": ls.names},
                        index=[f"gen{i}" for i in range(len(ls.names))]), var=pd.DataFrame(index=genes))
    return {"umap": _fig_to_data_uri(pl.embedding(cells, color=["true cell type", "zero-shot prediction"],
                                                  seed=seed)),
            "confusion": _fig_to_data_uri(pl.confusion_matrix(cells, truth="true cell type",
                                                              pred="zero-shot prediction")),
            "generated": _fig_to_data_uri(pl.real_vs_generated(real_ad, gen_ad, label_key="cell type", seed=seed))}
