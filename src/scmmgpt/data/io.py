"""Reading ``.h5ad`` files and choosing the expression matrix."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import pandas as pd

from ..errors import InputDataError

__all__ = ["read_h5ad", "select_matrix"]


def read_h5ad(path: str | os.PathLike[str], *, backed: bool = False) -> ad.AnnData:
    """Read an ``.h5ad`` file, in memory or backed (``backed=True`` keeps ``X`` on disk).

    Raises
    ------
    InputDataError
        If the file is missing, is not HDF5, or is truncated/corrupt — naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise InputDataError(f"File {path} does not exist. Check the path (relative paths start at {Path.cwd()}).")
    if path.is_dir():
        raise InputDataError(f"{path} is a directory; pass an .h5ad file.")
    if not h5py.is_hdf5(path):
        raise InputDataError(
            f"{path} is not an .h5ad (HDF5) file. Convert it first, e.g. with scanpy.read_10x_mtx / "
            f"anndata.read_csv followed by adata.write_h5ad()."
        )
    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as exc:  # h5py/anndata raise many types for broken files
        raise InputDataError(f"Could not read {path} as AnnData ({type(exc).__name__}: {exc}). "
                             f"The file may be truncated or corrupt; re-export it.") from None


def select_matrix(adata: ad.AnnData, *, layer: str | None = None, use_raw: bool = False) -> tuple[Any, Any, str]:
    """Pick the cell x gene matrix: ``adata.X``, ``adata.layers[layer]`` or ``adata.raw.X``.

    Returns
    -------
    ``(X, var_names, where)`` where ``where`` names the matrix for messages.
    """
    if layer is not None and use_raw:
        raise InputDataError("Pass either layer= or use_raw=True, not both.")
    if use_raw:
        if adata.raw is None:
            raise InputDataError("use_raw=True but adata.raw is empty. Use layer= or the default adata.X.")
        return adata.raw.X, pd.Index(adata.raw.var_names), "adata.raw.X"
    if layer is not None and layer != "X":
        if layer not in adata.layers:
            raise InputDataError(f"adata has no layer {layer!r}. Layers: {list(adata.layers.keys())}.")
        return adata.layers[layer], pd.Index(adata.var_names), f"adata.layers[{layer!r}]"
    if adata.X is None:
        raise InputDataError("adata.X is empty. Pass layer= naming the matrix of counts.")
    return adata.X, pd.Index(adata.var_names), "adata.X"
