"""Parity with the real scGPT code (``scgpt==0.2.4`` from PyPI, installed without its dependencies
by ``make install``).

scGPT's own ``TransformerModel`` is built with random weights, saved as its checkpoints are saved
(``args.json``, ``vocab.json``, ``best_model.pt``), and loaded with :func:`load_scgpt`. Real PBMCs
are prepared by each side's own code: scGPT's ``Preprocessor`` (normalise to 1e4, log1p), its
``binning`` and its ``tokenize_and_pad_batch`` on one side; :func:`prepare_cells` and
:class:`CellTextDataset` on ours. The ``<cls>`` embedding and every gene's state must agree.

scGPT's modules are loaded from their files: ``scgpt/__init__`` imports torchtext, wandb and more.
The flash-attention layer (``FlashMHA``, the ``Wqkv`` layout) needs CUDA and cannot be built here,
so scGPT's model is built in its torch layout; a flash-attention checkpoint is the same state dict
with ``self_attn.in_proj_*`` stored as ``self_attn.Wqkv.*`` (``FlashMHA`` packs q, k, v in one
projection in the same order), which is how the second layout is tested.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import sys
import types
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from scmmgpt.data.dataset import CellTextCollator, CellTextDataset
from scmmgpt.data.prepare import prepare_cells
from scmmgpt.models.scgpt import load_scgpt

ASSET = Path(__file__).parents[1] / "assets" / "pbmc3k_3000genes.h5ad"
N_BINS = 51


def _scgpt_dir() -> Path:
    spec = importlib.util.find_spec("scgpt")       # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("scgpt is not installed: `make install` installs scgpt==0.2.4 with --no-deps.")
    return Path(list(spec.submodule_search_locations)[0])


def _load(name: str, path: Path, package: str | None = None) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    if package:
        module.__package__ = package
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def real_scgpt():
    """scGPT's ``model.py``, ``preprocess.py`` and ``gene_tokenizer.py``, loaded by file path.

    ``model.py`` is imported as a submodule of a bare package over ``scgpt/model`` (its relative
    imports are ``dsbn`` and ``grad_reverse``). ``preprocess.py`` and ``gene_tokenizer.py`` import
    ``logger`` from ``scgpt``, and the tokenizer module subclasses torchtext's ``Vocab`` for a class
    that is not used here: a stand-in ``scgpt`` (only the logger) and ``torchtext.vocab`` are in
    ``sys.modules`` while they load, and removed after.
    """
    root = _scgpt_dir()
    saved = {k: sys.modules.get(k) for k in ("scgpt", "torchtext", "torchtext.vocab")}
    pkg = types.ModuleType("_real_scgpt_model")
    pkg.__path__ = [str(root / "model")]
    sys.modules["_real_scgpt_model"] = pkg
    stand_in = types.ModuleType("scgpt")
    stand_in.logger = logging.getLogger("scGPT")
    torchtext, tt_vocab = types.ModuleType("torchtext"), types.ModuleType("torchtext.vocab")
    tt_vocab.Vocab = object
    torchtext.vocab = tt_vocab
    sys.modules.update({"scgpt": stand_in, "torchtext": torchtext, "torchtext.vocab": tt_vocab})
    try:
        with pytest.warns(UserWarning, match="flash_attn"):
            model = importlib.import_module("_real_scgpt_model.model")
        preprocess = _load("_real_scgpt_preprocess", root / "preprocess.py")
        tokenizer = _load("_real_scgpt_tokenizer", root / "tokenizer" / "gene_tokenizer.py", "scgpt.tokenizer")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return types.SimpleNamespace(model=model, preprocess=preprocess, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def cells():
    """24 real PBMCs (counts) over 400 genes, every cell with at least 30 of them expressed."""
    a = ad.read_h5ad(ASSET)
    a = a[:, np.asarray((a.X > 0).sum(0)).ravel().argsort()[::-1][:400]].copy()
    keep = np.flatnonzero(np.asarray((a.X > 0).sum(1)).ravel() >= 30)[:24]
    return a[keep].copy()


def _scgpt_model(real_scgpt, vocab: dict, style: str) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = {"n_input_bins": N_BINS + 2} if style == "category" else {}    # scGPT's tutorials: bins + pad + mask
    m = real_scgpt.model.TransformerModel(
        ntoken=len(vocab), d_model=32, nhead=4, d_hid=64, nlayers=2, vocab=vocab, dropout=0.0,
        pad_token="<pad>", pad_value=_pad_value(style), input_emb_style=style,
        cell_emb_style="cls", use_fast_transformer=False, **extra)
    with torch.no_grad():                # LayerNorms start at 1 / 0: move every weight off its init
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def _save(model: torch.nn.Module, vocab: dict, style: str, out: Path, layout: str) -> None:
    out.mkdir(parents=True)
    state = model.state_dict()
    if layout == "flash":
        state = {k.replace("self_attn.in_proj_", "self_attn.Wqkv."): v for k, v in state.items()}
    torch.save(state, out / "best_model.pt")
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "args.json").write_text(json.dumps({
        "embsize": 32, "nheads": 4, "d_hid": 64, "nlayers": 2, "dropout": 0.0, "pad_token": "<pad>",
        "pad_value": _pad_value(style), "n_bins": N_BINS, "input_style": "binned",
        "input_emb_style": style}))


def _pad_value(style: str) -> int:
    return N_BINS if style == "category" else -2          # scGPT's tutorials' pad values


def _scgpt_side(real_scgpt, model, cells: ad.AnnData, vocab: dict, style: str) -> tuple[torch.Tensor, torch.Tensor]:
    """scGPT's preprocessing, binning (cell i after ``np.random.seed(i)``), tokenisation, forward."""
    a = cells.copy()
    real_scgpt.preprocess.Preprocessor(use_key="X", normalize_total=1e4, result_normed_key="X_normed", log1p=True,
                                       result_log1p_key="X_log1p", binning=None)(a)
    x = a.layers["X_log1p"]
    x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    binned = []
    for i, row in enumerate(x):
        np.random.seed(i)
        binned.append(real_scgpt.preprocess.binning(row, N_BINS))
    gene_ids = np.array([vocab[g] for g in a.var_names])
    tok = real_scgpt.tokenizer.tokenize_and_pad_batch(
        np.stack(binned), gene_ids, max_len=a.n_vars + 1, vocab=vocab, pad_token="<pad>",
        pad_value=_pad_value(style),
        append_cls=True, include_zero_gene=False, cls_token="<cls>")
    with torch.no_grad():
        states = model._encode(tok["genes"], tok["values"], tok["genes"].eq(vocab["<pad>"]))
    return tok["genes"], states


def _our_side(ckpt: Path, cells: ad.AnnData) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with pytest.warns(UserWarning, match="Ignored non-encoder"):
        encoder, vocab = load_scgpt(ckpt)
    encoder.eval()
    source = prepare_cells(cells, vocab, value_kind="counts", target_sum=1e4)
    ds = CellTextDataset(source, cls_id=vocab.cls_id, max_genes=cells.n_vars, n_bins=encoder.config.n_bins)
    batch = CellTextCollator(pad_id=vocab.pad_id, pad_value=encoder.config.pad_value)([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        states = encoder(batch.gene_ids, batch.values, batch.padding_mask)
    return batch.gene_ids, states, batch.padding_mask


@pytest.mark.parametrize("layout", ["torch", "flash"])
@pytest.mark.parametrize("style", ["continuous", "category"])
def test_cls_and_gene_states_match_real_scgpt(real_scgpt, cells, tmp_path, style, layout):
    # a census-style vocabulary: genes first, the specials appended (pad is not index 0)
    vocab = {g: i for i, g in enumerate(cells.var_names)}
    vocab.update({"<pad>": len(vocab), "<cls>": len(vocab) + 1, "<eoc>": len(vocab) + 2})
    model = _scgpt_model(real_scgpt, vocab, style)
    _save(model, vocab, style, tmp_path / "ckpt", layout)
    ref_genes, ref = _scgpt_side(real_scgpt, model, cells, vocab, style)
    our_genes, ours, pad = _our_side(tmp_path / "ckpt", cells)

    torch.testing.assert_close(ours[:, 0], ref[:, 0], rtol=0, atol=1e-5)       # the <cls> embedding
    n_compared = 0
    for b in range(len(cells)):                                                 # each gene's state, by gene
        ref_row = {int(g): ref[b, j] for j, g in enumerate(ref_genes[b]) if j > 0 and g != vocab["<pad>"]}
        our_row = {int(g): ours[b, j] for j, g in enumerate(our_genes[b]) if j > 0 and not pad[b, j]}
        assert our_row.keys() == ref_row.keys(), f"cell {b}: another set of expressed genes"
        for g in ref_row:
            torch.testing.assert_close(our_row[g], ref_row[g], rtol=0, atol=1e-5)
        n_compared += len(ref_row)
    assert n_compared > 30 * len(cells)
