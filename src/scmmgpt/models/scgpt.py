"""Load a real scGPT checkpoint directory into :class:`~scmmgpt.modules.cell_encoder.CellEncoder`.

A scGPT directory holds ``args.json`` (``embsize``, ``nheads``, ``d_hid``, ``nlayers``,
``pad_token``, ``pad_value``, ``n_bins``, ``input_emb_style``...), ``vocab.json`` and
``best_model.pt`` (a bare state dict). Both attention layouts are accepted: flash-attention
(``self_attn.Wqkv.*``) and torch (``self_attn.in_proj_*``). Decoder / MVC / classifier heads are
ignored. Any missing or mis-shaped encoder weight is an error (never silently left at random init).
The file is read with ``torch.load(weights_only=True)``: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch

from ..data.vocab import GeneVocab
from ..errors import CheckpointError
from ..modules.cell_encoder import CellEncoder
from .config import CellEncoderConfig

__all__ = ["scgpt_config_from_args", "convert_scgpt_state_dict", "load_scgpt"]

_ENCODER_PREFIXES = ("encoder.", "value_encoder.", "transformer_encoder.")


def scgpt_config_from_args(args: dict, vocab: GeneVocab, n_value_embeddings: int | None = None) -> CellEncoderConfig:
    """Translate scGPT's ``args.json`` into a :class:`CellEncoderConfig`; ``n_value_embeddings``: the
    rows of a ``category`` model's value embedding (its state dict's, ``n_bins + 2`` in scGPT)."""
    try:
        style = args.get("input_emb_style", "continuous")
        return CellEncoderConfig(
            vocab_size=len(vocab),
            d_model=int(args["embsize"]),
            n_layers=int(args["nlayers"]),
            n_heads=int(args["nheads"]),
            d_ff=int(args["d_hid"]),
            dropout=float(args.get("dropout", 0.2)),
            pad_id=vocab[args.get("pad_token", "<pad>")],
            input_style="category" if style == "category" else "continuous",
            # scGPT's "binned" input (its pre-training default) feeds per-cell quantile bins to either
            # value encoder; "normed_raw" / "log1p" feed the values themselves
            n_bins=int(args.get("n_bins", 51)) if args.get("input_style", "binned") == "binned" or
            style == "category" else None,
            pad_value=float(args.get("pad_value", -2)),
            n_value_embeddings=n_value_embeddings if style == "category" else None,
        )
    except KeyError as exc:
        raise CheckpointError(f"scGPT args.json lacks the key {exc}.") from None


def convert_scgpt_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Keep the encoder weights of a scGPT state dict, renaming ``Wqkv`` to ``in_proj``.

    Returns ``(encoder_state, ignored_keys)``.
    """
    out, ignored = {}, []
    for key, value in state.items():
        key = key.removeprefix("module.")
        if not key.startswith(_ENCODER_PREFIXES):
            ignored.append(key)
            continue
        key = re.sub(r"self_attn\.Wqkv\.weight$", "self_attn.in_proj_weight", key)
        key = re.sub(r"self_attn\.Wqkv\.bias$", "self_attn.in_proj_bias", key)
        out[key] = value
    return out, ignored


def load_scgpt(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> tuple[CellEncoder, GeneVocab]:
    """Build a :class:`CellEncoder` and :class:`GeneVocab` from a scGPT checkpoint directory.

    Raises
    ------
    CheckpointError
        Missing files, missing encoder weights, wrong shapes or unexpected encoder keys.
    """
    path = Path(path)
    files = {name: path / name for name in ("args.json", "vocab.json", "best_model.pt")}
    missing = [n for n, p in files.items() if not p.is_file()]
    if missing:
        raise CheckpointError(f"{path} is not a scGPT checkpoint directory: missing {missing}.")
    vocab = GeneVocab.from_json(files["vocab.json"])
    try:
        state = torch.load(files["best_model.pt"], map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"Could not read {files['best_model.pt']} as a weights-only state dict: {exc}") from None
    encoder_state, ignored = convert_scgpt_state_dict(state)
    value_rows = encoder_state.get("value_encoder.embedding.weight")
    config = scgpt_config_from_args(json.loads(files["args.json"].read_text()), vocab,
                                    None if value_rows is None else int(value_rows.shape[0]))
    emb = encoder_state.get("encoder.embedding.weight")
    if emb is not None and emb.shape[0] != config.vocab_size:
        if emb.shape[0] > config.vocab_size:
            raise CheckpointError(f"Gene embedding has {emb.shape[0]} rows but vocab.json has {config.vocab_size} tokens.")
        # vocab gained <eoc> (appended): extend the embedding with the mean row
        extra = emb.mean(0, keepdim=True).expand(config.vocab_size - emb.shape[0], -1)
        encoder_state["encoder.embedding.weight"] = torch.cat([emb, extra], 0)
    model = CellEncoder(config)
    expected = model.state_dict()
    missing_keys = sorted(set(expected) - set(encoder_state))
    unexpected = sorted(set(encoder_state) - set(expected))
    if missing_keys or unexpected:
        raise CheckpointError(
            f"scGPT checkpoint {files['best_model.pt']} does not match the encoder: missing {missing_keys[:8]}"
            f"{' ...' if len(missing_keys) > 8 else ''}, unexpected {unexpected[:8]}."
        )
    bad = [k for k in expected if expected[k].shape != encoder_state[k].shape]
    if bad:
        raise CheckpointError(f"Shape mismatch for {bad[:5]}: checkpoint "
                              f"{[tuple(encoder_state[k].shape) for k in bad[:5]]} vs model "
                              f"{[tuple(expected[k].shape) for k in bad[:5]]}.")
    model.load_state_dict(encoder_state, strict=True)
    if ignored:
        heads = sorted({k.split(".")[0] for k in ignored})
        warnings.warn(f"Ignored non-encoder scGPT weights: {heads}.", stacklevel=2)
    return model.to(device), vocab
