"""On-disk shards (issue 7): the same cells and descriptions as the in-memory pipeline, split
across ranks, resumable, trainable, and streamed with constant memory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scmmgpt.data import GeneVocab, prepare_cells
from scmmgpt.data.labelled import DataConfig, load_labelled
from scmmgpt.data.shards import ShardedCells, is_shard_dir, write_shards
from scmmgpt.errors import InputDataError
from tests.conftest import PBMC3K

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    src = PBMC3K
    out = tmp_path_factory.mktemp("shards")
    vocab = GeneVocab.from_genes(ad.read_h5ad(src, backed="r").var_names)
    # two "nodes": rank 0 writes blocks 0 and 2, rank 1 blocks 1; only the last one finishes the manifest
    first = write_shards(src, out, vocab=vocab, cells_per_shard=1000, rank=0, world_size=2)
    assert not is_shard_dir(out) and [s is not None for s in first["shards"]] == [True, False, True]
    write_shards(src, out, vocab=vocab, cells_per_shard=1000, rank=1, world_size=2)
    return src, out, vocab


def test_shards_hold_the_in_memory_cells(shards):
    src, out, vocab = shards
    assert is_shard_dir(out)
    cells = ShardedCells(out)
    ref = prepare_cells(ad.read_h5ad(src), vocab, target_sum=1e4)
    assert len(cells) == len(ref) == 2638 and cells.value_kind == ref.value_kind
    assert (cells.measured == ref.measured).all()
    assert (cells.n_expressed() == ref.n_expressed()).all()
    for i in (0, 999, 1000, 1500, 2637):             # both sides of shard boundaries
        g, v = cells.row(i)
        rg, rv = ref.row(i)
        assert (g == rg).all() and np.allclose(v, rv)
    sub = cells.subset(np.array([2637, 3]))
    assert (sub.rows_csr([0, 1]) != ref.rows_csr([2637, 3])).nnz == 0


def test_training_data_from_shards_matches_the_h5ad(shards):
    import torch

    from scmmgpt.models.config import ModelConfig
    from scmmgpt.models.scmmgpt import ScMMGPT
    from scmmgpt.train.config import TrainConfig
    from scmmgpt.train.loop import fit

    src, out, vocab = shards
    a = load_labelled(DataConfig(path=str(out)))
    b = load_labelled(DataConfig(path=str(src)), vocab=vocab)
    for part in ("train", "val", "test"):
        assert (a.split[part] == b.split[part]).all()
    assert (a.descriptions["description"].astype(str) == b.descriptions["description"].astype(str)).all()
    ds = a.dataset("train", max_genes=32, with_targets=True)
    ref = b.dataset("train", max_genes=32, with_targets=True)
    for i in (0, len(ds) - 1):
        x, y = ds[i], ref[i]
        assert (x["gene_ids"] == y["gene_ids"]).all() and x["text"] == y["text"]
        assert (x["target_genes"] == y["target_genes"]).all()
    # DataLoader worker processes read the same cells from their own maps of the shard files
    from torch.utils.data import DataLoader

    from scmmgpt.data.dataset import CellTextCollator

    collate = CellTextCollator(pad_id=vocab.pad_id, vocab_size=len(vocab))
    seq = list(DataLoader(ds, batch_size=64, collate_fn=collate))
    par = list(DataLoader(ds, batch_size=64, collate_fn=collate, num_workers=2))
    assert len(seq) == len(par) and all(torch.equal(x.gene_ids, y.gene_ids) and x.texts == y.texts
                                        for x, y in zip(seq, par))
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", max_genes=32)
    cfg.qformer.n_layers, cfg.qformer.max_text_len = 1, 32
    model = ScMMGPT.build(cfg, a.vocab, with_lm=False)
    res = fit(model, ds, TrainConfig(stage="stage1", max_steps=2, batch_size=8, warmup_steps=0, progress=False))
    assert res["steps"] == 2 and np.isfinite(res["history"][-1]["loss"])
    with pytest.raises(InputDataError, match="another gene vocabulary"):
        load_labelled(DataConfig(path=str(out)), vocab=GeneVocab.from_genes(["CD3E", "LYZ"]))
    with pytest.raises(InputDataError, match="labelled from 'cell_type'"):
        load_labelled(DataConfig(path=str(out), label_key="louvain"))


def test_interrupted_shard_run_resumes(shards, tmp_path):
    src, out, vocab = shards
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "manifest.json").unlink()
    shutil.rmtree(copy / "shard-00001")
    (copy / ".tmp-shard-00001").mkdir()                       # a block cut short by the crash
    before = (copy / "shard-00000" / "shard.json").stat().st_mtime_ns
    write_shards(src, copy, vocab=vocab, cells_per_shard=1000)
    assert (copy / "shard-00000" / "shard.json").stat().st_mtime_ns == before    # not redone
    assert is_shard_dir(copy) and len(ShardedCells(copy)) == 2638
    with pytest.raises(InputDataError, match="another vocabulary"):
        write_shards(src, copy, vocab=GeneVocab.from_genes(["CD3E", "LYZ"]), cells_per_shard=1000)
    with pytest.raises(InputDataError, match="not a complete shard folder"):
        ShardedCells(tmp_path)


STREAM = r"""
import json, sys
import numpy as np
from torch.utils.data import DataLoader
from scmmgpt.data import CellTextDataset
from scmmgpt.data.dataset import CellTextCollator
from scmmgpt.data.shards import ShardedCells

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

cells = ShardedCells(sys.argv[1])
ds = CellTextDataset(cells, cls_id=1, max_genes=32)
loader = DataLoader(ds, batch_size=1000, collate_fn=CellTextCollator(pad_id=0))
seen, marks = 0, {}
for batch in loader:
    seen += len(batch)
    if seen == 20_000:
        marks["at_20k"] = anon()
marks["end"] = anon()
marks["cells"] = seen
print(json.dumps(marks))
"""


@pytest.mark.slow   # a scale test (200k cells, ~15 s); benchmarks/streaming.py measures 10k-1M
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from /proc")
def test_streaming_200k_cells_keeps_memory_flat(tmp_path):
    rng = np.random.default_rng(0)
    genes = list(ad.read_h5ad(PBMC3K, backed="r").var_names[:2000])
    n, per_cell = 200_000, 60
    indices = rng.integers(0, len(genes), size=n * per_cell)
    X = sp.csr_matrix((rng.integers(1, 20, size=n * per_cell).astype(np.float32), indices,
                       np.arange(0, n * per_cell + 1, per_cell)), shape=(n, len(genes)))
    X.sum_duplicates()
    types = np.array(["B cell", "natural killer cell", "CD14-positive monocyte"])[rng.integers(0, 3, n)]
    obs = pd.DataFrame({"cell_type": pd.Categorical(types)}, index=[f"c{i}" for i in range(n)])
    path = tmp_path / "big.h5ad"
    ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
    in_memory = X.data.nbytes + X.indices.nbytes + X.indptr.nbytes
    del X, indices

    out = tmp_path / "shards"
    m = write_shards(path, out, cells_per_shard=50_000, workers=2)     # two processes, one block each at a time
    assert m["n_cells"] == n and len(m["shards"]) == 4 and all(s["n_cells"] == 50_000 for s in m["shards"])

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", STREAM, str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    marks = json.loads(proc.stdout.strip().splitlines()[-1])
    assert marks["cells"] == n
    growth = marks["end"] - marks["at_20k"]
    # streaming 180k more cells adds (almost) nothing; holding them would take ~0.9 x in_memory
    assert growth < 0.1 * in_memory, (growth, in_memory)


def test_embed_to_disk_streams_in_order(shards, tmp_path):
    import torch

    from scmmgpt.data import CellTextDataset
    from scmmgpt.inference import embed_to_disk, encode_dataset
    from scmmgpt.models.config import ModelConfig
    from scmmgpt.models.scmmgpt import ScMMGPT

    _, out, vocab = shards
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", max_genes=32)
    cfg.qformer.n_layers, cfg.qformer.n_query = 1, 4
    model = ScMMGPT.build(cfg, vocab, with_lm=False)
    cells = ShardedCells(out).subset(np.arange(0, 2638, 7))          # 377 cells across all shards
    ds = CellTextDataset(cells, cls_id=vocab.cls_id, max_genes=32)
    emb = embed_to_disk(model, ds, tmp_path / "emb.npy", cell_out=tmp_path / "cls.npy", batch_size=16, chunk=100)
    feats = encode_dataset(model, ds, batch_size=64)                  # length-sorted too, then restored
    ref = feats.embedding()
    assert emb.shape == ref.shape == (377, cfg.qformer.embed_dim)
    assert np.abs(np.asarray(emb) - ref).max() < 1e-4
    cls = np.load(tmp_path / "cls.npy")
    assert cls.shape == (377, cfg.cell.d_model) and np.abs(cls - feats.cell_embedding.numpy()).max() < 1e-4
    # against plain file order, one cell at a time (no padding at all)
    one = np.concatenate([encode_dataset(model, ds, batch_size=1, indices=[i]).embedding() for i in (0, 200, 376)])
    assert np.abs(np.asarray(emb)[[0, 200, 376]] - one).max() < 1e-4
    assert not list(tmp_path.glob(".*.npy*"))


def test_cli_embeds_a_shard_folder(shards, tmp_path, capsys):
    import torch

    from scmmgpt import tl
    from scmmgpt.cli.main import main
    from scmmgpt.models.config import ModelConfig
    from scmmgpt.models.scmmgpt import ScMMGPT

    src, out, vocab = shards
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", max_genes=32)
    cfg.qformer.n_layers, cfg.qformer.n_query = 1, 4
    model = ScMMGPT.build(cfg, vocab, with_lm=False)
    model.save_pretrained(tmp_path / "model")
    dest = tmp_path / "emb" / "cells.npy"
    assert main(["embed", str(out), "--model", str(tmp_path / "model"), "-o", str(dest), "--batch-size", "128"]) == 0
    assert "2638 cells" in capsys.readouterr().out
    cls, aligned = np.load(dest), np.load(tmp_path / "emb" / "cells_aligned.npy")
    # the same vectors as tl.embed of the .h5ad, cell for cell
    adata = ad.read_h5ad(src)
    tl.embed(adata, model, batch_size=128)
    assert np.abs(cls - adata.obsm["X_scmmgpt"]).max() < 1e-4
    assert np.abs(aligned - adata.obsm["X_scmmgpt_aligned"]).max() < 1e-4
    # shards of another vocabulary, and .h5ad-only options, are refused with exit code 2
    other = ScMMGPT.build(cfg, GeneVocab.from_genes(list(vocab.tokens[10:400])), with_lm=False)
    other.save_pretrained(tmp_path / "other")
    assert main(["embed", str(out), "--model", str(tmp_path / "other"), "-o", str(dest)]) == 2
    assert "another gene vocabulary" in capsys.readouterr().err
    assert main(["embed", str(out), "--model", str(tmp_path / "model"), "--inplace"]) == 2
    assert main(["embed", str(out), "--model", str(tmp_path / "model"), "-o", str(tmp_path / "x.h5ad")]) == 2


def test_both_cell_collections_are_cell_sources(shards):
    """CellData (in memory) and ShardedCells (on disk) implement the one CellSource interface."""
    from scmmgpt.data.source import CellSource

    src, out, vocab = shards
    memory, disk = prepare_cells(ad.read_h5ad(src), vocab, target_sum=1e4), ShardedCells(out)
    for cells in (memory, disk):
        assert isinstance(cells, CellSource)
        assert len(cells.obs_names) == len(cells) and isinstance(cells.subset(np.arange(3)), CellSource)
    np.testing.assert_array_equal(np.asarray(memory.obs_names).astype(str), np.asarray(disk.obs_names).astype(str))
