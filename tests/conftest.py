"""Shared fixtures: real datasets from ../shared/data and a repo-local asset cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
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


def data_path(name: str) -> Path:
    path = DATA / name
    if not path.exists():
        pytest.skip(f"shared dataset {path} not available")
    return path


@pytest.fixture(scope="session")
def pbmc3k():
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
