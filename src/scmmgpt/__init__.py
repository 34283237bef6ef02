"""scmmgpt: a multimodal language model joining single-cell RNA-seq and natural language.

Implementation of scMMGPT (Shi et al., 2025, "Multimodal Language Modeling for High-Accuracy Single
Cell Transcriptomics Analysis and Generation").

``scmmgpt.tl`` (embed, annotate, describe, generate, search) and ``scmmgpt.pl`` (plots) follow
scanpy's conventions; :func:`load_model` reads a saved model; :func:`explore` starts the explorer
in the browser. They are imported on first use, so
``import scmmgpt`` stays light.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["tl", "pl", "load_model", "explore", "__version__"]


def load_model(path, *, with_lm=None, device="cpu", revision=None):
    """Load a model: a folder written by ``save_pretrained`` (or a training run's ``model/``), the
    shipped pre-trained ``"pbmc-small"``, or a Hugging Face Hub repository ``"owner/name@<commit>"``
    (see :meth:`~scmmgpt.models.scmmgpt.ScMMGPT.from_pretrained`)."""
    from .models.scmmgpt import ScMMGPT

    return ScMMGPT.from_pretrained(path, with_lm=with_lm, device=device, revision=revision)


def explore(adata, model="pbmc-small", **kwargs):
    """Start the explorer, a local web app over ``adata`` (an AnnData or an ``.h5ad`` path) and
    ``model``; see :func:`scmmgpt.explorer.explore` for the options (``port``, ``host``,
    ``block=False`` in a notebook, ``use_raw``...)."""
    from .explorer import explore as _explore

    return _explore(adata, model, **kwargs)


def __getattr__(name):
    if name in ("tl", "pl"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'scmmgpt' has no attribute {name!r}")
