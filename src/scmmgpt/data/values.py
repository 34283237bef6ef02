"""What kind of numbers a matrix holds, and the normalisation of scMMGPT (paper eq. 1).

scMMGPT represents gene ``j`` of a cell by ``x~_j = log(1 + x_j / sum_k x_k)`` computed from raw
counts (Shi et al. 2025, eq. 1). Users often hand over matrices that are already transformed; this
module tells the cases apart and never silently treats z-scores as counts.

======================  =================================  ===========================================
kind                    how it is recognised               what :func:`normalize_total_log1p` does
======================  =================================  ===========================================
``"counts"``            non-negative integers              eq. 1 directly
``"lognorm"``           non-negative, non-integer,         ``expm1`` recovers values proportional to
                        max <= 20 (``log1p`` of scaled     counts (Seurat/scanpy ``log1p(x/s*1e4)``),
                        counts)                            then eq. 1 (exact up to the size factor)
``"normalized"``        non-negative, non-integer,         values proportional to counts (CPM, TPM):
                        max > 20                           eq. 1 directly
``"scaled"``            any negative value                 refused: z-scores cannot be inverted. Pass
                                                           the counts (a layer or ``.raw``) instead,
                                                           or ``value_kind="as_is"`` to take the
                                                           values unchanged at your own risk
======================  =================================  ===========================================
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

from ..errors import InputDataError

ValueKind = Literal["counts", "lognorm", "normalized", "scaled"]
ValueKindArg = Literal["auto", "counts", "lognorm", "normalized", "as_is"]

#: Largest value a log1p-transformed matrix is expected to reach (log1p(1e8) ~= 18.4).
LOGNORM_MAX = 20.0

__all__ = [
    "ValueKind",
    "detect_value_kind",
    "check_finite",
    "normalize_total_log1p",
    "quantile_bin",
]


def _data_values(X: Any) -> np.ndarray:
    """The stored values of a dense or sparse matrix (zeros of a sparse matrix excluded)."""
    if sp.issparse(X):
        return np.asarray(X.data)
    return np.asarray(X).ravel()


def check_finite(X: Any, *, where: str = "matrix") -> None:
    """Raise :class:`InputDataError` if ``X`` holds NaN or infinite values."""
    data = _data_values(X)
    if data.dtype.kind not in "fiub":
        raise InputDataError(f"The {where} has dtype {data.dtype}; expected numbers. Convert it with X.astype('float32').")
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data)
        if bad.any():
            raise InputDataError(
                f"The {where} holds {int(bad.sum())} NaN/inf values. Remove or impute them (e.g. "
                f"`adata.X = np.nan_to_num(adata.X)` if they stand for zero) before using scmmgpt."
            )


def detect_value_kind(X: Any, *, max_check: int = 2_000_000) -> ValueKind:
    """Classify the values of a cell x gene matrix.

    Parameters
    ----------
    X
        Dense array or scipy sparse matrix, cells x genes.
    max_check
        At most this many stored values are inspected (a deterministic sample) so detection stays
        cheap on large matrices.

    Returns
    -------
    ``"counts"``, ``"lognorm"``, ``"normalized"`` or ``"scaled"`` (see the module docstring).
    """
    check_finite(X)
    data = _data_values(X)
    if data.size == 0:
        return "counts"
    if data.size > max_check:
        step = data.size // max_check + 1
        data = data[::step]
    if (data < 0).any():
        return "scaled"
    if data.dtype.kind in "iub" or np.all(np.mod(data, 1.0) == 0):
        return "counts"
    if data.max() <= LOGNORM_MAX:
        return "lognorm"
    return "normalized"


def normalize_total_log1p(
    X: Any,
    *,
    value_kind: ValueKindArg = "auto",
    target_sum: float = 1.0,
    where: str = "matrix",
) -> tuple[sp.csr_matrix, ValueKind | Literal["as_is"]]:
    """Apply paper eq. 1, ``log(1 + target_sum * x_j / sum_k x_k)``, per cell.

    Parameters
    ----------
    X
        Cells x genes, dense or sparse.
    value_kind
        ``"auto"`` detects the kind (:func:`detect_value_kind`); otherwise the caller's statement
        is trusted. ``"as_is"`` returns the values unchanged (already on the model's scale).
    target_sum
        ``1.0`` is eq. 1 exactly. Larger values (``1e4`` = log-CP10k) spread the values out; the
        model config records which one the weights were trained with.
    where
        Name of the matrix in error messages (``"adata.X"``, ``"layer 'counts'"``).

    Returns
    -------
    ``(csr_float32, kind)`` with explicit zeros removed.

    Raises
    ------
    InputDataError
        For NaN/inf, for negative values in a counts path and for scaled data unless ``"as_is"``.
    """
    kind = detect_value_kind(X) if value_kind == "auto" else value_kind
    X = sp.csr_matrix(X, dtype=np.float32, copy=True)
    check_finite(X, where=where)
    if kind == "as_is":
        X.eliminate_zeros()
        return X, "as_is"
    if kind == "scaled" or (X.data < 0).any():
        raise InputDataError(
            f"The {where} holds negative values: it looks scaled (z-scored), and scaled data cannot be "
            f"turned back into counts. Pass raw counts instead (e.g. layer='counts' or use_raw=True), "
            f"or value_kind='as_is' to feed the values unchanged."
        )
    if kind == "counts" and X.data.size and np.any(np.mod(X.data, 1.0) != 0):
        warnings.warn(
            f"value_kind='counts' was given but the {where} holds non-integer values; "
            "they are normalised as if they were counts.",
            stacklevel=2,
        )
    if kind == "lognorm":
        np.expm1(X.data, out=X.data)
    totals = np.asarray(X.sum(axis=1)).ravel()
    nonzero = totals > 0
    scale = np.zeros_like(totals, dtype=np.float64)
    scale[nonzero] = target_sum / totals[nonzero]
    X = sp.csr_matrix(sp.diags(scale.astype(np.float32)) @ X)
    np.log1p(X.data, out=X.data)
    X.eliminate_zeros()
    return X, kind


def quantile_bin(values: np.ndarray, n_bins: int = 51, *, seed: int = 0) -> np.ndarray:
    """scGPT-style per-cell value binning (Cui et al. 2024, "value binning").

    The non-zero values of one cell are mapped to bins ``1 .. n_bins - 1`` by the cell's own
    quantiles, so the representation is comparable across sequencing depths; zeros stay ``0``.
    scGPT's pretrained checkpoints were trained on these bin indices (``n_bins=51``), so use this
    when loading such weights.

    Ties as scGPT breaks them: a value equal to several bin edges (common in count data, where
    many genes of a cell hold the same small count) is spread uniformly at random over the bins
    those edges span, instead of all landing in the highest. The draw is
    ``RandomState(seed).random_sample`` over the non-zero values in the order given, which is
    scGPT's ``np.random.rand`` after ``np.random.seed(seed)``, so a cell's bins are reproducible.

    Parameters
    ----------
    values
        1-D array of one cell's expression values.
    n_bins
        Number of bins including the zero bin.
    seed
        Seed of the tie-breaking draw (the datasets pass the cell's index).
    """
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float32)
    out = np.zeros(values.shape, dtype=np.float32)
    nz = values > 0
    if not nz.any():
        return out
    x = values[nz]             # edges in the values' own precision (float32 here, as in scGPT)
    edges = np.quantile(x, np.linspace(0, 1, n_bins - 1))
    # edges[i-1] <= v < edges[i] -> bin i (left); edges[i-1] < v <= edges[i] -> bin i (right). They
    # differ only where v equals edges; a uniform draw picks one bin of (right, left].
    left = np.digitize(x, edges)
    right = np.digitize(x, edges, right=True)
    u = np.random.RandomState(seed).random_sample(x.size)
    out[nz] = np.ceil(u * (right - left) + left)
    return out
    edges = np.quantile(values[nz], np.linspace(0, 1, n_bins - 1))
    # edges[i-1] <= v < edges[i] -> bin i; the minimum lands in bin 1, the maximum in n_bins - 1
    out[nz] = np.digitize(values[nz], edges)
    return out
