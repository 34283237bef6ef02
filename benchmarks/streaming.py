"""Memory and speed of embedding from on-disk shards as the dataset grows (10k -> 1M cells).

For each size, a synthetic count matrix (real gene symbols, ~60 expressed genes per cell) is
written as ``.h5ad``, preprocessed with ``write_shards`` (backed read, one block at a time), and
embedded with ``inference.embed_to_disk`` (memory-mapped shards in, memory-mapped embeddings out)
in a fresh process that reports its peak anonymous memory (``RssAnon``: page cache of the mapped
files is not counted, the kernel reclaims it) and cells/s. Flat peak memory across sizes is the
claim; the in-memory size of each count matrix is printed beside it.

Run: ``python benchmarks/streaming.py [--sizes 10000 100000 1000000] [--out ...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

WORKER = r"""
import json, sys, threading, time
import torch
from scmmgpt.data import CellTextDataset
from scmmgpt.data.shards import ShardedCells
from scmmgpt.data.vocab import GeneVocab
from scmmgpt.inference import embed_to_disk
from scmmgpt.models.config import ModelConfig
from scmmgpt.models.scmmgpt import ScMMGPT

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

peak = [0]
def watch():
    while True:
        peak[0] = max(peak[0], anon())
        time.sleep(0.05)
threading.Thread(target=watch, daemon=True).start()
shards, out = sys.argv[1], sys.argv[2]
vocab = GeneVocab.from_json(f"{shards}/vocab.json")
torch.manual_seed(0)
cfg = ModelConfig.from_preset("tiny", max_genes=64)
cfg.qformer.n_layers, cfg.qformer.n_query = 2, 8
model = ScMMGPT.build(cfg, vocab, with_lm=False)
model.net.eval()
ds = CellTextDataset(ShardedCells(shards), cls_id=vocab.cls_id, max_genes=64)
base = anon()
t = time.perf_counter()
emb = embed_to_disk(model, ds, out, batch_size=256)
dt = time.perf_counter() - t
peak[0] = max(peak[0], anon())
print(json.dumps({"cells": len(ds), "seconds": dt, "cells_per_s": len(ds) / dt, "rss_anon_before": base,
                  "rss_anon_peak": peak[0], "finite": bool(abs(float(emb[-1].sum())) < 1e9)}))
"""


def synthetic_h5ad(path: Path, n: int, genes: list[str], per_cell: int = 60, block: int = 100_000) -> int:
    """Write ``n`` cells of random counts; returns the in-memory CSR size in bytes."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    parts = []
    for s in range(0, n, block):
        m = min(block, n - s)
        X = sp.csr_matrix((rng.integers(1, 20, m * per_cell).astype(np.float32),
                           rng.integers(0, len(genes), m * per_cell), np.arange(0, m * per_cell + 1, per_cell)),
                          shape=(m, len(genes)))
        X.sum_duplicates()
        parts.append(X)
    X = sp.vstack(parts).tocsr()
    types = np.array(["B cell", "natural killer cell", "CD14-positive monocyte", "T cell"])[rng.integers(0, 4, n)]
    a = ad.AnnData(X=X, obs=pd.DataFrame({"cell_type": pd.Categorical(types)}, index=[f"c{i}" for i in range(n)]),
                   var=pd.DataFrame(index=genes))
    a.write_h5ad(path)
    return int(X.data.nbytes + X.indices.nbytes + X.indptr.nbytes)


def main(argv=None) -> dict:
    import anndata as ad

    from scmmgpt.data.shards import write_shards
    from scmmgpt.tasks.benchmark import machine_info

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--genes-from", default=str(ROOT.parent / "shared" / "data" / "pbmc3k_clustifyr.h5ad"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "streaming.json"))
    args = p.parse_args(argv)
    genes = list(ad.read_h5ad(args.genes_from, backed="r").var_names[:2000])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            d = Path(tmp) / str(n)
            d.mkdir()
            t = time.perf_counter()
            csr_bytes = synthetic_h5ad(d / "cells.h5ad", n, genes)
            t_write = time.perf_counter() - t
            t = time.perf_counter()
            write_shards(d / "cells.h5ad", d / "shards", cells_per_shard=50_000)
            t_shard = time.perf_counter() - t
            env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
            proc = subprocess.run([sys.executable, "-c", WORKER, str(d / "shards"), str(d / "emb.npy")], env=env,
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r.update(csr_bytes=csr_bytes, shard_seconds=round(t_shard, 1), write_h5ad_seconds=round(t_write, 1))
            rows.append(r)
            print(f"{n:>9} cells: shard {t_shard:6.1f} s, embed {r['cells_per_s']:8.0f} cells/s, peak RssAnon "
                  f"{r['rss_anon_peak'] / 2**20:7.1f} MiB (counts in memory would be {csr_bytes / 2**20:7.1f} MiB)")
            for f in d.iterdir():
                if f.is_file():
                    f.unlink()
    record = {"benchmark": "streaming", "command": "python " + " ".join([sys.argv[0]] + sys.argv[1:]),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
              "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main()
