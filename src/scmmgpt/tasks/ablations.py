"""Two views of the paper's ablations that need no language model.

``representation`` (paper Fig. 2, "the information loss of cell sentences"): two MLPs with
identical hyperparameters annotate cell types from

* *expression*: eq.-1 values (``log1p`` of counts per 10k) of every measured gene;
* *cell sentence*: only what a cell sentence keeps: the names of the cell's top-``k`` genes and
  their order, as a vector over the same genes holding ``1 - (rank - 1) / k`` for the named genes
  and 0 elsewhere (no expression values);

on the same stratified split, for each ``k`` (C2S-style sentences hold 30–100 genes) and seed;
test accuracy and macro-F1, mean ± sd over seeds.

``batch`` (paper Fig. 5): stage 1 is trained on a batch-effect dataset's training split, its
held-out test cells are embedded, and the embedding is scored by type and batch silhouettes
(:func:`~scmmgpt.eval.batch.silhouette_scores`) beside a PCA (50) of log-normalised expression;
UMAPs coloured by type and batch are written as PNG.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..utils.io import atomic_write_bytes, atomic_write_text
from .benchmark import FAST_OVERRIDES, provenance_lines

__all__ = ["RepresentationAblation", "run_representation_ablation", "sentence_features", "BatchView",
           "run_batch_view"]


def sentence_features(expr: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """What a cell sentence of ``k`` genes keeps: ``1 - (rank - 1) / k`` at each named gene (rank 1 =
    highest value; ties: lower column first), 0 elsewhere."""
    expr = sp.csr_matrix(expr)
    rows, cols, vals = [], [], []
    for i in range(expr.shape[0]):
        lo, hi = expr.indptr[i], expr.indptr[i + 1]
        c, v = expr.indices[lo:hi], expr.data[lo:hi]
        order = np.lexsort((c, -v))[:k]
        rows.append(np.full(len(order), i))
        cols.append(c[order])
        vals.append(1.0 - np.arange(len(order)) / k)
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=expr.shape,
                         dtype=np.float32)


@dataclass
class RepresentationAblation:
    data: str
    label_key: str = "cell_type"
    sentence_genes: tuple[int, ...] = (32, 100)
    seeds: tuple[int, ...] = (0, 1, 2)
    hidden: tuple[int, ...] = (256,)
    max_iter: int = 200
    split: tuple[float, float, float] = (0.7, 0.1, 0.2)

    @classmethod
    def fast(cls, data: str, **kw) -> "RepresentationAblation":
        return cls(data, **{"sentence_genes": (32,), "seeds": (0,), "max_iter": 10, **kw})


def run_representation_ablation(b: RepresentationAblation, out: str | Path, *, command: str | None = None) -> dict:
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.neural_network import MLPClassifier

    from ..data import stratified_split
    from ..data.labelled import DataConfig, load_labelled
    from .benchmark import machine_info

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    features = {"expression": None, **{f"cell_sentence_{k}": k for k in b.sentence_genes}}
    scores: dict[str, dict[str, list[float]]] = {name: {"accuracy": [], "macro_f1": []} for name in features}
    lab = load_labelled(DataConfig(path=b.data, label_key=b.label_key, split=b.split, seed=b.seeds[0]))
    y = lab.descriptions["cell_type"].astype(str).to_numpy()
    expr = lab.cells.expr[:, lab.cells.measured]
    for seed in b.seeds:
        # the same split load_labelled makes for this seed, without reading the data again
        split = stratified_split(lab.descriptions["cell_type"].to_numpy(), b.split, seed=seed,
                                 exclude=lab.descriptions["ambiguous"].to_numpy())
        tr, te = split["train"], split["test"]
        for name, k in features.items():
            x = expr if k is None else sentence_features(expr, k)
            clf = MLPClassifier(hidden_layer_sizes=b.hidden, max_iter=b.max_iter, random_state=seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.fit(x[tr], y[tr])
            pred = clf.predict(x[te])
            scores[name]["accuracy"].append(float(accuracy_score(y[te], pred)))
            scores[name]["macro_f1"].append(float(f1_score(y[te], pred, average="macro")))
    summary = {name: {m: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                          "runs": v} for m, v in s.items()} for name, s in scores.items()}
    record = {"protocol": "representation", "settings": asdict(b), "command": command, "data": str(b.data),
              "n_test_cells": int(len(te)), "machine": machine_info(),
              "seconds": {"total": round(time.perf_counter() - t0, 1)}, "results": summary}
    lines = [f"**Cell representation** (Fig. 2) on `{Path(b.data).name}`: MLP {list(b.hidden)} (identical "
             f"hyperparameters) on expression values vs on cell sentences (top-k gene names and their order "
             f"only); test accuracy and macro-F1 in %, mean ± sd over seeds {list(b.seeds)}.", "",
             "| input | accuracy | macro-F1 |", "|---|---|---|"]
    for name, s in summary.items():
        label = "expression values" if name == "expression" else f"cell sentence, top {name.rsplit('_', 1)[1]} genes"
        lines.append(f"| {label} | {100 * s['accuracy']['mean']:.1f} ± {100 * s['accuracy']['sd']:.1f} | "
                     f"{100 * s['macro_f1']['mean']:.1f} ± {100 * s['macro_f1']['sd']:.1f} |")
    lines += ["", *provenance_lines(record)]
    atomic_write_text(out / "results.json", json.dumps(record, indent=2))
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    return record


@dataclass
class BatchView:
    datasets: tuple[str, ...]
    """``.h5ad`` files with ``cell_type`` and ``batch`` columns."""
    label_key: str = "cell_type"
    batch_key: str = "batch"
    steps: int = 150
    split: tuple[float, float, float] = (0.7, 0.1, 0.2)
    seed: int = 0
    config: str = "cpu-small"
    overrides: list[str] = field(default_factory=list)

    @classmethod
    def fast(cls, datasets, **kw) -> "BatchView":
        kw["overrides"] = [*FAST_OVERRIDES, *kw.get("overrides", [])]
        return cls(tuple(datasets), **{"steps": 4, **kw})


def _umap_png(xys: dict[str, np.ndarray], types, batches, title: str) -> bytes:
    import io

    import matplotlib
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5 * len(xys)))
    axes = fig.subplots(len(xys), 2, squeeze=False)
    cmap = matplotlib.colormaps["tab10"]
    for row, (name, xy) in enumerate(xys.items()):
        for col, (lab, what) in enumerate(((types, "cell type"), (batches, "batch"))):
            ax = axes[row, col]
            for i, c in enumerate(sorted(set(lab))):
                m = np.asarray(lab) == c
                ax.scatter(xy[m, 0], xy[m, 1], s=4, color=cmap(i % 10), label=c)
            ax.set_title(f"{name}: {what}")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.legend(fontsize=6, markerscale=2, loc="best")
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()


def run_batch_view(b: BatchView, out: str | Path, *, progress: bool = False, command: str | None = None) -> dict:
    import umap
    from sklearn.decomposition import PCA

    from ..data.io import read_h5ad
    from ..data.labelled import DataConfig, load_labelled
    from ..eval.batch import silhouette_scores
    from ..models.scmmgpt import ScMMGPT
    from ..train.loop import fit
    from ..train.run import load_run_config
    from ..utils.seed import seeded
    from .benchmark import machine_info

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for path in b.datasets:
        t = time.perf_counter()
        rc = load_run_config(b.config, [f"train.seed={b.seed}", *b.overrides])
        cfg = rc.train
        cfg.stage, cfg.max_steps, cfg.progress, cfg.val_every, cfg.out_dir = "stage1", b.steps, progress, None, None
        cfg.warmup_steps, cfg.deterministic = min(cfg.warmup_steps, max(1, b.steps // 10)), True
        lab = load_labelled(DataConfig(path=path, label_key=b.label_key, split=b.split, seed=b.seed),
                            target_sum=rc.model.target_sum)
        with seeded(b.seed):
            model = ScMMGPT.build(rc.model, lab.vocab, with_lm=False)
        fit(model, lab.dataset("train", **model.reading), cfg)
        test = lab.split["test"]
        obs = read_h5ad(path, backed=True).obs.iloc[lab.cells.cell_index[test]]
        if b.batch_key not in obs:
            raise ValueError(f"{path} has no obs column {b.batch_key!r} (batch labels).")
        types = lab.descriptions["cell_type"].astype(str).to_numpy()[test]
        batches = obs[b.batch_key].astype(str).to_numpy()
        emb = {"scMMGPT": model.encode(lab.dataset("test", **model.reading)).embedding(),
               "PCA of log-normalised expression": PCA(50, random_state=b.seed).fit_transform(
                   lab.cells.expr[test][:, lab.cells.measured].toarray())}
        scores = {k: silhouette_scores(v, types, batches, seed=b.seed) for k, v in emb.items()}
        xys = {k: umap.UMAP(random_state=b.seed, n_jobs=1, metric="cosine").fit_transform(v) for k, v in emb.items()}
        name = Path(path).stem
        atomic_write_bytes(out / f"{name}_umap.png", _umap_png(xys, types, batches, name))
        results[name] = {"n_test_cells": int(len(test)), "n_types": int(len(set(types))),
                         "n_batches": int(len(set(batches))), "scores": scores, "umap": f"{name}_umap.png",
                         "seconds": round(time.perf_counter() - t, 1)}
    record = {"protocol": "batch", "settings": {**asdict(b), "datasets": list(b.datasets)}, "command": command,
              "machine": machine_info(), "seconds": {"total": round(time.perf_counter() - t0, 1)}, "results": results}
    lines = ["**Batch view** (Fig. 5): held-out test cells after stage 1 on the training split; silhouettes as in "
             "scIB (type ASW: higher = types separated; batch ASW: 1 = batches mixed within types).", "",
             "| data | cells | types | batches | embedding | type ASW | batch ASW |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for emb_name, s in r["scores"].items():
            lines.append(f"| {name} | {r['n_test_cells']} | {r['n_types']} | {r['n_batches']} | {emb_name} | "
                         f"{s['type_asw']:.3f} | {s.get('batch_asw', float('nan')):.3f} |")
    lines += ["", *provenance_lines(record)]
    atomic_write_text(out / "results.json", json.dumps(record, indent=2))
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    return record
