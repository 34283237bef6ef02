"""A Cell2Sentence-style baseline (Levine et al. 2024, "Cell2Sentence: Teaching Large Language
Models the Language of Biology", ICML): a cell is written as the names of its ``n_genes``
most-expressed genes in decreasing order, and a text-only causal LM (the same LM and LoRA rank as
scMMGPT's) is fine-tuned on both directions:

* describe: ``"Cell sentence: G1 G2 ... Gk.\\nDescription:"`` -> the description;
* generate: ``"Description: <text, first max_text_len tokens>\\nCell sentence:"`` -> ``" G1 G2 ... Gk."``.

Loss is on the answer tokens only. A generated sentence becomes an expression profile with C2S's
rank-to-expression map: on the training cells, the eq.-1 value of the gene at rank ``r`` is fitted
as ``a * log10(r) + b`` (least squares), and genes not named get 0. This is also the paper's
"cell-sentence input" ablation (Table 4): the same LM reads gene names instead of the encoder's
cell tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.sparse as sp
import torch

__all__ = ["cell_sentences", "RankToExpression", "CellSentenceLM", "CellSentenceConfig"]


def cell_sentences(expr: sp.csr_matrix, gene_names: Sequence[str], n_genes: int) -> list[str]:
    """The ``n_genes`` highest-valued genes of each row of ``expr`` (CSR, cells x genes), highest first
    (ties: lower column first), joined by spaces."""
    expr = sp.csr_matrix(expr)
    names = np.asarray(gene_names, dtype=object)
    out = []
    for i in range(expr.shape[0]):
        lo, hi = expr.indptr[i], expr.indptr[i + 1]
        cols, vals = expr.indices[lo:hi], expr.data[lo:hi]
        order = np.lexsort((cols, -vals))[:n_genes]
        out.append(" ".join(names[cols[order]]))
    return out


@dataclass
class RankToExpression:
    """C2S's map from a gene's rank in a sentence to its eq.-1 value: ``a * log10(rank) + b``."""

    slope: float
    intercept: float

    @classmethod
    def fit(cls, expr: sp.csr_matrix, n_genes: int) -> "RankToExpression":
        """Least squares over the top ``n_genes`` (rank, value) pairs of every cell of ``expr``."""
        expr = sp.csr_matrix(expr)
        ranks, values = [], []
        for i in range(expr.shape[0]):
            v = np.sort(expr.data[expr.indptr[i]:expr.indptr[i + 1]])[::-1][:n_genes]
            ranks.append(np.arange(1, len(v) + 1))
            values.append(v)
        r, v = np.concatenate(ranks), np.concatenate(values)
        if len(r) < 2 or np.ptp(r) == 0:
            raise ValueError("Need cells with at least two expressed genes to fit rank -> expression.")
        a, b = np.polyfit(np.log10(r), v, 1)
        return cls(float(a), float(b))

    def profiles(self, sentences: Sequence[str], gene_names: Sequence[str]) -> tuple[np.ndarray, float]:
        """(n, n_genes_total) eq.-1 values from sentences, and the fraction of generated words that
        were real, first-time gene names (the rest are ignored)."""
        index = {g.upper(): j for j, g in enumerate(gene_names)}
        out = np.zeros((len(sentences), len(gene_names)), dtype=np.float32)
        valid = total = 0
        for i, s in enumerate(sentences):
            seen: set[int] = set()
            rank = 0
            for w in re.split(r"[\s,.;]+", s.strip()):
                if not w:
                    continue
                total += 1
                j = index.get(w.upper())
                if j is None or j in seen:
                    continue
                seen.add(j)
                rank += 1
                valid += 1
                out[i, j] = max(0.0, self.slope * math.log10(rank) + self.intercept)
        return out, valid / max(total, 1)


@dataclass
class CellSentenceConfig:
    """Fine-tuning settings; the benchmarks give it scMMGPT's stage-2 budget."""

    n_genes: int = 64
    """Genes per cell sentence (C2S uses 100; fewer keeps CPU runs short)."""
    steps: int = 60
    batch_size: int = 8
    """Cells per step; each cell gives one example of each direction."""
    lr: float = 2e-3
    warmup_steps: int = 6
    weight_decay: float = 0.001
    max_text_len: int = 32
    """Description tokens kept (as scMMGPT's ``lm.max_text_len``)."""
    seed: int = 0


class CellSentenceLM:
    """The text-only LM baseline. ``lm_config``: an :class:`~scmmgpt.models.config.LMConfig` (LM name,
    LoRA rank), the same one scMMGPT uses."""

    def __init__(self, lm_config, config: CellSentenceConfig | None = None, *, device: str = "cpu") -> None:
        from ..models.config import ModelConfig
        from ..models.scmmgpt import load_lm

        self.config = config or CellSentenceConfig()
        torch.manual_seed(self.config.seed)
        # the baseline trains and generates in fp32 (no autocast), so its LM weights are fp32 too
        if lm_config.dtype == "auto":
            lm_config = dataclasses.replace(lm_config, dtype="float32")
        self.lm, self.tok = load_lm(ModelConfig(lm=lm_config))
        self.lm.to(device)
        self.device = torch.device(device)

    # ------------------------------------------------------------------------------- token layout
    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _describe_prompt(self, sentence: str) -> list[int]:
        return self._ids(f"Cell sentence: {sentence}.") + self._ids("\nDescription:")

    def _generate_prompt(self, description: str) -> list[int]:
        # the description is cut to max_text_len tokens, as scMMGPT's text-to-cell input is
        return self._ids("Description:") + self._ids(" " + description)[: self.config.max_text_len] + \
            self._ids("\nCell sentence:")

    def _example(self, prompt: list[int], answer: str, max_answer: int) -> tuple[list[int], list[int]]:
        a = self._ids(" " + answer)[: max_answer - 1] + [self.tok.eos_token_id]
        return prompt + a, [-100] * len(prompt) + a

    def _loss(self, examples: list[tuple[list[int], list[int]]]) -> torch.Tensor:
        """Mean next-token cross-entropy on answer tokens; the LM head runs on those positions only."""
        T = max(len(x) for x, _ in examples)
        ids = torch.full((len(examples), T), self.tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), T), -100, dtype=torch.long)
        mask = torch.zeros((len(examples), T), dtype=torch.long)
        for i, (x, y) in enumerate(examples):                           # right padding for training
            ids[i, : len(x)] = torch.tensor(x)
            labels[i, : len(y)] = torch.tensor(y)
            mask[i, : len(x)] = 1
        ids, labels, mask = ids.to(self.device), labels.to(self.device), mask.to(self.device)
        base = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
        hidden = base.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        target = labels[:, 1:]
        keep = target != -100
        logits = base.lm_head(hidden[keep]).float()
        return torch.nn.functional.cross_entropy(logits, target[keep])

    # ------------------------------------------------------------------------------- training
    def fit(self, sentences: Sequence[str], descriptions: Sequence[str], *, progress: bool = False) -> list[float]:
        """Fine-tune LoRA on both directions for ``config.steps`` steps; returns the loss per step."""
        from tqdm.auto import tqdm

        from ..train.schedule import linear_schedule

        c = self.config
        if len(sentences) != len(descriptions) or not sentences:
            raise ValueError("Need one description per cell sentence (and at least one).")
        params = [p for p in self.lm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        sched = linear_schedule(opt, c.warmup_steps, c.steps)
        rng = np.random.default_rng(c.seed)
        gene_budget = 8 * c.n_genes                                      # generous: a symbol is 1-4 tokens
        order = rng.permutation(len(sentences))
        pos, losses = 0, []
        self.lm.train()
        for _ in tqdm(range(c.steps), disable=not progress, desc="cell-sentence LM"):
            if pos + c.batch_size > len(order):
                order, pos = rng.permutation(len(sentences)), 0
            idx = order[pos:pos + c.batch_size]
            pos += c.batch_size
            ex = [self._example(self._describe_prompt(sentences[i]), descriptions[i], c.max_text_len) for i in idx]
            ex += [self._example(self._generate_prompt(descriptions[i]), sentences[i] + ".", gene_budget)
                   for i in idx]
            loss = self._loss(ex)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        self.lm.eval()
        return losses

    # ------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], max_new_tokens: int, *, do_sample: bool, seed: int | None,
                  batch_size: int) -> list[str]:
        out: list[str] = []
        was = self.lm.training
        self.lm.eval()
        pad = self.tok.pad_token_id
        with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
            if seed is not None:
                torch.manual_seed(seed)
            try:
                for s in range(0, len(prompts), batch_size):
                    chunk = prompts[s:s + batch_size]
                    T = max(len(p) for p in chunk)                     # left padding for generation
                    ids = torch.tensor([[pad] * (T - len(p)) + p for p in chunk], device=self.device)
                    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in chunk], device=self.device)
                    kw = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, eos_token_id=self.tok.eos_token_id,
                              pad_token_id=pad)
                    if do_sample:
                        kw.update(temperature=1.0, top_p=0.95)
                    res = self.lm.generate(input_ids=ids, attention_mask=mask, **kw)
                    out += [t.strip() for t in self.tok.batch_decode(res[:, T:], skip_special_tokens=True)]
            finally:
                self.lm.train(was)
        return out

    def describe(self, sentences: Sequence[str], *, max_new_tokens: int = 32, batch_size: int = 16) -> list[str]:
        """Greedy descriptions of cells given as sentences."""
        return self._generate([self._describe_prompt(s) for s in sentences], max_new_tokens,
                              do_sample=False, seed=None, batch_size=batch_size)

    def generate_sentences(self, descriptions: Sequence[str], *, seed: int = 0, batch_size: int = 16,
                           max_new_tokens: int | None = None) -> list[str]:
        """Sampled cell sentences (top-p 0.95, temperature 1) from descriptions; ``seed`` fixes them."""
        n = max_new_tokens or 5 * self.config.n_genes
        return self._generate([self._generate_prompt(d) for d in descriptions], n, do_sample=True, seed=seed,
                              batch_size=batch_size)
