"""Cell -> text (descriptions) and text -> cell (pseudo-cells)."""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import pandas as pd

from ..data.label_texts import query_texts
from ..errors import InputDataError
from ..utils.seed import seeded
from ._common import batches, full_rows, in_order, model_cells, require_lm, resolve_model, start

__all__ = ["describe", "generate"]


def describe(adata, model, *, max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 0.9, seed: int | None = 0, key_added: str = "scmmgpt_description", batch_size: int = 16,
             layer: str | None = None, use_raw: bool = False, gene_symbol_key: str | None = None, min_coverage: float = 0.5,
             device: str | None = None, precision: str = "auto", progress: bool = False, copy: bool = False):
    """Generate a text description of every cell (paper §3.3, CDGen direction).

    The cell's Q-Former query outputs, projected into the LM's embedding space, prefix a prompt; the
    LM continues it with its KV cache, greedily or by nucleus sampling (``do_sample=True``,
    ``temperature``, ``top_p``). Batches need no padding: every prefix has the same length. With a
    ``seed`` the output is the same on every run (same settings and device); the caller's global
    RNG is left as it was.

    ``precision`` (``auto | fp32 | bf16 | fp16``; :mod:`scmmgpt.utils.precision`) is resolved for the
    model's device (``auto``: bf16 where it has native bf16 matmul) and stored with the parameters.

    Returns
    -------
    ``None``, or the annotated copy with ``copy=True``. Writes ``.obs[key_added]`` (``""`` for cells
    with no expression in the model's genes) and ``.uns["scmmgpt"]["describe"]`` (parameters and
    the gene coverage report).
    """
    if max_new_tokens < 1:
        raise InputDataError("max_new_tokens must be >= 1.")
    if do_sample and (temperature <= 0 or not 0 < top_p <= 1):
        raise InputDataError("Sampling needs temperature > 0 and 0 < top_p <= 1.")
    adata = start(adata, copy)
    model = resolve_model(model, device=device)
    require_lm(model, "describe", ("lm_proj.",))
    mc = model_cells(adata, model, layer=layer, use_raw=use_raw, gene_symbol_key=gene_symbol_key,
                     min_coverage=min_coverage)
    texts, index = [], []
    prec = model.precision(precision)
    with seeded(seed):
        for batch in batches(model, mc.dataset, batch_size, progress=progress, desc="describe"):
            texts.append(model.describe(batch, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                        temperature=temperature, top_p=top_p, precision=prec))
            index.append(batch.index)
    texts = in_order(texts, index)
    adata.obs[key_added] = full_rows(np.asarray(texts, dtype=object), mc.rows, mc.n_obs, fill="")
    adata.uns.setdefault("scmmgpt", {})["describe"] = {
        "max_new_tokens": max_new_tokens, "do_sample": do_sample, "temperature": temperature, "top_p": top_p,
        "seed": "none" if seed is None else seed, "precision": prec.name, **mc.report()}
    return adata if copy else None


def sample_cells(values: np.ndarray, target_sum: float, library_size: int, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Cells drawn from eq.-1 profiles ``log(1 + target_sum * x / sum x)``: the gene proportions are
    ``expm1(values)`` normalised, a multinomial draws ``library_size`` reads per cell. Returns
    ``(counts, values)``: the reads and their eq.-1 normalisation (float32)."""
    props = np.expm1(values.astype(np.float64))
    props = props / np.maximum(props.sum(1, keepdims=True), 1e-12)
    counts = np.stack([rng.multinomial(library_size, p) for p in props]).astype(np.float32)
    return counts, np.log1p(target_sum * counts / np.maximum(counts.sum(1, keepdims=True), 1)).astype(np.float32)


def generate(model, texts: str | Sequence[str], *, n_per_text: int = 1, library_size: int | None = None,
             expand: bool = True, seed: int = 0, batch_size: int = 16, device: str | None = None,
             precision: str = "auto", progress: bool = False):
    """Generate pseudo-cells from text descriptions (paper §3.3, PCGen direction).

    The description (with ``expand=True``, a text that is exactly a Cell Ontology id, label or
    synonym is replaced by its training-style description) and the dummy cell tokens go through
    the LM; the text-to-cell projector and the cell decoder give a value for every vocabulary gene.

    The model predicts one expected profile per text (values on the eq.-1 scale,
    ``log(1 + target_sum * x / sum x)``). With ``library_size`` each of the ``n_per_text`` copies is
    made a realistic cell: reads are drawn from the profile's gene proportions (multinomial,
    ``seed``), stored as counts in ``.layers["counts"]`` and normalised into ``.X``; without it the
    copies are identical.

    ``precision`` (``auto | fp32 | bf16 | fp16``; :mod:`scmmgpt.utils.precision`) is resolved for the
    model's device (``auto``: bf16 where it has native bf16 matmul) and stored with the parameters.

    Returns
    -------
    A new AnnData: ``n_texts * n_per_text`` cells x the model's genes. ``.X`` eq.-1 values,
    ``.layers["expected"]`` the predicted profile, ``.layers["counts"]`` (with ``library_size``),
    ``.obs["prompt"]`` (the text given), ``.obs["model_text"]`` (what the model read),
    ``.uns["scmmgpt"]["generate"]`` the parameters.
    """
    import anndata as ad

    prompts = [texts] if isinstance(texts, str) else list(texts)
    if not prompts:
        raise InputDataError("generate needs at least one text.")
    if n_per_text < 1:
        raise InputDataError("n_per_text must be >= 1.")
    if library_size is not None and library_size < 1:
        raise InputDataError("library_size must be a positive number of reads (e.g. 5000).")
    if n_per_text > 1 and library_size is None:
        warnings.warn("n_per_text > 1 without library_size gives identical copies (the model predicts one "
                      "expected profile per text); pass library_size= to sample cells.", stacklevel=2)
    model_texts = query_texts(prompts, expand=expand)
    model = resolve_model(model, device=device)
    require_lm(model, "generate", ("text_to_cell.", "cell_decoder."))
    from ..utils.memory import check_fits

    n_genes = int(model.vocab.gene_mask().sum())
    n_cells = len(prompts) * n_per_text
    # expected + X (float32) and, with library_size, counts (int64 while sampling)
    check_fits(n_cells * n_genes * (8 + (8 if library_size is not None else 0)),
               f"The generated matrices ({n_cells} cells x {n_genes} genes, dense)",
               "Lower n_per_text (CLI: -n) or the number of texts, or generate in parts and join them with "
               "anndata.concat.")
    genes = model.vocab.gene_mask()
    prec = model.precision(precision)
    expected = model.generate_cells(model_texts, batch_size=batch_size, precision=prec)[:, genes]
    expected = np.repeat(expected, n_per_text, axis=0)
    obs = pd.DataFrame({"prompt": np.repeat(prompts, n_per_text), "model_text": np.repeat(model_texts, n_per_text),
                        "copy": np.tile(np.arange(n_per_text), len(prompts))},
                       index=[f"generated_{i}" for i in range(len(expected))])
    var = pd.DataFrame(index=pd.Index(np.asarray(model.vocab.tokens)[genes], name="gene"))
    layers = {"expected": expected.copy()}
    X = expected
    target_sum = model.config.target_sum
    if library_size is not None:
        layers["counts"], X = sample_cells(expected, target_sum, library_size, np.random.default_rng(seed))
    gen = ad.AnnData(X=X, obs=obs, var=var, layers=layers)
    gen.uns["scmmgpt"] = {"generate": {"n_per_text": n_per_text, "library_size": library_size or "none",
                                       "seed": seed, "target_sum": target_sum, "expand": expand,
                                       "precision": prec.name}}
    return gen
