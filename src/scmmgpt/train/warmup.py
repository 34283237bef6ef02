"""Text-to-cell warm-up: the projector and cell decoder learn PCGen on cached LM states before the
joint stage-2 / generate steps.

During the warm-up the LM (and its LoRA adapters) do not change, so the states the projector reads
are a fixed function of the description: each distinct description goes through the LM once, and
the warm-up steps cost only the projector and the decoder — hundreds of steps in the time of a few
joint ones. This is the projector pre-training of LLaVA (Liu et al., 2023, "Visual Instruction
Tuning", stage 1: the LM frozen, only the projection trained) applied to the text-to-cell
direction. Without it, a CPU-sized stage 2 (tens of steps) leaves the decoder at the average cell.

Memory: one float32 copy of the states per distinct description, ``(T + n_dummy) * d_lm * 4`` bytes
(~90 KB for SmolLM2 with 32-token texts); at most ``max_texts`` distinct descriptions are cached
(a random subset, and only the cells with those descriptions are used, when there are more).
"""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp
import torch

from ..data.dataset import CellTextDataset, tokenize_for_lm
from ..errors import ConfigError
from ..modules.losses import pcgen_loss
from .config import PCGEN_SCALES
from .schedule import linear_schedule

__all__ = ["warm_up_text_to_cell", "group_means", "group_of_cells"]


@torch.no_grad()
def _cache_states(model, texts: list[str], device, chunk: int = 16) -> tuple[torch.Tensor, torch.Tensor | None]:
    ids, mask = tokenize_for_lm(model.lm_tokenizer, texts, model.config.lm.max_text_len)
    net = model.net
    was_training = net.training
    net.eval()
    states, pads = [], []
    try:
        for start in range(0, len(texts), chunk):
            s, p = net.text_to_cell_states(ids[start:start + chunk].to(device), mask[start:start + chunk].to(device))
            states.append(s.float())
            pads.append(p)
    finally:
        net.train(was_training)
    return torch.cat(states), (torch.cat(pads) if pads[0] is not None else None)


def group_of_cells(text: np.ndarray, source: np.ndarray | None) -> np.ndarray:
    """(N,) the (description id, source) group of each cell, numbered from 0 (one source: ``None``)."""
    src = np.zeros(len(text), dtype=np.int64) if source is None else np.asarray(source, dtype=np.int64)
    return np.unique(np.asarray(text, dtype=np.int64) * (int(src.max()) + 1) + src, return_inverse=True)[1]


def group_means(train: CellTextDataset, cells: np.ndarray, text: np.ndarray, source: np.ndarray | None,
                chunk: int = 4096, scale: str = "eq1") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Group ``cells`` (indices into ``train``) by (description id ``text[cell]``, source
    ``source[cell]``): ``(target, count, text, source, group)``, with ``target`` (G, V) each group's
    mean profile (float32), each group's cell count, description and source, and ``group`` the
    group of each of ``cells``.

    ``scale="eq1"``: the mean of the eq.-1 values (what eq. 6's squared error over the cells aims
    at); ``"counts"``: the mean on the counts scale, ``log1p(mean(expm1(x)))``, the expected profile
    of the group's reads (:attr:`~scmmgpt.train.config.TrainConfig.pcgen_scale`)."""
    if scale not in PCGEN_SCALES:
        raise ConfigError(f"Unknown PCGen target scale {scale!r}; choose from {', '.join(PCGEN_SCALES)}.")
    src = np.zeros(len(cells), dtype=np.int64) if source is None else source[cells]
    group = group_of_cells(text[cells], src)
    n_groups = int(group.max()) + 1
    count = np.bincount(group, minlength=n_groups)
    target: np.ndarray | None = None
    for start in range(0, len(cells), chunk):
        sl = slice(start, start + chunk)
        x = train.cells.rows_csr(cells[sl])
        if scale == "counts":
            x = x.copy()
            x.data = np.expm1(x.data)
        # sum the rows of each group: a (G, chunk) indicator times the chunk's sparse rows
        ind = sp.csr_matrix((np.ones(x.shape[0]), (group[sl], np.arange(x.shape[0]))), shape=(n_groups, x.shape[0]))
        part = np.asarray((ind @ x).todense(), dtype=np.float64)
        target = part if target is None else target + part
    assert target is not None
    target /= count[:, None]
    if scale == "counts":
        target = np.log1p(target)
    first = np.zeros(n_groups, dtype=np.int64)
    first[group[::-1]] = np.arange(len(cells))[::-1]
    return target.astype(np.float32), count, text[cells][first], src[first], group


def warm_up_text_to_cell(model, train: CellTextDataset, *, steps: int, batch_size: int = 32, lr: float = 1e-3,
                         weight_decay: float = 0.001, measured: torch.Tensor | None = None,
                         measured_group: torch.Tensor | None = None, seed: int = 0,
                         max_texts: int = 2048, balanced: bool = True, scale: str = "eq1",
                         device: str | torch.device | None = None) -> dict:
    """Train the text-to-cell projector (not its dummy embeddings, which feed the LM) and the cell
    decoder for ``steps`` PCGen steps on cached LM states of ``train``'s descriptions.

    Every cell with the same description (and source, whose measured genes the loss reads) gets the
    same pseudo-cell, and eq. 6's squared error splits as
    ``sum_c |p - x_c|^2 = n |p - mean_c x_c|^2 + const``: a group of ``n`` cells teaches exactly what
    its mean profile teaches with weight ``n``. So a step scores groups against their mean profiles,
    without the noise of sampled cells: with at most ``batch_size`` groups every step uses all of
    them, with more ``batch_size`` groups are drawn in proportion to their weight.

    ``balanced=False`` weights each group by its cell count: the gradient of eq. 6 over all the
    training cells. ``balanced=True`` (the default) weights the groups equally. Where the decoder
    can give every group its own mean (per-type descriptions), both have the same minimiser and the
    weights only change the path, and the count weights leave rare types behind: on pbmc3k (9
    types), 600 steps from a new decoder gave pseudo-cells a k-NN accuracy of 54% balanced against
    43% by counts (the log-mean profiles eq. 6 aims at: 55%); the old cell-sampled steps were at 23%
    after 360 steps (``benchmarks/results/recipe/README.md``, "Pseudo-cells").

    ``measured`` is the (V,) PCGen mask, or with ``measured_group`` ((N,) source of each training
    cell) the (G, V) masks of the sources.

    Both must already be trainable: the stage's entry in :data:`~scmmgpt.models.stages.STAGES`
    (``warm_up_text_to_cell``) says so, and ``set_trainable`` made them so; nothing is unfrozen here.

    Returns ``{"steps", "texts", "groups", "cells", "loss_first", "loss_last", "seconds"}``; the losses
    are of the group means (eq. 6 less the within-group variance).
    """
    net = model.net
    if train.texts is None:
        raise ConfigError("The text-to-cell warm-up needs a description for every cell.")
    if model.lm is None:
        raise ConfigError("The text-to-cell warm-up needs the text LM; build the model with with_lm=True.")
    if steps < 1 or batch_size < 1 or max_texts < 1:
        raise ConfigError("t2c warm-up steps, batch size and max_texts must be >= 1.")
    t0 = time.perf_counter()
    device = torch.device(device) if device is not None else model.device
    rng = np.random.default_rng(seed)
    uniq, inverse = np.unique(np.asarray(train.texts, dtype=object), return_inverse=True)
    cells = np.arange(len(train))
    if len(uniq) > max_texts:
        keep = np.sort(rng.choice(len(uniq), size=max_texts, replace=False))
        remap = np.full(len(uniq), -1)
        remap[keep] = np.arange(max_texts)
        inverse = remap[inverse]
        cells = cells[inverse >= 0]
        uniq = uniq[keep]
    states, padding = _cache_states(model, [str(t) for t in uniq], device)
    source = measured_group.cpu().numpy() if measured is not None and measured_group is not None else None
    target_np, count, g_text, g_src, _ = group_means(train, cells, inverse, source, scale=scale)
    targets = torch.from_numpy(target_np).to(device)
    g_text_t = torch.from_numpy(g_text).to(device)
    if measured is None:
        g_mask = None
    elif source is None:
        g_mask = measured.to(device).expand(len(count), -1)
    else:
        g_mask = measured.to(device).index_select(0, torch.from_numpy(g_src).to(device))
    cells_per_group = torch.from_numpy(count.astype(np.float32)).to(device)
    weight = torch.ones_like(cells_per_group) if balanced else cells_per_group

    params = [p for n, p in net.text_to_cell.named_parameters() if n != "dummy_embeds"]
    params += list(net.cell_decoder.parameters())
    if not all(p.requires_grad for p in params):
        raise ConfigError("The text-to-cell warm-up trains the projector and the decoder: call "
                          "net.set_trainable with a stage that trains them (stage2 or generate) first.")
    bias = net.cell_decoder.bias
    if not bool(bias.detach().any()):
        # a new decoder's per-gene bias starts at the training cells' mean profile (its attention
        # read-out starts random, and dominates the first loss: 12.0 against 12.1 with a zero bias)
        with torch.no_grad():
            bias.copy_((targets * cells_per_group[:, None]).sum(0) / cells_per_group.sum())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = linear_schedule(optimizer, max(1, steps // 10), steps)
    gen = torch.Generator().manual_seed(seed)
    gene_emb = net.cell_encoder.gene_embeddings().detach()
    n_groups = len(count)
    full = n_groups <= batch_size
    losses = []
    net.text_to_cell.train()
    for _ in range(steps):
        if full:
            pick, w = torch.arange(n_groups, device=device), weight
        else:
            # groups drawn in proportion to their weight, then weighted equally: unbiased for the loss
            pick = torch.multinomial(weight.cpu(), batch_size, replacement=True, generator=gen).to(device)
            w = torch.ones(batch_size, device=device)
        t_idx = g_text_t.index_select(0, pick)
        feats = net.text_to_cell(states[t_idx], key_padding_mask=None if padding is None else padding[t_idx])
        loss = pcgen_loss(net.cell_decoder(feats, gene_emb), targets.index_select(0, pick),
                          None if g_mask is None else g_mask.index_select(0, pick), weight=w)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return {"steps": steps, "texts": int(len(uniq)), "groups": int(n_groups), "cells": int(len(cells)),
            "loss_first": float(losses[0]), "loss_last": float(torch.stack(losses[-10:]).mean()),
            "seconds": round(time.perf_counter() - t0, 2)}
