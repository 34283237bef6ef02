"""``scmmgpt benchmark clustering``: how well each embedding of held-out cells clusters by cell type
and mixes batches (the later version of the paper, "Language-Enhanced Representation Learning for
Single-Cell Transcriptomics", judges the model on clustering).

Per dataset and seed:

1. split the cells (stratified by type, as every protocol here), train stage 1 (CTC + CTM) on the
   training cells and embed the **test** cells, which no method saw: scMMGPT's ``<cls>`` state
   (the cell encoder alone) and its aligned embedding (the contrastive features, the space cells
   and texts meet in);
2. beside it, on the same test cells: PCA (50) of log-normalised expression, fitted on the training
   cells, and scVI (Lopez et al. 2018, ``scvi-tools``), trained on the training cells' counts with
   the batch as covariate on a CPU-sized schedule (``scvi_epochs``), then encoding the test cells;
3. Leiden clusters (scanpy, igraph flavour) on each embedding's 15-nearest-neighbour graph: ARI and
   NMI against the labels at a fixed resolution and at the best of a grid (the best by NMI, as
   scIB's ``nmi_ari_cluster_labels_leiden`` picks it);
4. the scIB metrics (Luecken et al. 2022, Nat. Methods 19:41) through the maintained
   ``scib-metrics`` package's ``Benchmarker``: bio conservation (isolated labels, k-means NMI / ARI,
   label silhouette, cLISI) and, where the data has more than one batch, batch correction (BRAS,
   iLISI, kBET, graph connectivity, PCR against the PCA of the unintegrated data), aggregated as
   scIB does (total = 0.6 bio + 0.4 batch), without min-max scaling across methods so that a
   figure does not depend on which other methods are in the table.

Figures are mean ± sd over ``seeds`` (split, model and scVI seed together).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..utils.io import atomic_write_text
from .benchmark import FAST_OVERRIDES, machine_info, provenance_lines

__all__ = ["ClusteringBenchmark", "run_clustering_benchmark", "leiden_scores", "EMBEDDINGS"]

#: Embeddings compared, in table order.
EMBEDDINGS = ("scMMGPT aligned", "scMMGPT <cls>", "PCA (50) of log-normalised expression", "scVI")


@dataclass
class ClusteringBenchmark:
    """Settings of the clustering protocol. ``fast()`` is the CI setting."""

    datasets: tuple[str, ...]
    """``.h5ad`` files (counts) with a label column and, for batch correction, a batch column."""
    label_key: str = "cell_type"
    batch_key: str = "batch"
    """obs column of batches; a dataset without it (or with one batch) is scored on bio conservation only."""
    steps: int = 300
    """Stage-1 steps of scMMGPT on each dataset's training cells."""
    scvi_epochs: int = 100
    split: tuple[float, float, float] = (0.7, 0.1, 0.2)
    seeds: tuple[int, ...] = (0, 1, 2)
    resolutions: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0)
    """Leiden resolutions of the grid; the fixed one is ``fixed_resolution``."""
    fixed_resolution: float = 1.0
    config: str = "cpu-small"
    overrides: list[str] = field(default_factory=list)
    scib: bool = True
    """Compute the scIB metrics (``scib-metrics``)."""

    @classmethod
    def fast(cls, datasets, **kw) -> "ClusteringBenchmark":
        kw["overrides"] = [*FAST_OVERRIDES, *kw.get("overrides", [])]
        return cls(tuple(datasets), **{"steps": 4, "scvi_epochs": 2, "seeds": (0,), "resolutions": (0.5, 1.0), **kw})


def leiden_scores(embedding: np.ndarray, labels, *, resolutions, fixed: float, seed: int = 0) -> dict:
    """ARI / NMI of Leiden clusters of ``embedding``'s 15-NN graph against ``labels``, per
    resolution, at ``fixed`` and at the resolution with the best NMI."""
    import anndata as ad
    import scanpy as sc
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    a = ad.AnnData(np.zeros((len(embedding), 1), dtype=np.float32))
    a.obsm["X_emb"] = np.asarray(embedding, dtype=np.float32)
    sc.pp.neighbors(a, n_neighbors=15, use_rep="X_emb", random_state=seed)
    labels = np.asarray(labels).astype(str)
    grid = sorted({*resolutions, fixed})
    per = {}
    for r in grid:
        sc.tl.leiden(a, resolution=r, key_added="leiden", flavor="igraph", n_iterations=2, directed=False,
                     random_state=seed)
        clusters = a.obs["leiden"].to_numpy()
        per[r] = {"ari": float(adjusted_rand_score(labels, clusters)),
                  "nmi": float(normalized_mutual_info_score(labels, clusters)),
                  "n_clusters": int(len(set(clusters)))}
    best = max(grid, key=lambda r: per[r]["nmi"])
    return {"fixed": {"resolution": fixed, **per[fixed]}, "best": {"resolution": best, **per[best]},
            "per_resolution": {str(r): v for r, v in per.items()}}


def _scib(embeddings: dict[str, np.ndarray], labels, batches, pca_unintegrated: np.ndarray) -> dict:
    """scib-metrics' ``Benchmarker`` over ``embeddings`` of the same cells: each metric, and the
    bio / batch / total aggregates (no min-max scaling)."""
    import anndata as ad
    from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation

    n_batches = len(set(batches))
    a = ad.AnnData(np.zeros((len(labels), 1), dtype=np.float32))
    a.obs["label"] = np.asarray(labels).astype(str)
    a.obs["batch"] = np.asarray(batches).astype(str)
    a.obsm["X_pca_unintegrated"] = pca_unintegrated.astype(np.float32)
    keys = {}
    for i, (name, x) in enumerate(embeddings.items()):
        keys[f"emb{i}"] = name
        a.obsm[f"emb{i}"] = np.asarray(x, dtype=np.float32)
    bm = Benchmarker(a, batch_key="batch", label_key="label", embedding_obsm_keys=list(keys),
                     bio_conservation_metrics=BioConservation(),
                     batch_correction_metrics=BatchCorrection() if n_batches > 1 else None,
                     pre_integrated_embedding_obsm_key="X_pca_unintegrated", n_jobs=1, progress_bar=False)
    bm.benchmark()
    df = bm.get_results(min_max_scale=False)
    kinds = df.loc["Metric Type"] if "Metric Type" in df.index else None
    out = {}
    for key, name in keys.items():
        row = df.loc[key]
        out[name] = {str(col): float(row[col]) for col in df.columns}
        if n_batches == 1:                  # nothing to correct: the total is the bio conservation
            out[name]["Batch correction"] = float("nan")
            out[name]["Total"] = out[name]["Bio conservation"]
    if kinds is not None:
        out["_metric_types"] = {str(col): str(kinds[col]) for col in df.columns}
    return out


def _scvi_embedding(counts_train, counts_test, batch_train, batch_test, *, epochs: int, seed: int) -> np.ndarray:
    """scVI latent means of the test cells, from a model trained on the training cells."""
    import anndata as ad
    import scvi

    scvi.settings.seed = seed
    train = ad.AnnData(counts_train.astype(np.float32))
    train.obs["batch"] = np.asarray(batch_train).astype(str)
    scvi.model.SCVI.setup_anndata(train, batch_key="batch")
    m = scvi.model.SCVI(train, n_latent=10)
    m.train(max_epochs=epochs, accelerator="cpu", devices=1, enable_progress_bar=False, early_stopping=False,
            check_val_every_n_epoch=None, train_size=1.0)
    test = ad.AnnData(counts_test.astype(np.float32))
    test.obs["batch"] = np.asarray(batch_test).astype(str)
    return m.get_latent_representation(test)


def _one(b: ClusteringBenchmark, path: str, seed: int, progress: bool) -> dict:
    import scanpy as sc
    import scipy.sparse as sp
    from sklearn.decomposition import PCA

    from ..data.io import read_h5ad
    from ..data.labelled import DataConfig
    from .benchmark import train_stage1

    t = time.perf_counter()
    model, lab, _ = train_stage1(b.config, b.overrides, seed, b.steps,
                                 DataConfig(path=path, label_key=b.label_key, split=b.split, seed=seed),
                                 progress=progress)
    train, test = lab.split["train"], lab.split["test"]
    feats = model.encode(lab.dataset("test", **model.reading))
    # the raw counts of the same cells, for scVI, and their batches
    adata = read_h5ad(path)
    rows = lab.cells.cell_index
    obs = adata.obs.iloc[rows]
    batches = (obs[b.batch_key].astype(str).to_numpy() if b.batch_key in obs else np.array(["all"] * len(rows)))
    counts = sp.csr_matrix(adata.X)[rows]
    types = lab.descriptions["cell_type"].astype(str).to_numpy()
    expr = lab.cells.expr[:, lab.cells.measured]
    pca = PCA(50, random_state=seed).fit(expr[train].toarray())
    emb = {"scMMGPT aligned": feats.embedding(), "scMMGPT <cls>": feats.cell_embedding.numpy(),
           "PCA (50) of log-normalised expression": pca.transform(expr[test].toarray())}
    t_model = time.perf_counter() - t
    emb["scVI"] = _scvi_embedding(counts[train], counts[test], batches[train], batches[test],
                                  epochs=b.scvi_epochs, seed=seed)
    t_scvi = time.perf_counter() - t - t_model
    leiden = {k: leiden_scores(v, types[test], resolutions=b.resolutions, fixed=b.fixed_resolution, seed=seed)
              for k, v in emb.items()}
    rec = {"seed": seed, "n_test_cells": int(len(test)), "n_types": int(len(set(types[test]))),
           "n_batches": int(len(set(batches[test]))), "leiden": leiden}
    if b.scib:
        # PCR compares with the unintegrated data's PCA of the same cells (scIB's pre-integration input)
        unint = sc.pp.pca(expr[test].toarray().astype(np.float32), n_comps=min(50, len(test) - 1))
        rec["scib"] = _scib(emb, types[test], batches[test], unint)
    rec["seconds"] = {"scmmgpt": round(t_model, 1), "scvi": round(t_scvi, 1), "total": round(time.perf_counter() - t, 1)}
    return rec


def _fmt(values: list[float]) -> str:
    """``mean ± sd`` over seeds (``–`` where undefined: batch correction of one batch)."""
    v = np.asarray(values, dtype=float)
    if not np.isfinite(v).all():
        return "–"
    return f"{v.mean():.3f}" if len(v) == 1 else f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"


def _require_bench_extras() -> None:
    import importlib.util

    from ..errors import ConfigError

    missing = [pkg for mod, pkg in (("scib_metrics", "scib-metrics"), ("scvi", "scvi-tools"), ("leidenalg", "leidenalg"))
               if importlib.util.find_spec(mod) is None]
    if missing:
        raise ConfigError(f"The clustering benchmark needs {missing}: pip install 'scmmgpt[bench]'.")


def run_clustering_benchmark(b: ClusteringBenchmark, out: str | Path, *, progress: bool = False,
                             command: str | None = None) -> dict:
    _require_bench_extras()
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for path in b.datasets:
        results[Path(path).stem] = [_one(b, path, seed, progress) for seed in b.seeds]
    record = {"protocol": "clustering", "settings": {**asdict(b), "datasets": list(b.datasets)}, "command": command,
              "machine": machine_info(), "seconds": {"total": round(time.perf_counter() - t0, 1)}, "results": results}
    atomic_write_text(out / "results.json", json.dumps(record, indent=2))
    atomic_write_text(out / "results.md", "\n".join(clustering_table(record)) + "\n")
    return record


def clustering_table(record: dict) -> list[str]:
    s = record["settings"]
    lines = [f"**Clustering** of held-out test cells (stage 1, {s['steps']} steps, on each dataset's training cells; "
             f"PCA fitted and scVI ({s['scvi_epochs']} epochs, batch as covariate) trained on the same training cells). "
             f"Leiden on the 15-NN graph: ARI / NMI at resolution {s['fixed_resolution']} and at the best of "
             f"{list(s['resolutions'])} by NMI. scIB metrics by `scib-metrics`, not min-max scaled; total = 0.6 bio + "
             f"0.4 batch (bio only where the data has one batch). Mean ± sd over seeds {list(s['seeds'])}.", "",
             "| data | embedding | ARI (fixed) | NMI (fixed) | ARI (best) | NMI (best) | scIB bio | scIB batch | "
             "scIB total |", "|---|---|---|---|---|---|---|---|---|"]
    for name, runs in record["results"].items():
        for emb in EMBEDDINGS:
            cells = [_fmt([r["leiden"][emb][w][m] for r in runs]) for w in ("fixed", "best") for m in ("ari", "nmi")]
            sc = [_fmt([r["scib"][emb].get(col, float("nan")) for r in runs]) if "scib" in runs[0] else "–"
                  for col in ("Bio conservation", "Batch correction", "Total")]
            lines.append(f"| {name} | {emb} | " + " | ".join(cells + sc) + " |")
    lines += ["", *provenance_lines(record)]
    return lines
