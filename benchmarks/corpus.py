"""Build the pre-training corpus of issue 18 from every labelled human dataset of the workspace
(``../shared/data``, or ``$SCMMGPT_SHARED_DATA``) plus the bundled pbmc68k_reduced, and print what
went in and what was left out per dataset. Writes ``benchmarks/results/corpus/corpus.json``.

    python benchmarks/corpus.py --out runs/corpus
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from scmmgpt.data.corpus import CorpusEntry, build_corpus

HUMAN = ["pbmc3k_clustifyr", "soupx_pbmc4k", "symphony_pbmcs_small", "muscat_kang_se", "cider_baron_pancreas",
         "cluey_mouse_lung"]   # the mouse lung is listed so the record shows it skipped, with its reason


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/corpus")
    ap.add_argument("--cells-per-shard", type=int, default=5000)
    args = ap.parse_args()
    shared = Path(os.environ.get("SCMMGPT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    entries = [CorpusEntry("pbmc68k_reduced")] + [CorpusEntry(str(shared / f"{n}.h5ad")) for n in HUMAN]
    t0 = time.perf_counter()
    info = build_corpus(entries, args.out, cells_per_shard=args.cells_per_shard, progress=True)
    seconds = time.perf_counter() - t0
    print(f"{'dataset':24s} {'cells':>6s} {'kept':>6s} {'ambig.':>6s} {'unres.':>6s} {'organism':>8s} "
          f"{'types':>5s} {'genes':>6s}")
    for r in info["datasets"]:
        if "skipped" in r:
            print(f"{r['name']:24s} {r['n_cells']:6d}  skipped: {r['skipped']}")
            continue
        print(f"{r['name']:24s} {r['n_cells']:6d} {r['n_kept']:6d} {r['left_out_ambiguous']:6d} "
              f"{r['left_out_unresolved']:6d} {r['left_out_organism']:8d} {len(r['types']):5d} "
              f"{r['n_measured_genes']:6d}")
    types = sorted({t for r in info["datasets"] for t in r.get("types", {})})
    print(f"corpus: {info['n_cells']} cells, {info['n_genes']} genes, {len(types)} CL types, {seconds:.0f} s")
    res = Path(__file__).parent / "results" / "corpus"
    res.mkdir(parents=True, exist_ok=True)
    (res / "corpus.json").write_text(json.dumps({**info, "seconds": round(seconds, 1), "cl_types": types}, indent=1))


if __name__ == "__main__":
    main()
