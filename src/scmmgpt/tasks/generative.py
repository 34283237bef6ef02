"""The generative protocols of the paper on one dataset, with baselines beside scMMGPT.

One scMMGPT model is trained (stage 1 then stage 2, :func:`~scmmgpt.tasks._train.train_two_stages`)
on the training split, and a cell-sentence LM baseline (:mod:`scmmgpt.baselines.cell_sentence`,
C2S-style, the same LM and LoRA rank) is fine-tuned with the same budget: as many optimiser steps,
cells per step and directions per cell as scMMGPT's stage 2. Then, on held-out test cells:

``description`` (paper Tables 1 and 4)
    a seeded sample of test cells is described by each method; generated texts and references are
    cut to the same number of LM tokens (``max_new_tokens``); scored with BLEU-2, ROUGE-2, MMD and
    EMD between sentence embeddings, and the one-sided t-/KS-tests that each text is closer to its
    own reference than to another type's (:func:`~scmmgpt.eval.text.description_metrics`).
    Methods: scMMGPT; the cell-sentence LM (also the paper's Table 4 ablation "cell sentence
    instead of expression values"); logistic regression on log-normalised expression that emits the
    predicted type's description (a supervised reference); a random training cell's description.

``generation`` (paper Table 2)
    ``n_per_type`` pseudo-cells per cell type from the type's description, for each seed of
    ``generation_seeds``; a k-NN classifier fitted on the real test cells (PCA, 50 components, of
    eq.-1 values over the measured genes) calls each pseudo-cell's type; accuracy against the
    prompted type for k = 3, 5, 10, 25, mean ± sd over seeds. scMMGPT's predicted profile is made a
    cell by drawing reads at the test cells' median library size (multinomial, per seed); the
    cell-sentence LM samples sentences (top-p 0.95) mapped to values by C2S's rank fit. References:
    the type's mean training profile sampled the same way (supervised), the mean of its eq.-1 values
    sampled the same way (what eq. 6's squared error trains the generator towards: the ceiling of
    a perfectly trained scMMGPT here), and random training cells (chance).

``gene_sweep`` (paper Fig. 6)
    the trained model is given the top-k genes of each test cell, k = 2^5 .. 2^11, at inference
    (it was trained with ``model.max_genes``); zero-shot Acc@1 and the description metrics per k.

Output: ``results.json`` and ``results.md`` (and ``gene_sweep.png``), stamped with the command,
data, seed and machine.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..utils.io import atomic_write_text
from .benchmark import FAST_OVERRIDES, provenance_lines

__all__ = ["GenerativeBenchmark", "run_generative_benchmark", "generative_tables"]

PARTS = ("description", "generation", "gene_sweep")


@dataclass
class GenerativeBenchmark:
    """Settings of the generative protocols. ``fast()`` is the CI setting."""

    data: str
    """``.h5ad`` with counts in ``X`` and cell type labels."""
    label_key: str = "cell_type"
    parts: tuple[str, ...] = PARTS
    split: tuple[float, float, float] = (0.7, 0.1, 0.2)
    seed: int = 0
    config: str = "cpu-small"
    overrides: list[str] = field(default_factory=list)
    stage1_steps: int | None = None
    """Stage-1 steps; ``None``: the run config's ``train.max_steps`` (600 in ``cpu-small``, the demo's
    schedule), so the protocol trains what users train."""
    stage2_steps: int = 60
    stage2_batch: int = 8
    t2c_warmup_steps: int = 600
    t2c_final_steps: int = 200
    """Text-to-cell steps again after the joint stage-2 steps, on the final LM states."""
    n_describe: int = 48
    """Test cells described per method (and per gene count in the sweep)."""
    max_new_tokens: int = 32
    n_per_type: int = 10
    generation_seeds: tuple[int, ...] = (0, 1, 2)
    ks: tuple[int, ...] = (3, 5, 10, 25)
    gene_counts: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048)
    c2s_genes: int = 16
    """Genes per cell sentence of the baseline (C2S uses 100; each gene name is ~4 LM tokens, and
    on a CPU 16 keeps its fine-tuning to ~12 s per step, ~2.5x scMMGPT's stage-2 step)."""

    @classmethod
    def fast(cls, data: str, **kw) -> "GenerativeBenchmark":
        kw["overrides"] = [*FAST_OVERRIDES, *kw.get("overrides", [])]
        return cls(data, **{"stage1_steps": 6, "stage2_steps": 2, "stage2_batch": 2, "t2c_warmup_steps": 4, "t2c_final_steps": 2,
                            "n_describe": 4, "max_new_tokens": 8, "n_per_type": 2, "gene_counts": (32, 64),
                            "c2s_genes": 6, **kw})


def _describe(model, lab, idx: np.ndarray, max_genes: int, max_new_tokens: int) -> list[str]:
    from ..data.dataset import CellTextDataset
    from ..inference import iter_batches

    ds = CellTextDataset(lab.cells.subset(idx), cls_id=lab.vocab.cls_id, **{**model.reading, "max_genes": max_genes})
    out: list[str] = []
    for batch in iter_batches(model, ds, 8):       # describe runs in evaluation mode
        out += model.describe(batch, max_new_tokens=max_new_tokens)
    return out


def _library_sizes(lab, idx: np.ndarray) -> np.ndarray:
    from ..data.io import read_h5ad

    adata = read_h5ad(lab.source, backed=True)
    return np.asarray(adata.X[np.sort(lab.cells.cell_index[idx])].sum(1)).ravel()


def _logreg(lab, train: np.ndarray, test: np.ndarray, seed: int) -> np.ndarray:
    from ..baselines.reference import logistic_scores

    x = lab.cells.expr[:, lab.cells.measured]
    y = lab.descriptions["cell_type"].astype(str).to_numpy()
    labels = sorted(set(y[train]))
    return np.array(labels)[logistic_scores(x[train], y[train], x[test], labels, seed=seed).argmax(1)]


@dataclass
class _Trained:
    """What every protocol part reads: the trained model, the data and the shared samples."""

    b: GenerativeBenchmark
    model: object
    lab: object
    c2s: object
    candidates: object
    """The types as ``tl.annotate`` / ``tl.generate`` read them (name + CL definition): ``Candidates``."""
    types: np.ndarray
    sample: np.ndarray
    """Test cells described."""
    refs: list[str]

    @property
    def labels(self) -> list[str]:
        return list(self.candidates.names)

    @property
    def label_text(self) -> dict[str, str]:
        """Each type's text."""
        return dict(zip(self.candidates.names, self.candidates.texts))

    def score(self, texts: list[str]) -> dict:
        from ..eval.text import cut_to_tokens, description_metrics, type_named

        b, tok = self.b, self.model.lm_tokenizer
        truth = list(self.types[self.sample])
        m = description_metrics([cut_to_tokens(tok, t, b.max_new_tokens) for t in texts], self.refs, truth,
                                seed=b.seed)
        m["type_named"] = type_named(texts, truth)
        return m


def run_generative_benchmark(b: GenerativeBenchmark, out: str | Path, *, progress: bool = False,
                             command: str | None = None) -> dict:
    """Train, run the parts in ``b.parts`` and write ``{out}/results.json`` and ``results.md``."""
    unknown = set(b.parts) - set(PARTS)
    if unknown:
        raise ValueError(f"Unknown parts {sorted(unknown)}; choose from {PARTS}.")
    from .benchmark import machine_info

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx, r1, r2, c2s_losses, seconds = _train(b, out, progress)
    results: dict = {}
    parts = {"description": _part_description, "generation": _part_generation, "gene_sweep": _part_gene_sweep}
    for name in PARTS:
        if name in b.parts:
            t = time.perf_counter()
            results[name] = parts[name](ctx, out)
            seconds[name] = round(time.perf_counter() - t, 1)
    mc, lab, labels = ctx.model.config, ctx.lab, ctx.labels
    seconds["total"] = round(time.perf_counter() - t0, 1)
    record = {"protocol": "generative", "settings": {**asdict(b), "parts": list(b.parts)}, "command": command,
              "data": str(b.data), "n_types": len(labels), "labels": labels,
              "split": {k: int(len(v)) for k, v in lab.split.items()}, "lm": mc.lm.name,
              "training": {"stage1_steps": r1["steps"], "stage2_steps": r2["steps"], "c2s_steps": len(c2s_losses),
                           "c2s_loss_first_last": [c2s_losses[0], c2s_losses[-1]]},
              "machine": machine_info(), "seconds": seconds, "results": results}
    atomic_write_text(out / "results.json", json.dumps(record, indent=2))
    atomic_write_text(out / "results.md", generative_tables(record))
    return record


def _sweep_plot(rows: list[dict], trained: int, path: Path) -> None:
    from matplotlib.figure import Figure

    from ..utils.io import atomic_write_bytes

    x = [r["genes"] for r in rows]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for key, style in (("acc1", "o-"), ("bleu2", "s-"), ("rouge2", "^-")):
        ax.plot(x, [r[key] for r in rows], style, label=key)
    ax2 = ax.twinx()
    for key, style in (("mmd", "o--"), ("emd", "s--")):
        ax2.plot(x, [r[key] for r in rows], style, color="grey", label=key)
    ax.set_xscale("log", base=2)
    ax.axvline(trained, color="red", lw=0.8, ls=":")
    ax.set_xlabel(f"genes given at inference (trained with {trained})")
    ax.set_ylabel("accuracy / BLEU-2 / ROUGE-2")
    ax2.set_ylabel("MMD / EMD (dashed)")
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _f(x, pct: bool = True) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def generative_tables(record: dict) -> str:
    """Markdown: Table 1+4 (description), Table 2 (generation), Fig. 6 (gene sweep) layouts."""
    res = record["results"]
    lines = [f"Generative protocols on `{Path(record['data']).name}` ({record['split']['test']} test cells, "
             f"{record['n_types']} types; LM `{record['lm']}`).", ""]
    names = {"scmmgpt": "scMMGPT", "cell_sentence_lm": "cell-sentence LM (C2S-style; Table 4 ablation)",
             "logreg_template": "logreg → type description (supervised ref.)", "random": "random training description",
             "type_mean": "type mean profile (supervised ref.)",
             "type_log_mean": "type mean of eq.-1 values (eq. 6's optimum; supervised ref.)",
             "random_cells": "random training cells"}
    if "description" in res:
        d = res["description"]
        lines += [f"**Description generation** (Tables 1 + 4): {d['n_cells']} test cells, texts cut to "
                  f"{d['max_tokens']} LM tokens. BLEU-2/ROUGE-2 and 'type named' in %; MMD/EMD between MiniLM "
                  "sentence embeddings (lower is better); t / KS: one-sided tests that a text is closer to its own "
                  "reference than to another type's (statistic, p).", "",
                  "| method | BLEU-2 | ROUGE-2 | MMD | EMD | t (p) | KS (p) | type named |", "|---|---|---|---|---|---|---|---|"]
        for k, m in d["methods"].items():
            tt = f"{m['t_statistic']:.2f} ({m['t_pvalue']:.2g})" if "t_statistic" in m else "–"
            ks = f"{m['ks_statistic']:.2f} ({m['ks_pvalue']:.2g})" if "ks_statistic" in m else "–"
            lines.append(f"| {names.get(k, k)} | {_f(m['bleu2'])} | {_f(m['rouge2'])} | {_f(m['mmd'], False)} | "
                         f"{_f(m['emd'], False)} | {tt} | {ks} | {_f(m['type_named'])} |")
        lines.append("")
    if "generation" in res:
        g = res["generation"]
        ks = list(next(iter(g["methods"].values())).keys())
        lines += [f"**Pseudo-cell generation** (Table 2): {g['n_per_type']} cells per type per seed, seeds "
                  f"{g['seeds']}; k-NN accuracy (%) of the prompted type, mean ± sd over seeds; feature space: "
                  f"{g['feature_space']}; reads drawn at library size {g['library_size']}. The cell-sentence LM "
                  f"named real genes in {100 * g['c2s_valid_gene_fraction']:.0f}% of its generated words.", "",
                  "| method | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
        for k, m in g["methods"].items():
            lines.append(f"| {names.get(k, k)} | " + " | ".join(
                f"{100 * m[x]['mean']:.1f} ± {100 * m[x]['sd']:.1f}" for x in ks) + " |")
        lines += ["| chance (1 / types) | " + " | ".join(f"{100 / record['n_types']:.1f}" for _ in ks) + " |", ""]
    if "gene_sweep" in res:
        s = res["gene_sweep"]
        lines += [f"**Genes per cell** (Fig. 6): top-k genes given at inference to the model trained with "
                  f"{s['trained_max_genes']}; zero-shot Acc@1 on all test cells, description metrics on the sample.",
                  "", "| genes | Acc@1 | BLEU-2 | ROUGE-2 | MMD | EMD |", "|---|---|---|---|---|---|"]
        for r in s["rows"]:
            lines.append(f"| {r['genes']} | {_f(r['acc1'])} | {_f(r['bleu2'])} | {_f(r['rouge2'])} | "
                         f"{_f(r['mmd'], False)} | {_f(r['emd'], False)} |")
        lines.append("")
    lines += provenance_lines(record, ", ".join(f"{k} {v:.0f} s" for k, v in record["seconds"].items()
                                                 if k != "total"))
    return "\n".join(lines) + "\n"


def _train(b: GenerativeBenchmark, out: Path, progress: bool):
    """scMMGPT (two stages) and the cell-sentence LM on the same budget; the shared samples."""
    from ..baselines.cell_sentence import CellSentenceConfig, CellSentenceLM, cell_sentences
    from ..data.label_texts import candidate_labels
    from ..data.labelled import DataConfig, load_labelled
    from ..eval.text import cut_to_tokens
    from ..models.scmmgpt import ScMMGPT
    from ..train.run import load_run_config
    from ..utils.seed import seeded
    from ._train import train_two_stages

    rc = load_run_config(b.config, [f"train.seed={b.seed}", *b.overrides])
    rc.train.deterministic = True
    lab = load_labelled(DataConfig(path=b.data, label_key=b.label_key, split=b.split, seed=b.seed),
                        target_sum=rc.model.target_sum)
    with seeded(b.seed):
        model = ScMMGPT.build(rc.model, lab.vocab, with_lm=True)
    mc = model.config
    r1, r2 = train_two_stages(model, lab, rc, stage1_steps=b.stage1_steps or rc.train.max_steps,
                              stage2_steps=b.stage2_steps,
                              stage2_batch=b.stage2_batch, t2c_warmup_steps=b.t2c_warmup_steps, t2c_final_steps=b.t2c_final_steps, progress=progress,
                              validate=False)
    model.save_pretrained(out / "model")
    seconds = {"scmmgpt_stage1": round(r1["seconds"], 1), "scmmgpt_stage2": round(r2["seconds"], 1)}
    # the cell-sentence LM baseline, same LM, LoRA rank, steps, batch and directions as stage 2
    tr, test = lab.split["train"], lab.split["test"]
    names = np.asarray(lab.vocab.tokens, dtype=object)
    t = time.perf_counter()
    c2s = CellSentenceLM(mc.lm, CellSentenceConfig(n_genes=b.c2s_genes, steps=b.stage2_steps,
                                                   batch_size=b.stage2_batch, lr=2e-3,
                                                   warmup_steps=max(1, b.stage2_steps // 10),
                                                   max_text_len=mc.lm.max_text_len, seed=b.seed))
    desc_all = lab.descriptions["description"].astype(str).to_numpy()
    c2s_losses = c2s.fit(cell_sentences(lab.cells.rows_csr(tr), names, b.c2s_genes), list(desc_all[tr]),
                         progress=progress)
    seconds["c2s_finetune"] = round(time.perf_counter() - t, 1)
    cands = candidate_labels(labels=lab.label_set())
    rng = np.random.default_rng(b.seed)
    sample = np.sort(rng.choice(test, size=min(b.n_describe, len(test)), replace=False))
    refs = [cut_to_tokens(model.lm_tokenizer, t, b.max_new_tokens) for t in desc_all[sample]]
    ctx = _Trained(b, model, lab, c2s, cands, lab.types(), sample, refs)
    return ctx, r1, r2, c2s_losses, seconds


def _part_description(ctx: _Trained, out: Path) -> dict:
    """Tables 1 + 4: descriptions of test cells by scMMGPT, the cell-sentence LM, a logistic
    regression that names the type's text, and random training descriptions."""
    from ..baselines.cell_sentence import cell_sentences

    b, lab, sample = ctx.b, ctx.lab, ctx.sample
    tr = lab.split["train"]
    names = np.asarray(lab.vocab.tokens, dtype=object)
    desc_all = lab.descriptions["description"].astype(str).to_numpy()
    rng = np.random.default_rng(b.seed + 1)
    label_text = ctx.label_text
    gen = {"scmmgpt": _describe(ctx.model, lab, sample, ctx.model.config.max_genes, b.max_new_tokens),
           "cell_sentence_lm": ctx.c2s.describe(cell_sentences(lab.cells.rows_csr(sample), names, b.c2s_genes),
                                                max_new_tokens=b.max_new_tokens),
           "logreg_template": [label_text[p] for p in _logreg(lab, tr, sample, b.seed)],
           "random": list(desc_all[rng.choice(tr, size=len(sample))])}
    truth = ctx.types[sample]
    return {"n_cells": int(len(sample)), "max_tokens": b.max_new_tokens,
            "methods": {k: ctx.score(v) for k, v in gen.items()},
            "examples": [{"cell_type": str(truth[i]), "reference": ctx.refs[i], **{k: v[i] for k, v in gen.items()}}
                         for i in range(min(6, len(sample)))]}


def _part_generation(ctx: _Trained, out: Path) -> dict:
    """Table 2: pseudo-cells per type (scMMGPT, the cell-sentence LM, the type's mean profile,
    random training cells), k-NN accuracy against the real test cells over seeds."""
    from ..baselines.cell_sentence import RankToExpression
    from ..baselines.reference import type_mean_profiles
    from ..eval.cells import expression_pca, knn_accuracy_table
    from ..tl.generate import sample_cells

    b, lab, model, labels, types = ctx.b, ctx.lab, ctx.model, ctx.labels, ctx.types
    tr, test = lab.split["train"], lab.split["test"]
    names = np.asarray(lab.vocab.tokens, dtype=object)
    meas = lab.cells.measured
    real = lab.cells.rows_csr(test).toarray()[:, meas]
    pca = expression_pca(real, 50, seed=b.seed)
    lib = int(np.median(_library_sizes(lab, test)))
    gen_labels = np.repeat(labels, b.n_per_type)
    text = ctx.label_text
    prompts = [text[x] for x in gen_labels]
    expected = model.generate_cells([text[x] for x in labels])          # one profile per type
    expected = np.repeat(expected, b.n_per_type, axis=0)
    tr_expr = lab.cells.rows_csr(tr)
    type_mean = type_mean_profiles(tr_expr, types[tr], labels)
    type_mean = np.repeat(type_mean, b.n_per_type, axis=0)
    type_log_mean = np.repeat(type_mean_profiles(tr_expr, types[tr], labels, scale="log"), b.n_per_type, axis=0)
    r2e = RankToExpression.fit(tr_expr, b.c2s_genes)
    runs: dict[str, list[np.ndarray]] = {"scmmgpt": [], "cell_sentence_lm": [], "type_mean": [], "type_log_mean": [],
                                         "random_cells": []}
    c2s_valid = []

    def as_cells(profile: np.ndarray, seed: int) -> np.ndarray:
        return sample_cells(profile, model.config.target_sum, lib, np.random.default_rng(seed))[1]

    for s in b.generation_seeds:
        runs["scmmgpt"].append(as_cells(expected, s)[:, meas])
        sents = ctx.c2s.generate_sentences(prompts, seed=s, max_new_tokens=5 * b.c2s_genes + 8)
        prof, valid = r2e.profiles(sents, names)
        runs["cell_sentence_lm"].append(prof[:, meas])
        c2s_valid.append(valid)
        runs["type_mean"].append(as_cells(type_mean, s)[:, meas])
        runs["type_log_mean"].append(as_cells(type_log_mean, s)[:, meas])
        runs["random_cells"].append(tr_expr[np.random.default_rng(s).choice(len(tr), len(gen_labels))].toarray()[:, meas])
    return {"n_per_type": b.n_per_type, "seeds": list(b.generation_seeds), "library_size": lib,
            "feature_space": "PCA (50) of eq.-1 values of the measured genes, fitted on the real test cells",
            "c2s_valid_gene_fraction": float(np.mean(c2s_valid)),
            "methods": {k: {str(kk): vv for kk, vv in knn_accuracy_table(real, types[test], v, gen_labels, ks=b.ks,
                                                                       transform=pca).items()}
                        for k, v in runs.items()}}


def _part_gene_sweep(ctx: _Trained, out: Path) -> dict:
    """Fig. 6: zero-shot Acc@1 and description metrics with 2^5..2^11 genes per cell."""
    from ..data.dataset import CellTextDataset
    from ..eval.annotation import topk_accuracy

    b, lab, model, labels = ctx.b, ctx.lab, ctx.model, ctx.labels
    test = lab.split["test"]
    truth = np.array([labels.index(x) if x in labels else -1 for x in ctx.types[test]])
    keep = truth >= 0
    sweep = []
    for k in b.gene_counts:
        ds = CellTextDataset(lab.cells.subset(test), cls_id=lab.vocab.cls_id, **{**model.reading, "max_genes": int(k)})
        scores = model.score_labels(ds, ctx.candidates).scores
        row = {"genes": int(k), "acc1": topk_accuracy(scores[keep], truth[keep], 1)}
        row.update({m: v for m, v in ctx.score(_describe(model, lab, ctx.sample, int(k), b.max_new_tokens)).items()
                    if m in ("bleu2", "rouge2", "mmd", "emd", "type_named")})
        sweep.append(row)
    _sweep_plot(sweep, model.config.max_genes, out / "gene_sweep.png")
    return {"trained_max_genes": model.config.max_genes, "rows": sweep}
