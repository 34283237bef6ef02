"""The input gene panel: the genes a model reads cells through.

Datasets measure different genes. A 10x file holds every gene, while many published matrices keep
only their 1-3k variable genes. Top-k tokenisation over all measured genes then reads two very
different things. In a whole-transcriptome cell, the top slots go to ribosomal and mitochondrial
genes. In a variable-gene matrix, they go to markers. Eq. 1 also divides by a total over different
genes, so the same cell gets values on another scale. A model pre-trained mostly on variable-gene
matrices then misreads whole-transcriptome cells (measured: ``benchmarks/results/recipe/README.md``,
"gene panels").

A model with an input panel reads every cell through the same genes:

* its tokens come only from the panel's genes;
* eq. 1 is applied again over them (:func:`~scmmgpt.data.dataset.tokenize_cell`).

The panel is chosen once, from the training cells. Its genes are the highly variable genes of
each source dataset, among those measured for most training cells (:func:`variable_genes`). This
follows the dispersion method of Satija et al. 2015 (Seurat) as scanpy implements it with
``batch_key``: genes are binned by mean, and their log-dispersion is z-scored within each bin.
Genes that are variable in more sources rank first.
"""

from __future__ import annotations

import numpy as np

from .source import CellSource, measured_genes

__all__ = ["variable_genes"]

#: Mean-expression bins of the dispersion normalisation (Seurat's default).
N_MEAN_BINS = 20
#: Share of the training cells whose dataset must have measured a panel gene.
MIN_COVERAGE = 0.5


def _moments(cells: CellSource, rows: np.ndarray, n_genes: int, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and variance of ``rows`` on the normalised (not log) scale,
    ``expm1`` of the eq.-1 values, zeros included, read in chunks (as Seurat computes them)."""
    s = np.zeros(n_genes)
    sq = np.zeros(n_genes)
    for start in range(0, len(rows), chunk):
        x = cells.rows_csr(rows[start:start + chunk]).astype(np.float64)
        np.expm1(x.data, out=x.data)
        s += np.asarray(x.sum(axis=0)).ravel()
        sq += np.asarray(x.multiply(x).sum(axis=0)).ravel()
    n = len(rows)
    mean = s / n
    # unbiased, as scanpy's seurat flavour
    return mean, np.maximum(sq - n * mean ** 2, 0.0) / max(1, n - 1)


def _normalised_dispersion(mean: np.ndarray, var: np.ndarray, genes: np.ndarray) -> np.ndarray:
    """Seurat's normalised dispersion of ``genes``: ``log(var / mean)``, z-scored within 20
    equal-width bins of ``log1p(mean)``."""
    m, v = mean[genes], var[genes]
    disp = np.log(np.maximum(v / m, 1e-12))
    lm = np.log1p(m)
    edges = np.linspace(lm.min(), lm.max(), N_MEAN_BINS + 1)
    bins = np.clip(np.digitize(lm, edges[1:-1]), 0, N_MEAN_BINS - 1)
    z = np.zeros_like(disp)
    for b in np.unique(bins):
        sel = bins == b
        sd = disp[sel].std(ddof=1) if sel.sum() > 1 else 0.0
        # a bin of one gene carries no ranking information: Seurat (and scanpy) set it to 1
        z[sel] = (disp[sel] - disp[sel].mean()) / sd if sd > 0 else 1.0
    return z


def variable_genes(cells: CellSource, n: int, *, min_coverage: float = MIN_COVERAGE) -> np.ndarray | None:
    """The ``n`` most variable vocabulary genes of ``cells`` among those measured for at least
    ``min_coverage`` of the cells, as vocabulary indices (best first). ``None`` when every gene
    measured qualifies and they are at most ``n``: then the panel would be every gene, and cells are
    read as they are.

    Each source dataset (:func:`~scmmgpt.data.source.measured_genes`) ranks the genes it measured
    and expressed by normalised dispersion and marks its top ``n``. Genes are then ordered by the
    number of sources that mark them, then by their mean normalised dispersion over the sources
    that measured them, then by index.

    Why the coverage: a corpus joins whole-transcriptome files with variable-gene matrices (Kang et
    al.'s 1,276 genes hold most of the workspace's cells). A gene that most training cells never
    show makes a user's whole-transcriptome cell look unlike them. Integration methods pick their
    features among the genes the datasets share for the same reason (Seurat's
    ``SelectIntegrationFeatures``, Stuart et al. 2019). A strict intersection would keep too few
    genes here, so ``min_coverage`` asks for a majority of the cells instead.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    mg = measured_genes(cells)
    present, counts = np.unique(mg.group, return_counts=True)
    coverage = (counts[:, None] * mg.masks[present]).sum(axis=0) / counts.sum()
    eligible = coverage >= min_coverage - 1e-12
    if eligible.sum() == mg.masks[present].any(axis=0).sum() and eligible.sum() <= n:
        return None
    n_genes = mg.masks.shape[1]
    votes = np.zeros(n_genes)
    z_sum = np.zeros(n_genes)
    z_count = np.zeros(n_genes)
    for g in present:
        rows = np.flatnonzero(mg.group == g)
        if rows.size < 2:
            continue
        mean, var = _moments(cells, rows, n_genes)
        genes = np.flatnonzero(mg.masks[g] & (mean > 0) & eligible)
        if genes.size == 0:
            continue
        z = _normalised_dispersion(mean, var, genes)
        top = genes[np.lexsort((genes, -z))[:n]]
        votes[top] += 1
        z_sum[genes] += z
        z_count[genes] += 1
    candidates = np.flatnonzero(z_count > 0)
    mean_z = z_sum[candidates] / z_count[candidates]
    order = np.lexsort((candidates, -mean_z, -votes[candidates]))
    return candidates[order][:n]
