"""Shared fixtures: real datasets and a repo-local asset cache.

The default suite runs on data the repository has: scanpy's bundled ``pbmc68k_reduced`` and
``tests/assets/pbmc3k_3000genes.h5ad`` (the 10x PBMC 3k cells with their 9 labelled types, the 3000
genes with the most counts). Tests that read ``../shared/data`` (the workspace's larger real
datasets) are marked ``@pytest.mark.shared_data``: where that folder is missing they are reported
as skipped, by name; ``data_path`` refuses to serve a test that is not marked.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SCMMGPT_SHARED_DATA", ROOT.parent / "shared" / "data"))
ASSETS = ROOT / "tests" / "assets"
PBMC3K = ASSETS / "pbmc3k_3000genes.h5ad"
# Converted assets (SmolLM2 safetensors) are cached once per checkout, not per test.
os.environ.setdefault("SCMMGPT_CACHE", str(ROOT / ".cache" / "scmmgpt"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATASETS = [
    "pbmc3k_clustifyr.h5ad",
    "soupx_pbmc4k.h5ad",
    "symphony_pbmcs_small.h5ad",
    "muscat_kang_se.h5ad",
    "cluey_mouse_lung.h5ad",
    "cider_baron_pancreas.h5ad",
]

_CURRENT: dict = {}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before any fixture of ``item``: skip it, visibly, when it needs ../shared/data and that is missing."""
    _CURRENT["item"] = item
    if item.get_closest_marker("shared_data") is not None and not DATA.is_dir():
        pytest.skip(f"needs the workspace datasets in {DATA} (shared_data); not present here")


def data_path(name: str) -> Path:
    """A file of ``../shared/data``, for tests marked ``shared_data`` only."""
    item = _CURRENT.get("item")
    if item is not None and item.get_closest_marker("shared_data") is None:
        raise RuntimeError(f"{item.nodeid} reads {DATA / name}: mark it @pytest.mark.shared_data, so that it is "
                           "reported as skipped where the folder is missing (or use tests/assets).")
    path = DATA / name
    if not path.exists():
        pytest.skip(f"shared dataset {path} not available")
    return path


@pytest.fixture(scope="session")
def pbmc3k():
    """Real PBMCs from the repository: 2638 cells x 3000 genes, raw counts, 9 CL-labelled types."""
    import anndata as ad

    return ad.read_h5ad(PBMC3K)


@pytest.fixture(scope="session")
def pbmc3k_full():
    """The whole pbmc3k_clustifyr file of ../shared/data (13714 genes, Seurat's log-normalised layer)."""
    import anndata as ad

    return ad.read_h5ad(data_path("pbmc3k_clustifyr.h5ad"))


@pytest.fixture(scope="session")
def pbmc3k_vocab(pbmc3k):
    from scmmgpt.data import GeneVocab

    return GeneVocab.from_genes(pbmc3k.var_names)


@pytest.fixture(scope="session")
def pbmc68k():
    import scanpy as sc

    return sc.datasets.pbmc68k_reduced()
