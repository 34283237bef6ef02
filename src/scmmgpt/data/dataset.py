"""PyTorch datasets, collation with dynamic padding, length bucketing and stratified splits.

A cell becomes ``<cls>`` followed by its top-``max_genes`` expressed genes by value ("high value"
selection, SPEC §1): fewer when fewer are expressed. Batches are padded to their own longest cell,
never to a fixed ``max_genes``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..errors import InputDataError
from .source import CellSource
from .values import quantile_bin

__all__ = ["tokenize_cell", "tokenize_for_bert", "tokenize_for_lm", "CellTextDataset", "CellBatch", "CellTextCollator", "LengthBucketSampler",
           "BalancedBatchSampler", "balance_weights", "stratified_split"]


def tokenize_cell(gene_ids: np.ndarray, values: np.ndarray, *, cls_id: int, max_genes: int,
                  n_bins: int | None = None, input_genes: np.ndarray | None = None,
                  target_sum: float | None = None, bin_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``<cls>`` + the ``max_genes`` highest-valued genes, sorted by value (ties: lower gene id).

    Parameters
    ----------
    gene_ids, values
        The cell's expressed genes (vocabulary indices) and their eq.-1 values.
    n_bins
        If set, values are replaced by scGPT per-cell quantile bins (computed over all expressed
        genes before truncation, as scGPT does); ``bin_seed`` seeds their tie-breaking
        (:func:`~scmmgpt.data.values.quantile_bin`).
    input_genes, target_sum
        A model's input panel (:mod:`scmmgpt.data.panel`): (V,) bool genes the tokens may come
        from. With ``target_sum``, eq. 1 is then applied again over the panel's genes only:
        ``log1p(target_sum * x / sum_panel x)``, recovered from the values as ``expm1``. So a
        cell's values do not depend on which other genes its dataset measured.

    Returns
    -------
    ``(ids, vals)`` of length ``min(len, max_genes) + 1``; the ``<cls>`` value is 0.
    """
    if input_genes is not None:
        keep = input_genes[gene_ids]
        gene_ids, values = gene_ids[keep], values[keep]
        if target_sum is not None and values.size:
            x = np.expm1(values.astype(np.float64))
            total = x.sum()
            if total > 0:
                values = np.log1p(x * (target_sum / total)).astype(np.float32)
    if n_bins is not None:
        values = quantile_bin(values, n_bins, seed=bin_seed)
    order = np.lexsort((gene_ids, -values))[:max_genes]
    ids = np.concatenate([[cls_id], gene_ids[order]]).astype(np.int64)
    vals = np.concatenate([[0.0], values[order]]).astype(np.float32)
    return ids, vals


class CellTextDataset(Dataset[dict[str, Any]]):
    """Cells (and optionally their descriptions and integer labels) for training and inference.

    Items are dicts: ``gene_ids`` (L,), ``values`` (L,), ``index`` and, when given, ``text`` and
    ``label``. With ``with_targets=True`` the item also holds the cell's full sparse row (vocabulary
    genes and eq.-1 values) for the PCGen target.
    """

    def __init__(self, cells: CellSource, texts: Sequence[str] | None = None, labels: Sequence[int] | None = None,
                 *, cls_id: int, max_genes: int = 2048, n_bins: int | None = None, with_targets: bool = False,
                 input_genes: np.ndarray | None = None, target_sum: float | None = None) -> None:
        if max_genes < 1:
            raise InputDataError("max_genes must be >= 1.")
        if texts is not None and len(texts) != len(cells):
            raise InputDataError(f"{len(texts)} texts for {len(cells)} cells.")
        if labels is not None and len(labels) != len(cells):
            raise InputDataError(f"{len(labels)} labels for {len(cells)} cells.")
        self.cells = cells
        self.texts = list(texts) if texts is not None else None
        self.labels = np.asarray(labels) if labels is not None else None
        self.cls_id = cls_id
        self.max_genes = max_genes
        self.n_bins = n_bins
        self.with_targets = with_targets
        self.input_genes: np.ndarray | None = None
        self.target_sum: float | None = None
        self.read_through(input_genes, target_sum)

    def read_through(self, input_genes: np.ndarray | None, target_sum: float | None) -> None:
        """Tokenise through an input panel (see :func:`tokenize_cell`); ``None``: every gene. Eq. 1 is
        re-applied over the panel only when ``target_sum`` is given and the values are eq.-1
        values (not ``as_is`` input)."""
        if input_genes is not None:
            input_genes = np.asarray(input_genes, dtype=bool)
            if input_genes.shape != self.cells.measured.shape:
                raise InputDataError(f"The input panel has {input_genes.size} genes, the cells' vocabulary "
                                     f"{self.cells.measured.size}.")
        self.input_genes = input_genes
        self.target_sum = target_sum if input_genes is not None and self.cells.value_kind != "as_is" else None

    def __len__(self) -> int:
        return len(self.cells)

    def lengths(self) -> np.ndarray:
        """Token count of each cell (``<cls>`` included), for length bucketing; an upper bound when
        the cells are read through an input panel."""
        return np.minimum(self.cells.n_expressed(), self.max_genes) + 1

    def __getitem__(self, i: int) -> dict[str, Any]:
        genes, vals = self.cells.row(i)
        ids, values = tokenize_cell(genes, vals, cls_id=self.cls_id, max_genes=self.max_genes, n_bins=self.n_bins,
                                    input_genes=self.input_genes, target_sum=self.target_sum, bin_seed=i)
        item = {"gene_ids": ids, "values": values, "index": i}
        if self.texts is not None:
            item["text"] = self.texts[i]
        if self.labels is not None:
            item["label"] = int(self.labels[i])
        if self.with_targets:
            item["target_genes"] = genes.astype(np.int64)
            item["target_values"] = vals.astype(np.float32)
        return item


@dataclass
class CellBatch:
    """A collated batch. Shapes: B cells, L tokens (longest cell), T text tokens, V vocabulary."""

    gene_ids: torch.Tensor
    """(B, L) int64 gene tokens, ``<cls>`` first, padded with ``pad_id``."""
    values: torch.Tensor
    """(B, L) float32 values, padded with ``pad_value``."""
    padding_mask: torch.Tensor
    """(B, L) bool, True at padding."""
    index: torch.Tensor
    """(B,) int64 position of each cell in its dataset."""
    text_input_ids: torch.Tensor | None = None
    """(B, T) tokenised descriptions (when a tokenizer is given)."""
    text_attention_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    """(B,) int64 labels (-1 for none)."""
    target: torch.Tensor | None = None
    """(B, V) eq.-1 values of every vocabulary gene (PCGen target)."""
    lm_input_ids: torch.Tensor | None = None
    """(B, T') descriptions tokenised for the text LM, right-padded, ending with EOS."""
    lm_attention_mask: torch.Tensor | None = None
    texts: list[str] | None = None

    def to(self, device: str | torch.device, non_blocking: bool = True) -> "CellBatch":
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        return CellBatch(**out)

    def __len__(self) -> int:
        return self.gene_ids.shape[0]


@dataclass
class CellTextCollator:
    """Pads cells to the longest in the batch and tokenises texts.

    Attributes
    ----------
    pad_id
        Vocabulary index of ``<pad>``.
    pad_value
        Value at padded positions (scGPT uses -2 with binned values).
    tokenizer
        A Hugging Face tokenizer for the descriptions, or ``None``.
    max_text_len
        Descriptions are truncated to this many tokens.
    vocab_size
        Needed when items carry PCGen targets.
    """

    pad_id: int
    pad_value: float = 0.0
    tokenizer: object | None = None
    max_text_len: int = 128
    vocab_size: int | None = None
    lm_tokenizer: object | None = None
    lm_max_text_len: int = 96

    def __call__(self, items: list[dict[str, Any]]) -> CellBatch:
        B = len(items)
        L = max(len(it["gene_ids"]) for it in items)
        gene_ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        values = torch.full((B, L), self.pad_value, dtype=torch.float32)
        padding = torch.ones((B, L), dtype=torch.bool)
        for b, it in enumerate(items):
            n = len(it["gene_ids"])
            gene_ids[b, :n] = torch.from_numpy(it["gene_ids"])
            values[b, :n] = torch.from_numpy(it["values"])
            padding[b, :n] = False
        batch = CellBatch(gene_ids=gene_ids, values=values, padding_mask=padding,
                          index=torch.tensor([it["index"] for it in items], dtype=torch.long))
        if "text" in items[0]:
            batch.texts = [it["text"] for it in items]
            if self.tokenizer is not None:
                batch.text_input_ids, batch.text_attention_mask = tokenize_for_bert(
                    self.tokenizer, batch.texts, self.max_text_len)
            if self.lm_tokenizer is not None:
                batch.lm_input_ids, batch.lm_attention_mask = tokenize_for_lm(
                    self.lm_tokenizer, batch.texts, self.lm_max_text_len)
        if "label" in items[0]:
            batch.labels = torch.tensor([it["label"] for it in items], dtype=torch.long)
        if "target_genes" in items[0]:
            if self.vocab_size is None:
                raise InputDataError("CellTextCollator needs vocab_size for PCGen targets.")
            target = torch.zeros((B, self.vocab_size), dtype=torch.float32)
            for b, it in enumerate(items):
                target[b, torch.from_numpy(it["target_genes"])] = torch.from_numpy(it["target_values"])
            batch.target = target
        return batch


def tokenize_for_bert(tokenizer: Any, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise texts for the Q-Former's BERT: ``[CLS] ... [SEP]``, truncated to ``max_len``,
    padded to the longest. Returns ``(input_ids, attention_mask)`` of shape (B, T)."""
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def tokenize_for_lm(tokenizer: Any, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise texts for the causal LM: no special tokens, truncated to ``max_len - 1``, EOS
    appended, right-padded. Returns ``(input_ids, attention_mask)`` of shape (B, T)."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    seqs = [tokenizer(t, add_special_tokens=False)["input_ids"][: max_len - 1] + [eos] for t in texts]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


class _EpochBatchSampler(Sampler[list[int]], ABC):
    """What both batch samplers share: a seed, the epoch (and the batches of it to skip when
    resuming mid-epoch) and this rank's place among ``num_replicas``; subclasses build ``_batches``."""

    def __init__(self, batch_size: int, seed: int, num_replicas: int, rank: int) -> None:
        if batch_size < 1:
            raise InputDataError("batch_size must be >= 1.")
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.skip = 0
        self.num_replicas = num_replicas
        self.rank = rank

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's draw; ``skip`` leaves out its first batches (resuming mid-epoch
        without loading the data already trained on)."""
        self.epoch = epoch
        self.skip = skip

    @abstractmethod
    def _batches(self) -> list[list[int]]:
        """This rank's batches of the current epoch, before ``skip``."""

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()[self.skip:]


class LengthBucketSampler(_EpochBatchSampler):
    """Batches of cells with similar lengths, so dynamic padding wastes little.

    Indices are shuffled, cut into pools of ``pool_batches`` batches, sorted by length inside each
    pool and batched; the batches are then shuffled. With ``num_replicas > 1`` each rank takes every
    ``num_replicas``-th batch (the batch list is padded by repetition so all ranks get the same
    number of batches, as DDP requires).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, shuffle: bool = True, pool_batches: int = 50,
                 drop_last: bool = False, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(batch_size, seed, num_replicas, rank)
        self.lengths = np.asarray(lengths)
        self.shuffle = shuffle
        self.pool = pool_batches * batch_size
        self.drop_last = drop_last

    def _batches(self) -> list[list[int]]:
        n = len(self.lengths)
        rng = np.random.default_rng(self.seed + self.epoch)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        batches = []
        for start in range(0, n, self.pool):
            pool = order[start:start + self.pool]
            pool = pool[np.argsort(-self.lengths[pool], kind="stable")]
            for b in range(0, len(pool), self.batch_size):
                batch = pool[b:b + self.batch_size].tolist()
                if len(batch) < self.batch_size and self.drop_last:
                    continue
                batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.num_replicas > 1 and batches:
            per_rank = math.ceil(len(batches) / self.num_replicas)
            batches = (batches * (per_rank * self.num_replicas // len(batches) + 1))[: per_rank * self.num_replicas]
            batches = batches[self.rank::self.num_replicas]
        return batches

    def __len__(self) -> int:
        return max(len(self._batches()) - self.skip, 0)


def balance_weights(sources: Sequence[object] | np.ndarray, types: Sequence[object] | np.ndarray, *,
                    power: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Sampling weights that temper both the size of each source dataset and of each cell type in it.

    A source of ``n_d`` cells gets a share proportional to ``n_d ** power`` and, inside it, a type
    of ``n_dt`` cells a share proportional to ``n_dt ** power`` (``power=1``: sample as the data
    comes; ``0``: every source, and every type inside a source, equally often). This is the
    temperature sampling of multilingual pre-training (Conneau et al., 2020, "Unsupervised
    Cross-lingual Representation Learning at Scale", eq. for q_i with alpha = ``power``) applied at two levels.

    Returns ``(stratum, p)``: each cell's stratum (a (source, type) pair) and each stratum's
    probability of being drawn.
    """
    if not 0.0 <= power <= 1.0:
        raise InputDataError(f"balance power must be in [0, 1], got {power}.")
    _, src_code = np.unique(np.asarray([str(v) for v in sources]), return_inverse=True)
    type_names, type_code = np.unique(np.asarray([str(v) for v in types]), return_inverse=True)
    if len(src_code) != len(type_code):
        raise InputDataError(f"{len(src_code)} sources for {len(type_code)} types.")
    keys, stratum, counts = np.unique(src_code * len(type_names) + type_code, return_inverse=True,
                                      return_counts=True)
    src_of = keys // len(type_names)                    # each stratum's source
    src_size = np.bincount(src_of, weights=counts)
    src_share = src_size ** power / (src_size ** power).sum()
    within = counts.astype(float) ** power
    within /= np.bincount(src_of, weights=within)[src_of]
    return stratum.astype(np.int64), src_share[src_of] * within


class BalancedBatchSampler(_EpochBatchSampler):
    """Batches whose cells are drawn stratum by stratum with the probabilities of
    :func:`balance_weights`: a large dataset does not fill every batch and rare types keep turning up.

    An epoch has as many full batches as the data has (``len // batch_size``). Each cell slot draws
    a stratum; each stratum hands out its cells in a fresh random order, starting over when it has
    used them all (so a rare type's cells repeat within an epoch and a common type's are not all
    seen). The draw depends only on ``seed`` and the epoch, so resuming mid-epoch (``set_epoch(e,
    skip)``) continues the same batches. With ``num_replicas > 1`` each rank takes every
    ``num_replicas``-th batch.
    """

    def __init__(self, stratum: np.ndarray, p: np.ndarray, batch_size: int, *, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(batch_size, seed, num_replicas, rank)
        self.stratum = np.asarray(stratum, dtype=np.int64)
        self.p = np.asarray(p, dtype=float) / float(np.sum(p))
        self.members = [np.flatnonzero(self.stratum == k) for k in range(len(self.p))]

    def _n_batches(self) -> int:
        per_rank = len(self.stratum) // self.batch_size // self.num_replicas
        return per_rank * self.num_replicas

    def _batches(self) -> list[list[int]]:
        n_batches = self._n_batches()
        rng = np.random.default_rng([self.seed, self.epoch])
        draws = rng.choice(len(self.p), size=n_batches * self.batch_size, p=self.p)
        cells = np.empty(len(draws), dtype=np.int64)
        for k, members in enumerate(self.members):
            slots = np.flatnonzero(draws == k)
            if len(slots):
                reps = -(-len(slots) // len(members))
                order = np.concatenate([rng.permutation(members) for _ in range(reps)])
                cells[slots] = order[:len(slots)]
        batches = cells.reshape(n_batches, self.batch_size).tolist() if n_batches else []
        return batches[self.rank::self.num_replicas]

    def __len__(self) -> int:
        return max(self._n_batches() // self.num_replicas - self.skip, 0)


def stratified_split(labels: Sequence[object] | np.ndarray, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), *, seed: int = 0,
                     exclude: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Split positions into ``train``/``val``/``test``, stratified by label.

    Every class with >= 3 cells has at least one cell in each split; classes with fewer go to
    train first. Positions flagged in ``exclude`` (ambiguous labels) are left out of all splits.
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise InputDataError(f"fractions must be three non-negative numbers summing to 1, got {fractions}.")
    arr = np.asarray(labels, dtype=object)
    rng = np.random.default_rng(seed)
    keep = np.ones(len(labels), dtype=bool) if exclude is None else ~np.asarray(exclude, dtype=bool)
    out: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for lab in sorted({str(v) for v in arr[keep]}):
        idx = np.flatnonzero(keep & (arr.astype(str) == lab))
        idx = rng.permutation(idx)
        n = len(idx)
        n_val = int(round(fractions[1] * n))
        n_test = int(round(fractions[2] * n))
        if n >= 3:
            n_val = max(n_val, 1 if fractions[1] > 0 else 0)
            n_test = max(n_test, 1 if fractions[2] > 0 else 0)
        n_val = min(n_val, max(n - 1, 0))
        n_test = min(n_test, max(n - 1 - n_val, 0))
        out["test"].extend(idx[:n_test])
        out["val"].extend(idx[n_test:n_test + n_val])
        out["train"].extend(idx[n_test + n_val:])
    return {k: np.sort(np.asarray(v, dtype=np.int64)) for k, v in out.items()}
