"""Training objectives of scMMGPT (paper §3.3), each a function returning tensors.

* CTC, eq. 2: symmetric InfoNCE over cosine similarities / temperature. Cells whose descriptions
  are identical are positives of each other (targets spread over them, as BLIP does for
  image-text pairs sharing an id), never negatives. Under several processes the features are
  gathered (BLIP-2), so every cell sees the texts of the whole global batch as negatives.
* CTM, eq. 3: matched / unmatched classification on Q-Former outputs; one hard negative text per
  cell and one hard negative cell per text, sampled in proportion to similarity (BLIP-2), with
  same-description pairs excluded.
* CDGen, eq. 5: next-token loss on description tokens only (labels -100 elsewhere).
* PCGen, eq. 6: MSE between generated and true eq.-1 values, averaged over the genes the cell's
  dataset measured.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

__all__ = ["similarity", "ctc_loss", "gather_with_grad", "sample_hard_negatives", "ctm_loss", "cdgen_loss", "pcgen_loss"]


def similarity(cell_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """Cell-text cosine similarity, max over query tokens (BLIP-2), in fp32 (also under autocast:
    bf16 would round cosines to ~4e-3, i.e. ~0.06 in logits at temperature 0.07).

    ``cell_feats`` (Bc, Q, D) and ``text_feats`` (Bt, D), both L2-normalised -> (Bc, Bt).
    """
    with torch.autocast(cell_feats.device.type, enabled=False):
        return torch.einsum("cqd,td->ctq", cell_feats.float(), text_feats.float()).amax(-1)


def _soft_target_nll(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the cross-entropy against a target spread uniformly over ``pos``."""
    pos = pos.float()
    return -(F.log_softmax(logits.float(), dim=1) * pos / pos.sum(1, keepdim=True)).sum(1).mean()


def ctc_loss(sim: torch.Tensor, temperature: torch.Tensor | float, same: torch.Tensor | None = None, *,
             sim_t2c: torch.Tensor | None = None, same_t2c: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE (paper eq. 2) on a cell x text similarity matrix.

    Parameters
    ----------
    sim
        (Bc, Bt) cosine similarities, ``sim[i, j] = cos(cell_i, text_j)``.
    temperature
        tau.
    same
        (Bc, Bt) bool, True where cell i and text j share a description (diagonal included). Such
        pairs are all positives: the target distribution is uniform over them.
    sim_t2c, same_t2c
        The text -> cell direction when it is not ``sim.t()``: with features gathered across
        processes (BLIP-2), each process scores its own cells against every text (``sim``) and its
        own texts against every cell (``sim_t2c``), so the mean of the processes' losses is the
        loss of the whole batch.
    """
    if same is None:
        same = torch.eye(*sim.shape, dtype=torch.bool, device=sim.device)
    if sim_t2c is None:
        sim_t2c, same_t2c = sim.t(), same.t()
    elif same_t2c is None:
        raise ValueError("ctc_loss: sim_t2c needs same_t2c.")
    return 0.5 * (_soft_target_nll(sim / temperature, same) + _soft_target_nll(sim_t2c / temperature, same_t2c))


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each process the summed gradient of its own rows (an
    all-reduce, then this process's slice), which every backend supports (gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        ctx.rows, ctx.rank = t.shape[0], dist.get_rank()
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` over every process along dim 0 (equal shapes on every process), with
    gradients: the loss of every process reaches each process's own rows (BLIP-2's gathered
    contrastive features, Li et al. 2023)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    return _GatherWithGrad.apply(t)  # type: ignore[no-untyped-call]


def sample_hard_negatives(sim: torch.Tensor, same: torch.Tensor, generator: torch.Generator | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each cell a negative text, for each text a negative cell, drawn with probability
    ``softmax(sim)`` over pairs that do not share a description.

    Returns ``(neg_text_for_cell, neg_cell_for_text)``, each (B,) long; ``-1`` where no valid
    negative exists (the whole batch shares one description).
    """
    with torch.no_grad():
        w = sim.float().masked_fill(same, float("-inf"))
        valid_c = torch.isfinite(w).any(1)
        valid_t = torch.isfinite(w).any(0)
        p_c = torch.softmax(w.masked_fill(~valid_c[:, None], 0.0), 1)
        p_t = torch.softmax(w.t().masked_fill(~valid_t[:, None], 0.0), 1)
        neg_t = torch.multinomial(p_c, 1, generator=generator).squeeze(1)
        neg_c = torch.multinomial(p_t, 1, generator=generator).squeeze(1)
        neg_t = torch.where(valid_c, neg_t, torch.full_like(neg_t, -1))
        neg_c = torch.where(valid_t, neg_c, torch.full_like(neg_c, -1))
    return neg_t, neg_c


def ctm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the 2-way matching head (paper eq. 3). ``logits`` (N, 2), ``labels`` (N,)."""
    return F.cross_entropy(logits.float(), labels)


def cdgen_loss(logits: torch.Tensor, labels: torch.Tensor, *, shifted: bool = False,
               head: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Next-token loss (paper eq. 5), the mean over the labelled positions. ``logits`` (B, T, V)
    predict position t+1 of ``labels`` (B, T), with -100 outside the description; ``shifted``: they
    are already aligned (``logits[:, t]`` predicts ``labels[:, t]``). Only the labelled rows are cast
    to fp32 (a batch's logits over a 49k vocabulary are ~100 MB in fp32). With ``head`` (the LM's
    vocabulary head), ``logits`` are the hidden states (B, T, d) and the head is applied to the
    labelled rows alone."""
    if not shifted:
        logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != -100
    rows = logits[keep]
    return F.cross_entropy((rows if head is None else head(rows)).float(), labels[keep])


def measured_rows(masks: torch.Tensor | None, group: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    """The PCGen mask of the cells at ``index``: the shared (V,) mask when ``group`` is ``None``,
    else each cell's source's row of the (G, V) ``masks`` (``group``: (N,) source of every cell)."""
    if masks is None or group is None:
        return masks
    return masks.index_select(0, group.index_select(0, index.to(group.device)))


def pcgen_loss(pred: torch.Tensor, target: torch.Tensor, measured: torch.Tensor | None = None,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """MSE over genes (paper eq. 6), averaged over measured genes then over cells.

    ``pred``, ``target`` (B, V); ``measured`` (V,) or (B, V) bool — genes the dataset measured
    (unmeasured genes have no truth and are left out); ``weight`` (B,): the rows' weights in the
    average over cells (equal when ``None``; the text-to-cell warm-up's rows are group means,
    weighted by their cell counts or equally).
    """
    err = (pred.float() - target.float()) ** 2
    if measured is None:
        per_row = err.mean(1)
    else:
        m = measured.to(err.dtype)
        if m.dim() == 1:
            m = m.expand_as(err)
        per_row = (err * m).sum(1) / m.sum(1).clamp(min=1)
    if weight is None:
        return per_row.mean()
    w = weight.to(per_row.dtype)
    return (per_row * w).sum() / w.sum()
