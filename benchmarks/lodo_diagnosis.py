"""Why a leave-one-dataset-out model misses on its left-out dataset: gene panels and label granularity.

It takes a stage-1 model pre-trained with one dataset left out (``scmmgpt benchmark annotation
... --pretrain-data runs/corpus``, folder ``OUT/pretrained``) and scores that dataset's test cells
(the benchmark's split) over its own labels, in two ways:

* through each gene panel of the corpus's other datasets: the evaluation file restricted to the
  genes that dataset measured (``full``: all its genes). If the accuracy changes with the panel,
  the model reads a cell differently depending on the genes its file holds;
* with and without the Cell Ontology back-off (``ScMMGPT.score_labels(backoff=)``).

    python benchmarks/lodo_diagnosis.py --model runs/lodo-pbmc3k/pretrained \\
        --data ../shared/data/pbmc3k_clustifyr.h5ad --corpus runs/corpus \\
        --record runs/lodo-pbmc3k/results.json --out benchmarks/results/recipe/lodo_panels.json

Prints one line per variant and writes JSON (Acc@1, Acc@3 and per-type Acc@1).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np


def _panels(corpus: Path, data: str) -> dict[str, set[str] | None]:
    """``full`` plus the measured genes of each corpus dataset that holds fewer genes than ``data``."""
    import anndata as ad

    from scmmgpt.data.vocab import GeneVocab

    vocab = GeneVocab.from_json(corpus / "vocab.json")
    info = json.loads((corpus / "corpus.json").read_text())
    n_data = ad.read_h5ad(data, backed="r").n_vars
    out: dict[str, set[str] | None] = {"full": None}
    for rec in info["datasets"]:
        if "skipped" in rec or rec.get("n_measured_genes", n_data) >= n_data:
            continue
        measured = np.load(corpus / "measured" / f"{rec['name']}.npy")
        out[rec["name"]] = {vocab.tokens[j] for j in np.flatnonzero(measured)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--split", type=float, nargs=3, default=(0.7, 0.1, 0.2))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--record", default=None,
                    help="the benchmark's results.json: its pretrain_types are recorded on a model saved before "
                         "models kept their trained types (needed for the back-off)")
    args = ap.parse_args()

    import anndata as ad

    from scmmgpt.data.labelled import DataConfig, load_labelled
    from scmmgpt.eval.annotation import annotation_metrics
    from scmmgpt.models.scmmgpt import ScMMGPT

    model = ScMMGPT.from_pretrained(args.model, with_lm=False)
    if args.record and not model.config.trained_types:
        model.record_trained_types(json.loads(Path(args.record).read_text())["pretrain_types"])
    full = ad.read_h5ad(args.data)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, genes in _panels(Path(args.corpus), args.data).items():
            a = full if genes is None else full[:, full.var_names.isin(sorted(genes))].copy()
            path = Path(tmp) / f"{name}.h5ad"
            a.write_h5ad(path)
            lab = load_labelled(DataConfig(path=str(path), split=tuple(args.split), seed=args.seed), vocab=model.vocab,
                                target_sum=model.config.target_sum)
            labels = lab.label_set()
            names = sorted(labels)
            truth = lab.types("test")
            ds = lab.dataset("test", **model.reading)
            for backoff in (False, True):
                scores = model.score_labels(ds, labels, backoff=backoff).scores
                m = annotation_metrics(scores, names, truth, ks=(1, 3))
                pred = np.array(names)[scores.argmax(1)]
                row = {"panel": name, "n_genes": int(a.n_vars), "backoff": backoff,
                       "acc@1": round(float(m["acc@1"]), 4), "acc@3": round(float(m["acc@3"]), 4),
                       "per_type_acc@1": {t: round(float((pred[truth == t] == t).mean()), 3) for t in names}}
                rows.append(row)
                print(f"{name:24s} {a.n_vars:6d} genes  backoff={backoff!s:5s}  Acc@1 {row['acc@1']:.3f}  "
                      f"Acc@3 {row['acc@3']:.3f}", flush=True)
    record = {"model": args.model, "data": args.data, "split": list(args.split), "seed": args.seed,
              "input_panel": len(model.config.input_genes) if model.config.input_genes else None, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
