"""Tools: AnnData in, AnnData out (scanpy conventions).

* :func:`embed` — cell embeddings into ``.obsm``;
* :func:`annotate` — zero-shot cell types from free-text label sets into ``.obs``;
* :func:`describe` — a generated description of each cell into ``.obs``;
* :func:`generate` — pseudo-cells from text, as a new AnnData;
* :func:`search` — the cells best matching a text query;
* :func:`transfer_labels` — labels of a reference carried to query cells by k-NN in the embedding.

``model`` is an :class:`~scmmgpt.models.scmmgpt.ScMMGPT` or the folder of a saved one.
"""

from ._common import GeneCoverageWarning, UntrainedWarning
from .annotate import annotate
from .embed import embed, search
from .generate import describe, generate
from .transfer import transfer_labels

__all__ = ["embed", "annotate", "describe", "generate", "search", "transfer_labels", "GeneCoverageWarning", "UntrainedWarning"]
