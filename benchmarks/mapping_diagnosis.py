"""Would query-side fine-tuning (scArches' idea) recover the accuracy lost in reference mapping?

The mapping table shows symphony 3'v1 -> 5' losing accuracy against a logistic regression. A
query-side step can only move the query's cells as a whole relative to the fixed reference space
(scArches adapts batch weights; the least such a step achieves is removing the query's offset).
Per seed, on the model the mapping protocol trains (stage 1 on every source cell,
``tasks.benchmark.train_stage1``), in the aligned and the ``<cls>`` space and, as a reference, in a
PCA (50) of log-normalised expression fitted on the source:

* ``transfer``: k-NN (k=15, cosine) votes of the source cells, scored at the target's Cell
  Ontology resolution. The vote here is an unweighted majority (``knn_vote`` below), where
  ``tl.transfer_labels`` weights each neighbour by its similarity, so its figures sit near, not on,
  the mapping table's;
* ``transfer_centred``: the same after each side's mean is removed;
* ``transfer_moved``: the same with the query moved onto the reference (``mean(reference) -
  mean(query)`` added to each query cell; the reference untouched): ``tl.transfer_labels(...,
  move_query=True)``, the least a query-side step does;
* ``target_loo``: leave-one-out k-NN among the target cells with their own labels: how well the
  space separates the target's types at all, the ceiling of any query-side alignment that keeps
  the space.

Run: ``python benchmarks/mapping_diagnosis.py [--steps 120] [--seeds 0 1 2]``; writes
``benchmarks/results/mapping_diagnosis/results.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SHIFT = "symphony_pbmcs_small.h5ad:batch=3pv1>symphony_pbmcs_small.h5ad:batch=5p"


def _unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_vote(ref, ref_labels, query, k=15, exclude_self=False):
    sim = _unit(query) @ _unit(ref).T
    if exclude_self:
        np.fill_diagonal(sim, -np.inf)
    nn = np.argsort(-sim, axis=1)[:, :k]
    out = []
    for row in nn:
        vals, counts = np.unique(ref_labels[row], return_counts=True)
        out.append(vals[np.argmax(counts)])
    return np.asarray(out, dtype=object)


def one(seed: int, steps: int, data_dir: Path, work: Path) -> dict:
    import anndata as ad
    import scipy.sparse as sp
    from sklearn.decomposition import PCA

    from scmmgpt import tl
    from scmmgpt.data.labelled import DataConfig
    from scmmgpt.tasks.benchmark import train_stage1
    from scmmgpt.tasks.shift import _subset_file, parse_shift, to_target_labels

    s = parse_shift(SHIFT, data_dir)
    src_f = _subset_file(s.source, s.source_where, "cell_type", work, f"{seed}.source")
    tgt_f = _subset_file(s.target, s.target_where, "cell_type", work, f"{seed}.target")
    t0 = time.perf_counter()
    model, _, _ = train_stage1("cpu-small", [], seed, steps,
                               DataConfig(path=src_f, label_key="cell_type", split=(1.0, 0.0, 0.0), seed=seed))
    train_s = time.perf_counter() - t0
    src, tgt = ad.read_h5ad(src_f), ad.read_h5ad(tgt_f)
    src = src[src.obs["cell_type"].notna().to_numpy()].copy()
    tgt = tgt[tgt.obs["cell_type"].notna().to_numpy()].copy()
    src_set = dict(zip(src.obs["cell_type"].astype(str), src.obs["cell_type_ontology_term_id"].astype(str)))
    tgt_set = dict(zip(tgt.obs["cell_type"].astype(str), tgt.obs["cell_type_ontology_term_id"].astype(str)))
    ys, yt = src.obs["cell_type"].astype(str).to_numpy(), tgt.obs["cell_type"].astype(str).to_numpy()
    for a in (src, tgt):
        tl.embed(a, model, min_coverage=0.3)
    genes = src.var_names.intersection(tgt.var_names)

    def lognorm(a):
        x = a[:, genes].X
        x = x.toarray() if sp.issparse(x) else np.asarray(x)
        return np.log1p(1e4 * x / np.maximum(x.sum(1, keepdims=True), 1))

    pca = PCA(50, random_state=seed).fit(lognorm(src))
    spaces = {"aligned": (src.obsm["X_scmmgpt_aligned"], tgt.obsm["X_scmmgpt_aligned"]),
              "cls": (src.obsm["X_scmmgpt"], tgt.obsm["X_scmmgpt"]),
              "pca": (pca.transform(lognorm(src)), pca.transform(lognorm(tgt)))}
    out = {"seed": seed, "train_s": round(train_s, 1), "n_source": int(src.n_obs), "n_target": int(tgt.n_obs)}
    for name, (xs, xt) in spaces.items():
        def acc(pred):
            return float(np.mean(to_target_labels(pred, src_set, tgt_set) == yt))

        out[name] = {
            "transfer": acc(knn_vote(xs, ys, xt)),
            "transfer_centred": acc(knn_vote(xs - xs.mean(0), ys, xt - xt.mean(0))),
            "transfer_moved": acc(knn_vote(xs, ys, xt - xt.mean(0) + xs.mean(0))),
            "target_loo": float(np.mean(knn_vote(xt, yt, xt, exclude_self=True) == yt)),
        }
        print(seed, name, out[name], flush=True)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mapping_diagnosis"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    runs = [one(seed, args.steps, Path(args.data_dir), out / "data") for seed in args.seeds]
    rec = {"shift": SHIFT, "steps": args.steps, "runs": runs,
           "command": "python benchmarks/mapping_diagnosis.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    (out / "results.json").write_text(json.dumps(rec, indent=2))
    print("\n| space | transfer | query moved onto the reference | both sides centred | target leave-one-out |")
    print("|---|---|---|---|---|")
    for name in ("aligned", "cls", "pca"):
        cells = []
        for key in ("transfer", "transfer_moved", "transfer_centred", "target_loo"):
            v = 100 * np.array([r[name][key] for r in runs])
            cells.append(f"{v.mean():.1f} ± {v.std():.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return rec


if __name__ == "__main__":
    main()
