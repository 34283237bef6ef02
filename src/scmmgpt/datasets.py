"""Bundled demo data: ``scanpy.datasets.pbmc68k_reduced()`` (700 real PBMCs, ships inside scanpy).

Its ``raw`` holds log-normalised values over 765 genes (detected as ``"lognorm"`` and inverted
before eq. 1); its ``X`` is scaled and must not be used as counts. The authors' ``bulk_labels``
are marker-style names the Cell Ontology does not know by label, so :data:`PBMC68K_LABEL_MAP`
maps each to its CL term (by hand, from the marker names).
"""

from __future__ import annotations

import anndata as ad

__all__ = ["pbmc68k_reduced", "PBMC68K_LABEL_MAP"]

#: ``bulk_labels`` of pbmc68k_reduced -> Cell Ontology id.
PBMC68K_LABEL_MAP = {
    "CD14+ Monocyte": "CL:0001054",
    "CD19+ B": "CL:0000236",
    "CD4+/CD25 T Reg": "CL:0000815",
    "CD8+ Cytotoxic T": "CL:0000625",
    "CD8+/CD45RA+ Naive Cytotoxic": "CL:0000900",
    "CD56+ NK": "CL:0000623",
    "CD4+/CD45RO+ Memory": "CL:0000897",
    "CD34+": "CL:0008001",
    "CD4+/CD45RA+/CD25- Naive T": "CL:0000895",
    "Dendritic": "CL:0000451",
}


def pbmc68k_reduced() -> ad.AnnData:
    """The 700-cell PBMC demo data with ``obs['cell_type']`` (= ``bulk_labels``) and
    ``obs['cell_type_ontology_term_id']`` added; use it with ``use_raw=True``."""
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()
    adata.obs["cell_type"] = adata.obs["bulk_labels"].astype(str)
    adata.obs["cell_type_ontology_term_id"] = adata.obs["cell_type"].map(PBMC68K_LABEL_MAP).fillna("")
    adata.obs["tissue"] = "blood"
    return adata
