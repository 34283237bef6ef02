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
import torch

from ..data.dataset import tokenize_for_lm
from ..eval.cells import expression_pca, knn_accuracy
from ..eval.text import text_metrics
from ..inference import encode_dataset, encode_texts, evaluation_mode, iter_batches, topk_accuracy, zero_shot_scores
from ..train.run import DataConfig, load_labelled, load_run_config
from ..utils.io import atomic_write_text
from ._train import train_two_stages

__all__ = ["DemoSettings", "run_demo"]


@dataclass
class DemoSettings:
    """Schedule sizes. ``fast`` is the CI setting (about a minute); the default fits ~10 min on 2 cores."""

    stage1_steps: int = 150
    stage2_steps: int = 60
    stage2_batch: int = 8
    t2c_warmup_steps: int = 300
    """Text-to-cell warm-up steps on cached LM states before the joint stage-2 steps."""
    n_describe: int = 24
    max_new_tokens: int = 32

    @classmethod
    def fast(cls) -> "DemoSettings":
        return cls(stage1_steps=8, stage2_steps=4, stage2_batch=4, t2c_warmup_steps=20, n_describe=4,
                   max_new_tokens=16)


def _fig_to_data_uri(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _umap(x: np.ndarray, seed: int) -> np.ndarray:
    import umap

    n = len(x)
    return umap.UMAP(n_neighbors=min(15, max(2, n - 1)), random_state=seed, n_jobs=1,
                     init="random" if n < 20 else "spectral"
                     ).fit_transform(x)


def _scatter(ax, xy, labels, title, categories):
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab20")
    for i, c in enumerate(categories):
        m = np.asarray(labels) == c
        if m.any():
            ax.scatter(xy[m, 0], xy[m, 1], s=10, color=cmap(i % 20), label=c)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])


def _report_figures(emb_xy, truth, pred, labels, cm, real_gen_xy, real_gen_kind, real_gen_labels) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = {}
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    _scatter(axes[0], emb_xy, truth, "true cell type", labels)
    _scatter(axes[1], emb_xy, pred, "zero-shot prediction", labels)
    axes[1].legend(loc="center left", bbox_to_anchor=(1, 0.5), fontsize=7, markerscale=2)
    figs["umap"] = _fig_to_data_uri(fig)

    fig, ax = plt.subplots(figsize=(7, 6))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if cm[i, j]:
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    figs["confusion"] = _fig_to_data_uri(fig)

    fig, ax = plt.subplots(figsize=(7, 5))
    cmap = plt.get_cmap("tab20")
    for i, c in enumerate(labels):
        for kind, marker, size in (("real", "o", 8), ("generated", "*", 160)):
            m = (np.asarray(real_gen_labels) == c) & (np.asarray(real_gen_kind) == kind)
            if m.any():
                ax.scatter(real_gen_xy[m, 0], real_gen_xy[m, 1], s=size, marker=marker, color=cmap(i % 20),
                           edgecolors="black" if kind == "generated" else "none", linewidths=0.6,
                           label=c if kind == "real" else None)
    ax.set_title("real test cells (dots) and generated pseudo-cells (stars)")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="center left", bbox_to_anchor=(1, 0.5), fontsize=7, markerscale=1.5)
    figs["generated"] = _fig_to_data_uri(fig)
    return figs


def _html(metrics: dict, figs: dict[str, str], examples: list[dict]) -> str:
    def table(d: dict) -> str:
        return "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in d.items())

    rows = "".join(
        f"<tr><td>{html.escape(e['cell_type'])}</td><td>{html.escape(e['generated'])}</td>"
        f"<td>{html.escape(e['reference'])}</td></tr>" for e in examples)
    a, d, g = metrics["annotation"], metrics["description"], metrics["generation"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>scMMGPT demo report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}table{{border-collapse:collapse;margin:1em 0}}
th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top;font-size:13px}}img{{max-width:100%}}</style>
</head><body><h1>scMMGPT demo report</h1>
<p>Data: {html.escape(metrics['data'])}. All figures are on <b>{metrics['split']['test']} held-out test cells</b>
never used in training. Chance level for annotation: {metrics['chance_acc1']:.3f}.</p>
<table>{table({'zero-shot Acc@1': f"{a['acc1']:.3f}", 'zero-shot Acc@3': f"{a['acc3']:.3f}",
              'macro F1': f"{a['macro_f1']:.3f}", 'BLEU-2': f"{d['bleu2']:.3f}", 'ROUGE-2': f"{d['rouge2']:.3f}",
              'descriptions naming the right type': f"{d['type_named']:.3f}",
              'pseudo-cell k-NN accuracy': f"{g['knn_accuracy']:.3f}"})}</table>
<h2>Cell embeddings (UMAP)</h2><img src="{figs['umap']}">
<h2>Zero-shot annotation: confusion matrix</h2><img src="{figs['confusion']}">
<h2>Generated descriptions</h2><table><tr><th>true type</th><th>generated</th><th>reference</th></tr>{rows}</table>
<h2>Text-to-cell generation</h2><img src="{figs['generated']}">
<h2>Run</h2><table>{table({'stage 1': metrics['training']['stage1'], 'stage 2': metrics['training']['stage2'],
                           'seconds': metrics['seconds']})}</table>
</body></html>"""


def run_demo(*, data: str | None = None, label_key: str = "cell_type", layer: str | None = None,
             use_raw: bool = False, out: str = "demo_report", fast: bool = False, seed: int = 0,
             settings: DemoSettings | None = None, progress: bool = True) -> dict:
    """Train on ``data`` (default: bundled pbmc68k_reduced) and report on held-out cells.

    Returns the metrics (also written to ``{out}/metrics.json``) with ``report`` and ``model`` paths.
    """
    from sklearn.metrics import confusion_matrix, f1_score

    from ..models.scmmgpt import ScMMGPT

    t0 = time.perf_counter()
    s = settings or (DemoSettings.fast() if fast else DemoSettings())
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rc = load_run_config("cpu-small", [f"train.seed={seed}"])
    lab = load_labelled(DataConfig(path=data, label_key=label_key, layer=layer, use_raw=use_raw,
                                   split=(0.7, 0.1, 0.2), seed=seed), target_sum=rc.model.target_sum)
    model = ScMMGPT.build(rc.model, lab.vocab, with_lm=True)
    mc = model.config
    t_setup = time.perf_counter() - t0

    # ---- training: stage 1 then stage 2 on the same model object
    r1, r2 = train_two_stages(model, lab, rc, stage1_steps=s.stage1_steps, stage2_steps=s.stage2_steps,
                              stage2_batch=s.stage2_batch, t2c_warmup_steps=s.t2c_warmup_steps, progress=progress,
                              out_dir=out_dir)
    t_s1, t_s2 = r1["seconds"], r2["seconds"]
    model.save_pretrained(out_dir / "model")
    if not fast and settings is None:
        # the full demo's model becomes the default of `scmmgpt generate/annotate/...` without --model
        from ..assets import set_default_model

        set_default_model(out_dir / "model")
    atomic_write_text(out_dir / "split.json", json.dumps({k: lab.cells.obs_names[v].tolist()
                                                          for k, v in lab.split.items()}))

    # ---- zero-shot annotation over the dataset's label names, on test cells
    desc = lab.descriptions
    test = lab.split["test"]
    test_ds = lab.dataset("test", max_genes=mc.max_genes, with_targets=True)
    usable = ~desc["ambiguous"].to_numpy()
    labels = sorted({str(t) for t in desc["cell_type"][usable]})
    label_text = dict(zip(labels, lab.label_texts(labels)))
    truth_names = desc["cell_type"].astype(str).to_numpy()[test]
    truth = np.array([labels.index(t) for t in truth_names])
    cell_feats = encode_dataset(model, test_ds)
    scores = zero_shot_scores(cell_feats, encode_texts(model, [label_text[lab_] for lab_ in labels]))
    pred = scores.argmax(1)
    pred_names = np.array(labels)[pred]
    annotation = {"acc1": topk_accuracy(scores, truth, 1), "acc3": topk_accuracy(scores, truth, 3),
                  "macro_f1": float(f1_score(truth, pred, average="macro", labels=np.unique(truth))),
                  "n_labels": len(labels)}
    cm = confusion_matrix(truth, pred, labels=range(len(labels)))

    # ---- descriptions for a sample of test cells
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(test), size=min(s.n_describe, len(test)), replace=False))
    generated: list[str] = []
    with evaluation_mode(model):
        for batch in iter_batches(model, test_ds, 8, indices=sample):
            generated += model.generate_text(batch, max_new_tokens=s.max_new_tokens)
    refs = [str(desc["description"].iloc[test[i]]) for i in sample]
    # references are cut to the same number of LM tokens the model may generate
    tok = model.lm_tokenizer
    refs_cut = [tok.decode(tok(r, add_special_tokens=False)["input_ids"][: s.max_new_tokens]) for r in refs]
    description = text_metrics(generated, refs_cut)
    description["type_named"] = float(np.mean([g.lower().startswith(truth_names[i].lower())
                                               for g, i in zip(generated, sample)]))
    description["n"] = len(sample)
    examples = [{"cell_type": str(truth_names[i]), "generated": g, "reference": r}
                for g, i, r in zip(generated, sample, refs_cut)]

    # ---- pseudo-cells from each label's description vs the real test cells
    ids, mask = tokenize_for_lm(model.lm_tokenizer, [label_text[lab_] for lab_ in labels], mc.lm.max_text_len)
    with evaluation_mode(model):
        pseudo = model.generate_cells(ids, mask).numpy()
    meas = lab.cells.measured
    real = lab.cells.expr[test].toarray()
    pca = expression_pca(real[:, meas], 50)
    knn = knn_accuracy(real[:, meas], truth_names, pseudo[:, meas], labels, k=5, transform=pca)
    generation = {"knn_accuracy": knn, "n_generated": len(labels), "k": 5}
    t_eval = time.perf_counter() - t0 - t_setup - t_s1 - t_s2

    # ---- report
    both = pca(np.concatenate([real[:, meas], pseudo[:, meas]]))
    figs = _report_figures(_umap(cell_feats.embedding(), seed), truth_names, pred_names, labels, cm,
                           _umap(both, seed), ["real"] * len(real) + ["generated"] * len(pseudo),
                           list(truth_names) + labels)
    metrics = {
        "data": lab.source, "cells": int(len(desc)), "split": {k: int(len(v)) for k, v in lab.split.items()},
        "chance_acc1": 1.0 / len(labels), "annotation": annotation, "description": description,
        "generation": generation,
        "training": {
            "stage1": {"steps": r1["steps"], "cells_per_s": round(r1["cells_per_s"], 2),
                       **{k: round(v, 4) for k, v in r1["validation"].items()}},
            "stage2": {"steps": r2["steps"], "cells_per_s": round(r2["cells_per_s"], 2),
                       "t2c_warmup": r2["t2c_warmup"],
                       **{k: round(v, 4) for k, v in r2["history"][-1].items() if k in ("cdgen", "pcgen")}},
        },
        "settings": {"fast": fast, **s.__dict__},
        "seconds": {"setup": round(t_setup, 1), "stage1": round(t_s1, 1), "stage2": round(t_s2, 1),
                    "evaluation": round(t_eval, 1), "total": round(time.perf_counter() - t0, 1)},
    }
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    atomic_write_text(out_dir / "report.html", _html(metrics, figs, examples))
    return {**metrics, "report": str(out_dir / "report.html"), "model": str(out_dir / "model")}
