"""Distances between sets of sentence embeddings, for scoring generated descriptions (paper §4.2,
Table 1): MMD, EMD, and the paper's tests that each generated text is closer to its own reference
than to an unrelated cell's.

Texts are embedded with a sentence-embedding model (default: the bundled all-MiniLM-L6-v2 with
mean pooling over tokens and L2 normalisation, exactly how sentence-transformers runs it; the paper
used a BGE model — any sentence-transformers model or Hugging Face encoder works by name or path).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

__all__ = ["SentenceEmbedder", "embed_texts", "mmd_rbf", "emd", "closeness_tests"]


class SentenceEmbedder:
    """Unit-norm sentence embeddings from a Hugging Face encoder.

    ``model``: ``"minilm-l6"`` (bundled, default) or any name/path. With ``sentence-transformers``
    installed a model it knows is run by it (its own pooling); otherwise tokens are mean-pooled
    over the attention mask and L2-normalised (all-MiniLM-L6-v2's pooling).
    """

    def __init__(self, model: str = "minilm-l6", *, device: str = "cpu", max_length: int = 256) -> None:
        from .. import assets

        self.name = str(model)
        self.path = assets.resolve_bert(model)
        self.device, self.max_length = device, max_length
        self._st = None
        try:  # pragma: no cover - optional dependency, not installed in CI
            from sentence_transformers import SentenceTransformer

            self._st = SentenceTransformer(self.path, device=device)
        except Exception:
            from transformers import AutoModel, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            self.model = AutoModel.from_pretrained(self.path).to(device).eval()

    def __call__(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        """``(len(texts), d)`` float32, unit norm."""
        import torch

        texts = [str(t) for t in texts]
        if self._st is not None:  # pragma: no cover
            return np.asarray(self._st.encode(texts, batch_size=batch_size, normalize_embeddings=True), np.float32)
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                enc = self.tokenizer(texts[i:i + batch_size], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                h = self.model(**enc).last_hidden_state                       # (b, T, d)
                m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                e = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
                out.append(torch.nn.functional.normalize(e, dim=-1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.config.hidden_size), np.float32)


@lru_cache(maxsize=4)
def _embedder(model: str, device: str) -> SentenceEmbedder:
    return SentenceEmbedder(model, device=device)


def embed_texts(texts: Sequence[str], *, model: str = "minilm-l6", device: str = "cpu",
                batch_size: int = 64) -> np.ndarray:
    """Sentence embeddings of ``texts`` with a cached :class:`SentenceEmbedder`."""
    return _embedder(str(model), device)(texts, batch_size=batch_size)


def _sq_dists(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return np.maximum(d, 0.0)


def mmd_rbf(x: np.ndarray, y: np.ndarray, *, bandwidth: float | None = None) -> float:
    """Squared maximum mean discrepancy between samples ``x`` (n, d) and ``y`` (m, d) with the RBF
    kernel ``k(a, b) = exp(-|a - b|^2 / (2 sigma^2))`` (Gretton et al. 2012, JMLR 13, eq. 5; the
    biased V-statistic, which is never negative).

    ``bandwidth`` = sigma; default: the median heuristic, sigma = median Euclidean distance between
    distinct points of the pooled sample (Gretton et al. 2012, §8).
    """
    x, y = _check_pair(x, y)
    if bandwidth is None:
        z = np.concatenate([x, y])
        d = np.sqrt(_sq_dists(z, z)[np.triu_indices(len(z), 1)])
        bandwidth = float(np.median(d)) if d.size and np.median(d) > 0 else 1.0
    if bandwidth <= 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}.")
    g = -1.0 / (2.0 * bandwidth ** 2)
    kxx, kyy, kxy = (np.exp(g * _sq_dists(a, b)).mean() for a, b in ((x, x), (y, y), (x, y)))
    return float(max(kxx + kyy - 2.0 * kxy, 0.0))


def emd(x: np.ndarray, y: np.ndarray) -> float:
    """Earth mover's (Wasserstein-1) distance between the empirical distributions of ``x`` and
    ``y`` (uniform weights, Euclidean ground cost), solved exactly by POT's network simplex."""
    import ot

    x, y = _check_pair(x, y)
    cost = np.sqrt(_sq_dists(x, y))
    return float(ot.emd2(np.full(len(x), 1.0 / len(x)), np.full(len(y), 1.0 / len(y)), cost))


def closeness_tests(generated: np.ndarray, reference: np.ndarray, groups: Sequence | None = None, *,
                    seed: int = 0) -> dict[str, float]:
    """The paper's significance tests (§4.2): is each generated text closer to its own reference
    than to the reference of an unrelated cell?

    ``generated[i]`` and ``reference[i]`` are unit-norm embeddings of cell ``i``'s generated and true
    description; ``groups[i]`` its cell type (unrelated = another type; without groups, any other
    cell). For each cell one unrelated reference is drawn (seeded) and cosine distances
    ``d_own = 1 - <g_i, r_i>``, ``d_other = 1 - <g_i, r_j>`` are compared by a one-sided paired
    t-test (``d_own < d_other``) and a one-sided two-sample Kolmogorov-Smirnov test (``d_own``
    stochastically smaller). Returns the statistics, p-values and mean distances.
    """
    from scipy import stats

    g, r = _check_pair(generated, reference)
    if len(g) != len(r) or len(g) < 3:
        raise ValueError(f"Need paired generated/reference embeddings for >= 3 cells, got {len(g)} and {len(r)}.")
    groups = np.arange(len(g)) if groups is None else np.asarray(groups)
    if len(groups) != len(g):
        raise ValueError(f"groups has {len(groups)} entries for {len(g)} cells.")
    rng = np.random.default_rng(seed)
    other = np.empty(len(g), dtype=int)
    for i in range(len(g)):
        pool = np.flatnonzero(groups != groups[i])
        if pool.size == 0:
            raise ValueError("Every cell has the same group: no unrelated reference to compare with.")
        other[i] = rng.choice(pool)
    d_own = 1.0 - (g * r).sum(1)
    d_other = 1.0 - (g * r[other]).sum(1)
    t = stats.ttest_rel(d_own, d_other, alternative="less")
    ks = stats.ks_2samp(d_own, d_other, alternative="greater")   # CDF of d_own above: d_own smaller
    return {"t_statistic": float(t.statistic), "t_pvalue": float(t.pvalue),
            "ks_statistic": float(ks.statistic), "ks_pvalue": float(ks.pvalue),
            "mean_distance_own": float(d_own.mean()), "mean_distance_unrelated": float(d_other.mean())}


def _check_pair(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or not len(x) or not len(y):
        raise ValueError(f"Need two non-empty (n, d) arrays of the same width, got {x.shape} and {y.shape}.")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("Embeddings contain NaN or inf.")
    return x, y
