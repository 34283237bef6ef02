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
import torch

from ..data.dataset import CellTextDataset, tokenize_for_lm
from ..errors import ConfigError
from ..modules.losses import measured_rows, pcgen_loss
from .schedule import linear_schedule

__all__ = ["warm_up_text_to_cell"]


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


def warm_up_text_to_cell(model, train: CellTextDataset, *, steps: int, batch_size: int = 32, lr: float = 1e-3,
                         weight_decay: float = 0.001, measured: torch.Tensor | None = None,
                         measured_group: torch.Tensor | None = None, seed: int = 0,
                         max_texts: int = 2048, device: str | torch.device | None = None) -> dict:
    """Train the text-to-cell projector (not its dummy embeddings, which feed the LM) and the cell
    decoder for ``steps`` PCGen steps on cached LM states of ``train``'s descriptions.

    ``measured`` is the (V,) PCGen mask, or with ``measured_group`` ((N,) source of each training
    cell) the (G, V) masks of the sources.

    Both must already be trainable: the stage's entry in :data:`~scmmgpt.models.stages.STAGES`
    (``warm_up_text_to_cell``) says so, and ``set_trainable`` made them so; nothing is unfrozen here.

    Returns ``{"steps", "texts", "cells", "loss_first", "loss_last", "seconds"}``.
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
    meas = measured.to(device) if measured is not None else None
    group = measured_group.to(device) if measured_group is not None else None

    params = [p for n, p in net.text_to_cell.named_parameters() if n != "dummy_embeds"]
    params += list(net.cell_decoder.parameters())
    if not all(p.requires_grad for p in params):
        raise ConfigError("The text-to-cell warm-up trains the projector and the decoder: call "
                          "net.set_trainable with a stage that trains them (stage2 or generate) first.")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = linear_schedule(optimizer, max(1, steps // 10), steps)
    gen = torch.Generator().manual_seed(seed)
    gene_emb = net.cell_encoder.gene_embeddings().detach()
    losses = []
    net.text_to_cell.train()
    for _ in range(steps):
        pick = cells[torch.randint(len(cells), (batch_size,), generator=gen).numpy()]
        t_idx = torch.from_numpy(inverse[pick]).to(device)
        target = torch.from_numpy(train.cells.rows_csr(pick).toarray()).to(device)
        feats = net.text_to_cell(states[t_idx], key_padding_mask=None if padding is None else padding[t_idx])
        mask = measured_rows(meas, group, torch.from_numpy(pick))
        loss = pcgen_loss(net.cell_decoder(feats, gene_emb), target, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return {"steps": steps, "texts": int(len(uniq)), "cells": int(len(cells)), "loss_first": float(losses[0]),
            "loss_last": float(torch.stack(losses[-10:]).mean()), "seconds": round(time.perf_counter() - t0, 2)}
