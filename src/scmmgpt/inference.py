"""Batched inference loops over an :class:`~scmmgpt.models.scmmgpt.ScMMGPT` and a
:class:`~scmmgpt.data.dataset.CellTextDataset`: cell features, text features, streaming to disk.

The model's verbs (``encode``, ``encode_texts``, ``score_labels``) run on these; every caller
goes through the verbs. All run under ``torch.inference_mode`` in eval mode, at a ``precision``
(``auto | fp32 | bf16 | fp16``, :mod:`scmmgpt.utils.precision`), and restore the network's mode
afterwards.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from .data.dataset import CellBatch, CellTextDataset
from .eval.annotation import topk_accuracy  # re-exported: validation and the demo use it
from .utils.distinct import distinct
from .utils.precision import Precision, resolve_precision

__all__ = ["CellFeatures", "aligned_embedding", "iter_batches", "length_order", "encode_dataset", "embed_to_disk", "encode_texts", "topk_accuracy",
           "evaluation_mode"]


@contextlib.contextmanager
def evaluation_mode(model: torch.nn.Module, precision: str | Precision = "fp32"):
    """Eval mode + no autograd + autocast at ``precision`` (resolved for the model's device) inside;
    the previous train/eval mode is restored on exit."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.inference_mode(), resolve_precision(precision, device, quiet=True).autocast():
            yield
    finally:
        model.train(was_training)


def aligned_embedding(features: torch.Tensor) -> np.ndarray:
    """(N, embed_dim) one vector per cell from its query features (N, Q, embed_dim): their mean,
    re-normalised (the ``X_scmmgpt_aligned`` embedding), as float32 on the CPU."""
    return torch.nn.functional.normalize(features.float().mean(1), dim=-1).cpu().numpy()


@dataclass
class CellFeatures:
    """Per-cell outputs of the cell side. N cells."""

    features: torch.Tensor
    """(N, Q, embed_dim) L2-normalised contrastive features (one per query)."""
    cell_embedding: torch.Tensor
    """(N, d_cell) the cell encoder's ``<cls>`` output."""
    query_mean: torch.Tensor
    """(N, d_qformer) Q-Former query outputs averaged over queries."""

    def embedding(self) -> np.ndarray:
        """(N, embed_dim) one vector per cell: the mean of its query features, re-normalised."""
        return aligned_embedding(self.features)


def iter_batches(model, ds: CellTextDataset, batch_size: int = 64, *, with_text: bool = False,
                 indices: Sequence[int] | None = None) -> Iterator[CellBatch]:
    """Batches of ``ds`` (optionally only ``indices``), in order, on the model's device."""
    collate = model.collator(with_text=with_text)
    device = model.device
    idx = np.arange(len(ds)) if indices is None else np.asarray(indices)
    for start in range(0, len(idx), batch_size):
        yield collate([ds[int(i)] for i in idx[start:start + batch_size]]).to(device)


def length_order(ds: CellTextDataset, indices: Sequence[int] | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """``(positions, inverse)``: the cells of ``ds`` (or ``indices``) sorted by length, so batches pad
    little, and the permutation that puts per-cell results computed in that order back in the order
    of ``indices``."""
    idx = np.arange(len(ds)) if indices is None else np.asarray(indices)
    by_length = np.argsort(ds.lengths()[idx], kind="stable")
    return idx[by_length], torch.from_numpy(np.argsort(by_length, kind="stable"))


def encode_dataset(model, ds: CellTextDataset, batch_size: int = 64, *, indices: Sequence[int] | None = None,
                   precision: str | Precision = "auto") -> CellFeatures:
    """Cell features of every cell of ``ds`` (or of ``indices``), in order, on the CPU.

    Cells are encoded in order of length (batches pad less) and the results put back in order."""
    order, inv = length_order(ds, indices)
    feats, cls, query = [], [], []
    with evaluation_mode(model.net, precision):
        for batch in iter_batches(model, ds, batch_size, indices=order):
            out = model.net.encode_cells(batch.gene_ids, batch.values, batch.padding_mask)
            feats.append(out.features.float().cpu())
            cls.append(out.cell_embedding.float().cpu())
            query.append(out.query.float().mean(1).cpu())
    return CellFeatures(torch.cat(feats)[inv], torch.cat(cls)[inv], torch.cat(query)[inv])


def encode_texts(model, texts: Sequence[str], batch_size: int = 64, *, precision: str | Precision = "auto"
                 ) -> torch.Tensor:
    """Text features ``(T, embed_dim)``, L2-normalised, on the CPU; each distinct text is encoded once."""
    device = model.device
    first, inverse = distinct(texts)
    unique = [texts[i] for i in first]
    out = []
    with evaluation_mode(model.net, precision):
        for start in range(0, len(unique), batch_size):
            ids, mask = model.tokenize_texts(unique[start:start + batch_size])
            out.append(model.net.encode_text(ids.to(device), mask.to(device)).float().cpu())
    return torch.cat(out)[inverse]


def embed_to_disk(model, ds: CellTextDataset, out, *, cell_out=None, batch_size: int = 64, num_workers: int = 0,
                  chunk: int = 16384, precision: str | Precision = "auto"):
    """Embed every cell of ``ds`` into ``.npy`` files, streaming: cells come from the dataset (e.g.
    memory-mapped shards) ``chunk`` at a time, sorted by length within each chunk, and results go
    straight to memory-mapped files, so memory does not grow with the number of cells.

    ``out`` receives the ``(N, embed_dim)`` float32 aligned features (the mean of the Q-Former query
    features, unit norm: ``.obsm["X_scmmgpt_aligned"]`` of :func:`scmmgpt.tl.embed`); ``cell_out``,
    if given, the ``(N, d_cell)`` ``<cls>`` embeddings (``.obsm["X_scmmgpt"]``). Either may be
    ``None``. Each file is written under a temporary name and renamed when complete. Returns the
    read-only memory map of ``out`` (else of ``cell_out``)."""
    import os
    from pathlib import Path

    from torch.utils.data import DataLoader

    targets = {k: Path(v) for k, v in (("aligned", out), ("cell", cell_out)) if v is not None}
    if not targets:
        raise ValueError("embed_to_disk needs out= or cell_out=.")
    n = len(ds)
    dims = {"aligned": model.config.qformer.embed_dim, "cell": model.config.cell.d_model}
    tmps, dest = {}, {}
    for k, path in targets.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmps[k] = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        dest[k] = np.lib.format.open_memmap(tmps[k], mode="w+", dtype=np.float32, shape=(n, dims[k]))
    device = model.device
    lengths = ds.lengths()
    collate = model.collator()
    try:
        with evaluation_mode(model.net, precision):
            for start in range(0, n, chunk):
                idx = start + np.argsort(lengths[start:start + chunk], kind="stable")
                batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
                loader = DataLoader(ds, batch_sampler=batches, collate_fn=collate, num_workers=num_workers,
                                    pin_memory=device.type == "cuda")
                for batch in loader:
                    batch = batch.to(device)
                    enc = model.net.encode_cells(batch.gene_ids, batch.values, batch.padding_mask)
                    rows = batch.index.cpu().numpy()
                    if "aligned" in dest:
                        dest["aligned"][rows] = aligned_embedding(enc.features)
                    if "cell" in dest:
                        dest["cell"][rows] = enc.cell_embedding.float().cpu().numpy()
        for k in list(dest):
            dest[k].flush()
            del dest[k]
            os.replace(tmps[k], targets[k])
    finally:
        for tmp in tmps.values():
            if tmp.exists():
                tmp.unlink()
    return np.load(targets.get("aligned", targets.get("cell")), mmap_mode="r")
